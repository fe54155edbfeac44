// Per-channel kernels for BatchNorm, Scale and Bias over an (outer, channels, inner) array: the
// channel of element i is i / inner % channels.  CuPy's reductions over axes (0, 2) gave each
// channel one block, so a layer with 64 channels and a million cells each kept a few SMs busy:
// ResNet-50's BatchNorm and Scale layers took more of its step than its convolutions.
//
// channel_parts_kernel + channel_sums_kernel: sums[c] = scale * sum of a and dots[c] = scale *
// sum of a * b over channel c's cells, a = x - shift[c] (no shift: x), b = y (no y: a).  Block
// item (c, part) adds its share of the cells into partial[2 * (c * parts + part) + {0, 1}] (a
// tree in shared memory), then one thread per channel adds the parts in order: a fixed order
// for given shapes, so results are deterministic.  Null pointers (0) stand for what is absent.
// The elementwise kernels repeat Caffe's arithmetic step by step (compiled with --fmad=false).
// Launch: grid-stride loops; a block of at most 256 threads (a power of two).
// Assumptions: the parts' count and channels * parts below 2^31; inner > 0 wherever cells exist.

template <typename T>
__global__ void channel_parts_kernel(long long outer, int channels, long long inner, int parts, const T* x,
                                     const T* y, const T* shift, T* partial) {
    __shared__ T tree_a[256], tree_ab[256];
    const long long cells = outer * inner, share = (cells + parts - 1) / parts;
    const long long outer_step = blockDim.x / inner, inner_step = blockDim.x % inner;
    for (long long item = blockIdx.x; item < (long long)channels * parts; item += gridDim.x) {
        const int c = (int)(item / parts);
        const long long start = item % parts * share, end = min(cells, start + share), first = start + threadIdx.x;
        const T s = shift ? shift[c] : T(0);
        long long o = first / inner, i = first % inner;  // then stepped, with no division
        T sum_a = T(0), sum_ab = T(0);
        for (long long j = first; j < end; j += blockDim.x) {
            const long long at = (o * channels + c) * inner + i;
            const T a = x[at] - s;
            sum_a += a;
            sum_ab += a * (y ? y[at] : a);
            o += outer_step;
            i += inner_step;
            if (i >= inner) {
                i -= inner;
                ++o;
            }
        }
        tree_a[threadIdx.x] = sum_a;
        tree_ab[threadIdx.x] = sum_ab;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half /= 2) {
            if (threadIdx.x < half) {
                tree_a[threadIdx.x] += tree_a[threadIdx.x + half];
                tree_ab[threadIdx.x] += tree_ab[threadIdx.x + half];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            partial[2 * item] = tree_a[0];
            partial[2 * item + 1] = tree_ab[0];
        }
        __syncthreads();  // the tree is read before the next item overwrites it
    }
}

// sums / dots (either may be null) = scale * the parts' totals, plus their old values when
// `accumulate` (a gradient added to, as Caffe's beta = 1).
template <typename T>
__global__ void channel_sums_kernel(int channels, int parts, const T* partial, T scale, int accumulate, T* sums,
                                    T* dots) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += blockDim.x * gridDim.x) {
        T sum_a = T(0), sum_ab = T(0);
        for (int p = 0; p < parts; ++p) {
            sum_a += partial[2 * ((long long)c * parts + p)];
            sum_ab += partial[2 * ((long long)c * parts + p) + 1];
        }
        if (sums) sums[c] = accumulate ? sums[c] + sum_a * scale : sum_a * scale;
        if (dots) dots[c] = accumulate ? dots[c] + sum_ab * scale : sum_ab * scale;
    }
}

// The elementwise passes: ILP elements a thread, all loaded before any is stored (one load in
// flight a thread left an H100 at about half its memory bandwidth), and the channel stepped along
// the grid-stride loop instead of divided out of each index.  `map` loads an element's inputs
// (load(i)) and computes and stores its outputs (store(i, c, values)).
#define ILP 4

template <typename Map>
__device__ void channel_map(long long count, int channels, long long inner, const Map& map) {
    const long long stride = (long long)blockDim.x * gridDim.x, rows_a_step = stride / inner;
    const long long inner_step = stride - rows_a_step * inner;
    const int channel_step = (int)(rows_a_step % channels);
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, row = first / inner;
    long long at = first - row * inner;  // first's place in its row, then stepped with it
    int c = (int)(row % channels);
    for (; first < count; first += ILP * stride) {
        typename Map::Values values[ILP];
#pragma unroll
        for (int k = 0; k < ILP; ++k)
            if (first + k * stride < count) values[k] = map.load(first + k * stride);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            if (first + k * stride < count) map.store(first + k * stride, c, values[k]);
            at += inner_step;
            c += channel_step;
            if (at >= inner) {
                at -= inner;
                ++c;
            }
            if (c >= channels) c -= channels;
        }
    }
}

// BatchNorm forward: y = (x - mean[c]) / std[c] (Caffe: x - mean, then a division); x_norm,
// unless null, keeps a copy for the backward pass.  A Scale that follows may be folded in:
// then y = that * scale[c] (+ bias[c] unless null), Scale's own steps; and after it a ReLU
// (relu != 0): y = max(v, 0) + slope * min(v, 0), ReLU's expression.  y may be x.
template <typename T>
struct BatchNormForward {
    typedef T Values;
    const T *x, *mean, *std, *scale, *bias;
    T *y, *x_norm;
    int relu;
    T slope;
    __device__ T load(long long i) const { return x[i]; }
    __device__ void store(long long i, int c, T value) const {
        T v = (value - mean[c]) / std[c];
        if (x_norm) x_norm[i] = v;
        if (scale) v = v * scale[c];
        if (bias) v = v + bias[c];
        if (relu) v = (v < 0 ? T(0) : v) + slope * (v < 0 ? v : T(0));  // (NaN stays NaN)
        y[i] = v;
    }
};

template <typename T>
__global__ void batch_norm_forward_kernel(long long count, int channels, long long inner, const T* x, const T* mean,
                                          const T* std, T* y, T* x_norm, const T* scale, const T* bias, int relu,
                                          T slope) {
    channel_map(count, channels, inner, BatchNormForward<T>{x, mean, std, scale, bias, y, x_norm, relu, slope});
}

// BatchNorm backward with batch statistics, Caffe's steps: t = y * sum_dyy[c] + sum_dy[c], then
// dx = (dy + neg_inv_m * t) / std[c] (neg_inv_m = -1 / (outer * inner)).  dx may be dy.
template <typename T>
struct BatchNormBackward {
    struct Values {
        T dy, y;
    };
    const T *dy, *y, *sum_dy, *sum_dyy, *std;
    T neg_inv_m;
    T* dx;
    __device__ Values load(long long i) const { return Values{dy[i], y[i]}; }
    __device__ void store(long long i, int c, Values v) const {
        const T t = v.y * sum_dyy[c] + sum_dy[c];
        dx[i] = (v.dy + neg_inv_m * t) / std[c];
    }
};

template <typename T>
__global__ void batch_norm_backward_kernel(long long count, int channels, long long inner, const T* dy,
                                           const T* y, const T* sum_dy, const T* sum_dyy, const T* std,
                                           T neg_inv_m, T* dx) {
    channel_map(count, channels, inner, BatchNormBackward<T>{dy, y, sum_dy, sum_dyy, std, neg_inv_m, dx});
}

// Scale forward: y = x * scale[c], then + bias[c] unless bias is null.  y may be x.
template <typename T>
struct ScaleForward {
    typedef T Values;
    const T *x, *scale, *bias;
    T* y;
    __device__ T load(long long i) const { return x[i]; }
    __device__ void store(long long i, int c, T value) const {
        T v = value * scale[c];
        if (bias) v = v + bias[c];
        y[i] = v;
    }
};

template <typename T>
__global__ void scale_forward_kernel(long long count, int channels, long long inner, const T* x, const T* scale,
                                     const T* bias, T* y) {
    channel_map(count, channels, inner, ScaleForward<T>{x, scale, bias, y});
}
