// im2col / col2im: Caffe's column unfolding of images with D spatial axes, in the two column
// layouts of espresso/backend/cpu/kernels.py (K = prod(kernel), O = prod(out), S = prod(size)):
//   image x          (N, C, *size)      x[(n*C + c)*S + s]
//   batch-major col  (N, C*K, O)        col[((n*C + c)*K + k)*O + o]     (batch_last = false)
//   batch-last col   (C*K, O*N)         col[((c*K + k)*O + o)*N + n]     (batch_last = true)
// Row order (c, k_1..k_D) and column order (o_1..o_D) are Caffe's: the last axis varies fastest.
// The geometry comes as tables built once per geometry by kernels.py (so the kernels do two
// integer divisions per element instead of several per axis):
//   source[k*O + o]   the plane offset that tap k of output o reads, or -1 in the padding;
//   taps[starts[s] .. starts[s+1])  the flat k*O + o of the column entries that read pixel s,
//                     in increasing k (the CPU's scan order of kernel offsets).
// im2col_kernel: one thread per column entry (grid-stride loop), so the writes are coalesced.
// col2im_kernel: one thread per image element, gathering its column entries in scan order as
//   the CPU version adds them: no atomics, deterministic, and it overwrites x (the adjoint of
//   im2col, not an accumulation).  Batch-last runs the threads with n fastest, so that the
//   column reads stay coalesced.
// Launch: 1-D grid of 1-D blocks, any sizes (grid-stride loops).
// Assumptions (checked by kernels.py): C-contiguous arrays of one float type T, every element
// count < 2^31 (int indexing), tables matching the geometry of x and col.

#define GRID_STRIDE_LOOP(i, count)                                                         \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count);      \
         i += (long long)blockDim.x * gridDim.x)

template <typename T, bool BATCH_LAST>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ col, int count, int num,
                              int channels, int taps_outs, int plane, const int* __restrict__ source) {
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index, n = 0, c, ko;
        if (BATCH_LAST) {  // (c*KO + ko)*N + n
            n = i % num;
            i /= num;
        }
        ko = i % taps_outs;
        i /= taps_outs;
        if (BATCH_LAST) {
            c = i;
        } else {  // (n*C + c)*KO + ko
            c = i % channels;
            n = i / channels;
        }
        const int src = source[ko];
        col[index] = src < 0 ? T(0) : x[(long long)(n * channels + c) * plane + src];
    }
}

template <typename T, bool BATCH_LAST>
__global__ void col2im_kernel(const T* __restrict__ col, T* __restrict__ x, int count, int num,
                              int channels, int taps_outs, int plane, const int* __restrict__ starts,
                              const int* __restrict__ taps) {
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index, n, c, s;
        if (BATCH_LAST) {  // n fastest: neighbouring threads read neighbouring column entries
            n = i % num;
            i /= num;
            s = i % plane;
            c = i / plane;
        } else {  // the image's own order
            s = i % plane;
            i /= plane;
            c = i % channels;
            n = i / channels;
        }
        T sum = T(0);
        for (int e = starts[s]; e < starts[s + 1]; ++e) {
            const long long ko = taps[e];
            sum += BATCH_LAST ? col[((long long)c * taps_outs + ko) * num + n]
                              : col[((long long)n * channels + c) * taps_outs + ko];
        }
        x[(long long)(n * channels + c) * plane + s] = sum;
    }
}
