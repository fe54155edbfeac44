// Local response normalization across channels (Caffe's ACROSS_CHANNELS LRN), with the
// semantics and the order of operations of espresso/backend/cpu/kernels.py:
//   forward:  scale = k + alpha/size * (sum of x^2 over the `size` channels centred on c, zeros
//             past the ends);  y = x * scale^-beta;  scale is kept for backward.
//   backward: dx = dy * scale^-beta + (-2 alpha beta / size) * x * (window sum of dy*y/scale).
// x, y, dy, scale, dx: (N, C, *spatial), C-contiguous, `plane` = prod(spatial) elements per
// channel.  Window sums start at channel c - (size-1)/2 and add in channel order, as the CPU's.
// Launch: one thread per element, 1-D grid of 1-D blocks (grid-stride loop); each thread reads
// its `size` neighbours along the channel axis (stride `plane`), coalesced across threads.
// Assumptions (checked by kernels.py): one float type T, element count < 2^31, outputs that do
// not alias the inputs (the neighbours are read by other threads).

#define GRID_STRIDE_LOOP(i, count)                                                         \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count);      \
         i += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float pow_t(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_t(double a, double b) { return pow(a, b); }

template <typename T>
__global__ void lrn_across_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                          T* __restrict__ scale, int count, int channels,
                                          int plane, int size, T alpha_over_size, T k,
                                          T negative_beta) {
    int pre = (size - 1) / 2;
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int c = (i / plane) % channels;
        const T* first = x + (i - c * plane);  // channel 0 at this (n, position)
        T sum = T(0);
        for (int j = 0; j < size; ++j) {
            int cc = c - pre + j;
            if (cc >= 0 && cc < channels) {
                T v = first[cc * plane];
                sum += v * v;
            }
        }
        T s = sum * alpha_over_size + k;
        scale[index] = s;
        y[index] = pow_t(s, negative_beta) * x[index];
    }
}

template <typename T>
__global__ void lrn_across_backward_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                           const T* __restrict__ dy, const T* __restrict__ scale,
                                           T* __restrict__ dx, int count, int channels, int plane,
                                           int size, T coefficient, T negative_beta) {
    int pre = (size - 1) / 2;
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int c = (i / plane) % channels;
        int first = i - c * plane;
        T sum = T(0);
        for (int j = 0; j < size; ++j) {
            int cc = c - pre + j;
            if (cc >= 0 && cc < channels) {
                int at = first + cc * plane;
                sum += dy[at] * y[at] / scale[at];
            }
        }
        dx[index] = pow_t(scale[index], negative_beta) * dy[index] + sum * x[index] * coefficient;
    }
}
