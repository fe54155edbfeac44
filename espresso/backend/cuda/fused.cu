// Fused kernels for launch-bound nets: Caffe's SGD update over the whole parameter arena in one
// pass, SoftmaxWithLoss in three kernels (forward, a one-block loss sum, backward; the first two
// as one for few positions) instead of some thirty small ones, Softmax's forward in one instead
// of five, and Accuracy in two instead of some twenty (each of which a first run also compiles),
// and small matrix products.  Same arithmetic, step by step, as the xp code they replace
// (compiled with --fmad=false) but for the order of the softmax's sum; the loss sum runs in a
// fixed order, so results are deterministic.
//
// Parameters are segments of the arena: segment s covers [ends[s-1], ends[s]) and has its own
// lr_mult and decay (weight_decay * decay_mult).  Softmax positions are (outer, inner) pairs of an
// (outer, classes, inner) array; labels are floats truncated to int, as Caffe's static_cast.
// Launch: grid-stride loops, one thread per arena element / input element, `lanes` threads per
// softmax position (a warp's part: the classes split between them); the loss sum is one block of
// 256 threads.
// Assumptions: positions and classes below 2^31; labels in [0, classes) unless ignored (Caffe
// only DCHECKs it); few segments (each thread finds its own by a linear scan of `ends`).

template <typename T>
__device__ int segment_of(long long i, int segments, const long long* ends) {
    int s = 0;
    while (s < segments - 1 && ends[s] <= i) ++s;
    return s;
}

// w -= update; g (the gradient) ends holding the update, h the momentum history (Caffe's order:
// normalize, regularize, h = momentum * h + local_rate * g, w -= h).
template <typename T>
__global__ void sgd_update_kernel(long long n, T* w, T* g, T* h, int segments, const long long* ends,
                                  const T* lr_mult, const T* decay, const T* rate, T momentum,
                                  T normalize, int regularization) {  // 0 none, 1 L2, 2 L1
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int s = segment_of<T>(i, segments, ends);
        T gi = g[i], wi = w[i];
        if (normalize != T(1)) gi = gi * normalize;
        if (regularization == 1) gi = gi + wi * decay[s];
        if (regularization == 2) gi = gi + T((wi > T(0)) - (wi < T(0))) * decay[s];
        T hi = h[i] * momentum;
        gi = gi * (lr_mult[s] * rate[0]);
        hi = hi + gi;
        h[i] = hi;
        g[i] = hi;
        w[i] = wi - hi;
    }
}

// The softmax over classes of the position at `base` (stride `inner`) into prob (may be x), by
// the `lanes` threads that share the position (a power of two up to 32, consecutive in one warp):
// lane l takes the classes l, l + lanes, ...; the lanes' maxima and sums are combined by xor
// shuffles, whose fixed tree gives every lane the same sum.  `live`: whether this thread has a
// position (the others join the shuffles only).
template <typename T>
__device__ void softmax_at(const T* x, T* prob, long long base, int classes, int inner, int lane, int lanes,
                           bool live) {
    const int mine = live ? classes : 0;
    T top = live ? x[base] : T(0);
    // (unrolled: each lane's loads issue several at a time; a 1000-class softmax walked 31
    // classes a lane three times, one dependent load after another: 11.5 us on an H100)
#pragma unroll 4
    for (int c = lane; c < mine; c += lanes) {
        const T v = x[base + (long long)c * inner];
        top = v > top ? v : top;
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) {
        const T other = __shfl_xor_sync(0xffffffffu, top, offset, lanes);
        top = other > top ? other : top;
    }
    T sum = T(0);
#pragma unroll 4
    for (int c = lane; c < mine; c += lanes) {
        T e = exp(x[base + (long long)c * inner] - top);
        prob[base + (long long)c * inner] = e;
        sum += e;
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset, lanes);
#pragma unroll 4
    for (int c = lane; c < mine; c += lanes) prob[base + (long long)c * inner] /= sum;
}

// Softmax forward: `lanes` threads per (outer, inner) position; y may be x (in place).
// Grid-stride loop whose trip count is the same for every thread of a block (the shuffles need
// whole warps).
template <typename T>
__global__ void softmax_forward_kernel(int positions, int lanes, int classes, int inner, const T* x, T* y) {
    const long long threads = (long long)positions * lanes;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < threads;
         first += (long long)blockDim.x * gridDim.x) {
        const long long t = first + threadIdx.x;
        const bool live = t < threads;
        const int p = live ? (int)(t / lanes) : 0, lane = (int)(t % lanes);
        softmax_at(x, y, (long long)(p / inner) * classes * inner + p % inner, classes, inner, lane, lanes, live);
    }
}

// Whether position p's label counts: not ignored and a class.  A label that is not a class (nor
// ignored) counts as ignored and is recorded in `problem` (position + 1, label; the first recorded
// stays) for the host to raise when it next reads values back.
__device__ bool label_counts(int p, int label, int classes, int has_ignore, int ignore_label, long long* problem) {
    const bool ignored = has_ignore && label == ignore_label;
    const bool ok = !ignored && label >= 0 && label < classes;
    if (!ignored && !ok && atomicCAS((unsigned long long*)problem, 0ULL, (unsigned long long)(p + 1)) == 0ULL) {
        problem[1] = label;
    }
    return ok;
}

// Thread t of the `lanes` per position: the softmax over classes into prob, and (lane 0) that
// position's loss -log(max(prob[label], FLT_MIN)) (0 where the label does not count) and validity.
template <typename T>
__device__ void softmax_loss_at(long long t, long long threads, int lanes, int classes, int inner, const T* x,
                                const T* labels, T* prob, T* losses, T* valid, int has_ignore, int ignore_label,
                                T flt_min, long long* problem) {
    const bool live = t < threads;
    const int p = live ? (int)(t / lanes) : 0, lane = (int)(t % lanes);
    const long long base = (long long)(p / inner) * classes * inner + p % inner;
    softmax_at(x, prob, base, classes, inner, lane, lanes, live);
    __syncwarp();  // lane 0 reads prob[label], which another lane may have written
    if (!live || lane != 0) return;
    const int label = (int)labels[p];
    const bool ok = label_counts(p, label, classes, has_ignore, ignore_label, problem);
    const T picked = prob[base + (long long)(ok ? label : 0) * inner];
    losses[p] = ok ? -log(picked > flt_min ? picked : flt_min) : T(0);
    valid[p] = ok ? T(1) : T(0);
}

#define SOFTMAX_LOSS_PARAMS                                                                                   \
    int positions, int lanes, int classes, int inner, const T *x, const T *labels, T *prob, T *losses, T *valid, \
        int has_ignore, int ignore_label, T flt_min, long long *problem
#define SOFTMAX_LOSS_ARGS lanes, classes, inner, x, labels, prob, losses, valid, has_ignore, ignore_label, flt_min, problem

// SoftmaxWithLoss forward: softmax_loss_at over every position, then valid_mean_kernel.
template <typename T>
__global__ void softmax_loss_forward_kernel(SOFTMAX_LOSS_PARAMS) {
    const long long threads = (long long)positions * lanes;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < threads;  // (as softmax_forward_kernel)
         first += (long long)blockDim.x * gridDim.x) {
        softmax_loss_at(first + threadIdx.x, threads, SOFTMAX_LOSS_ARGS);
    }
}

// Accuracy, one thread per position: hits = whether the label is among the top_k scores (Caffe's
// rule: fewer than top_k other classes score at least as high as it, so a tie counts against),
// valid = whether the label counts.  Then valid_mean_kernel gives the accuracy.
template <typename T>
__global__ void accuracy_kernel(int positions, int classes, int inner, const T* x, const T* labels, int top_k,
                                T* hits, T* valid, int has_ignore, int ignore_label, long long* problem) {
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < positions; p += blockDim.x * gridDim.x) {
        const long long base = (long long)(p / inner) * classes * inner + p % inner;
        const int label = (int)labels[p];
        const bool ok = label_counts(p, label, classes, has_ignore, ignore_label, problem);
        int better = -1;  // the true class scores at least as high as itself
        if (ok) {
            const T truth = x[base + (long long)label * inner];
            for (int c = 0; c < classes; ++c) better += x[base + (long long)c * inner] >= truth;
        }
        hits[p] = ok && better < top_k ? T(1) : T(0);
        valid[p] = ok ? T(1) : T(0);
    }
}

// By one block: mean = sum(values) / normalizer, normalizer = max(1, valid count) when
// `fixed_normalizer` < 0 (VALID), else fixed_normalizer.  Fixed order: deterministic.
template <typename T>
__device__ void block_mean(int positions, const T* values, const T* valid, T* mean, T* normalizer,
                           T fixed_normalizer) {
    __shared__ T part_loss[256], part_valid[256];
    T l = T(0), v = T(0);
    for (int p = threadIdx.x; p < positions; p += blockDim.x) {
        l += values[p];
        v += valid[p];
    }
    part_loss[threadIdx.x] = l;
    part_valid[threadIdx.x] = v;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            part_loss[threadIdx.x] += part_loss[threadIdx.x + stride];
            part_valid[threadIdx.x] += part_valid[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        T norm = fixed_normalizer >= T(0) ? fixed_normalizer : part_valid[0] > T(1) ? part_valid[0] : T(1);
        normalizer[0] = norm;
        mean[0] = part_loss[0] / norm;
    }
}

template <typename T>
__global__ void valid_mean_kernel(int positions, const T* values, const T* valid, T* mean, T* normalizer,
                                  T fixed_normalizer) {
    block_mean(positions, values, valid, mean, normalizer, fixed_normalizer);
}

// SoftmaxWithLoss forward for few positions (LeNet's at batch 64) in one block, both steps of the
// two kernels above in one: a kernel less on a training step's critical path.  Every block does
// the whole (one is launched).
template <typename T>
__global__ void softmax_loss_block_kernel(SOFTMAX_LOSS_PARAMS, T* loss, T* normalizer, T fixed_normalizer) {
    const long long threads = (long long)positions * lanes;
    for (long long first = 0; first < threads; first += blockDim.x) {
        softmax_loss_at(first + threadIdx.x, threads, SOFTMAX_LOSS_ARGS);
    }
    __syncthreads();  // the losses and validities, written by this block, are read below
    block_mean(positions, losses, valid, loss, normalizer, fixed_normalizer);
}

// dx = (prob - onehot(label)) * valid * (loss_weight / normalizer), one thread per element.
template <typename T>
__global__ void softmax_loss_backward_kernel(long long count, int classes, int inner, const T* prob,
                                             const T* labels, const T* top_diff, const T* normalizer, T* dx,
                                             int has_ignore, int ignore_label) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        const int c = (int)(i / inner % classes);
        const long long p = i / ((long long)classes * inner) * inner + i % inner;
        const int label = (int)labels[p];
        const bool ok = !(has_ignore && label == ignore_label) && label >= 0 && label < classes;
        T d = prob[i] - T(ok && c == label ? 1 : 0);
        d = d * T(ok ? 1 : 0);
        dx[i] = d * (top_diff[0] / normalizer[0]);
    }
}

// A ReLU of negative slope `slope` where `relu`, as kernels.relu_forward computes it (bit for bit).
template <typename T>
__device__ __forceinline__ T rectified(T v, int relu, T slope) {
    return relu ? (v < T(0) ? T(0) : v) + slope * (v < T(0) ? v : T(0)) : v;
}

// Small products, where cuBLAS's 32x32 and larger tiles mostly idle or it splits k and sums the
// parts in a second kernel (InnerProduct's with few outputs or a small batch: LeNet's ip2 took 10
// us so at batch 64): out[i, j] = sum over q of a[i, q] b[q, j], plus bias[j] where `has_bias`,
// plus the old out[i, j] where `accumulate` (Caffe's GEMM with beta = 1), through a ReLU of negative
// slope `slope` where `relu` (an InnerProduct's in-place ReLU, folded in).  Operands by element
// strides; `lanes` threads per output (a power of two up to 32, consecutive in one warp) take
// q = lane, lane + lanes, ... and combine their sums by xor shuffles, a fixed order: results are
// deterministic.  Grid-stride loop of one trip count per block (as softmax_forward_kernel).
template <typename T>
__global__ void small_gemm_kernel(int m, int n, int k, int lanes, const T* a, long long a_row, long long a_col,
                                  const T* b, long long b_row, long long b_col, const T* bias, int has_bias,
                                  int accumulate, int relu, T slope, T* out) {
    const long long threads = (long long)m * n * lanes;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < threads;
         first += (long long)blockDim.x * gridDim.x) {
        const long long t = first + threadIdx.x;
        const bool live = t < threads;
        const long long o = live ? t / lanes : 0;
        const int lane = (int)(t % lanes), depth = live ? k : 0;
        const T* row = a + o / n * a_row;
        const T* column = b + o % n * b_col;
        T sum = T(0);
#pragma unroll 4
        for (int q = lane; q < depth; q += lanes) sum += row[q * a_col] * column[q * b_row];
        for (int offset = lanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset, lanes);
        if (!live || lane != 0) continue;
        if (has_bias) sum += bias[o % n];
        out[o] = rectified(accumulate ? out[o] + sum : sum, relu, slope);
    }
}

// The sum of split-K products (Blas._split_k): out[o] = the sum over p of products[p * count + o],
// in order of p, plus bias[o % n] where `has_bias`, plus the old out[o] where `accumulate`, through
// a ReLU where `relu` (as small_gemm_kernel).  One thread per output.
template <typename T>
__global__ void sum_parts_kernel(long long count, int parts, int n, const T* products, const T* bias, int has_bias,
                                 int accumulate, int relu, T slope, T* out) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < count;
         o += (long long)blockDim.x * gridDim.x) {
        T sum = products[o];
        for (int p = 1; p < parts; ++p) sum += products[p * count + o];
        if (has_bias) sum += bias[o % n];
        out[o] = rectified(accumulate ? out[o] + sum : sum, relu, slope);
    }
}
