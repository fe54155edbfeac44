// Pooling (MAX, AVE, STOCHASTIC) over D = 1..3 spatial axes, with the semantics of
// espresso/backend/cpu/kernels.py (Caffe's):
//   x, dx (N, C, *size) and y, dy, mask (N, C, *out), C-contiguous, one window per output:
//   start_i = o_i*stride_i - pad_i, cells [max(start, 0), min(start + kernel, size)).
//   MAX: the first maximum in scan order (last axis fastest) of the cells above -FLT_MAX (NaN
//     never is); mask (int or float type M) gets its flat index into the unpadded input plane
//     (h*W + w in 2-D), or -1 (and y -FLT_MAX) where no cell is, as Caffe.  Padding is never
//     picked; backward drops mask -1.
//   AVE: window sum over Caffe's divisor, the window clipped to [-pad, size + pad).
//   STOCHASTIC (no padding): TRAIN picks the first cell whose running sum reaches rand * sum;
//     TEST gives sum(x^2) / sum(x), or 0 where sum(x) <= 0.
// Forward kernels: one thread per output element.  Backward kernels: one thread per input
// element, gathering from the outputs whose windows hold it (no atomics, deterministic, dx is
// overwritten); MAX's where windows never overlap: one thread per output, writing its one cell
// of dx zeroed first (deterministic too).  Sums run in scan order, as the CPU's do.
// Launch: 1-D grid of 1-D blocks, any sizes (grid-stride loops).
// Assumptions (checked by kernels.py): C-contiguous arrays, float type T for the data, every
// element count < 2^31, unused axes of the geometry padded with size/kernel/stride/out 1, pad 0.

struct Geometry {
    int size[3], kernel[3], stride[3], pad[3], out[3];
};

#define GEOMETRY_PARAMS                                                                   \
    int size0, int size1, int size2, int kernel0, int kernel1, int kernel2, int stride0,  \
        int stride1, int stride2, int pad0, int pad1, int pad2, int out0, int out1, int out2

#define GEOMETRY_INIT(g)                                                                   \
    Geometry g = {{size0, size1, size2},       {kernel0, kernel1, kernel2},                \
                  {stride0, stride1, stride2}, {pad0, pad1, pad2},                         \
                  {out0, out1, out2}}

#define GRID_STRIDE_LOOP(i, count)                                                         \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count);      \
         i += (long long)blockDim.x * gridDim.x)

// FLT_MAX: MAX pooling's running maximum starts at -FLT_MAX (also in double), as Caffe's.
#define ESPRESSO_FLT_MAX 3.40282346638528859812e+38f

// Elements in one (n, c) plane of the input and of the output.
template <int D>
__device__ __forceinline__ void plane_sizes(const Geometry& g, int& plane, int& outs) {
    plane = 1;
    outs = 1;
#pragma unroll
    for (int a = 0; a < D; ++a) {
        plane *= g.size[a];
        outs *= g.out[a];
    }
}

// The window of flat output index o: its unclipped start and its cells clipped to the input.
template <int D>
__device__ __forceinline__ void window(const Geometry& g, int o, int* start, int* lo, int* hi) {
#pragma unroll
    for (int a = D - 1; a >= 0; --a) {
        start[a] = (o % g.out[a]) * g.stride[a] - g.pad[a];
        o /= g.out[a];
        lo[a] = start[a] > 0 ? start[a] : 0;
        hi[a] = start[a] + g.kernel[a] < g.size[a] ? start[a] + g.kernel[a] : g.size[a];
    }
}

// Calls visit(flat index) for the cells of the box [lo, hi) of a grid `extent`, in scan order
// (last axis fastest), until visit returns true.
template <int D, typename Visit>
__device__ __forceinline__ void for_each_cell(const int* lo, const int* hi, const int* extent,
                                              Visit visit) {
    int cell[3];
#pragma unroll
    for (int a = 0; a < D; ++a) {
        if (lo[a] >= hi[a]) return;  // an empty box
        cell[a] = lo[a];
    }
    while (true) {
        int flat = 0;
#pragma unroll
        for (int a = 0; a < D; ++a) flat = flat * extent[a] + cell[a];
        if (visit(flat)) return;
        int a = D - 1;
        for (; a >= 0; --a) {  // advance the odometer
            if (++cell[a] < hi[a]) break;
            cell[a] = lo[a];
        }
        if (a < 0) return;
    }
}

// The flat input index of a (possibly outside) position, as the CPU computes it: sum pos * pitch.
template <int D>
__device__ __forceinline__ int flat_position(const Geometry& g, const int* pos) {
    int flat = 0;
#pragma unroll
    for (int a = 0; a < D; ++a) flat = flat * g.size[a] + pos[a];
    return flat;
}

template <typename T, typename M, int D>
__global__ void max_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                        M* __restrict__ mask, int count, GEOMETRY_PARAMS) {
    GEOMETRY_INIT(g);
    int plane, outs;
    plane_sizes<D>(g, plane, outs);
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int start[3], lo[3], hi[3];
        window<D>(g, i % outs, start, lo, hi);
        const T* src = x + (long long)(i / outs) * plane;
        T best = T(-ESPRESSO_FLT_MAX);
        int arg = -1;  // stays -1 where no cell exceeds -FLT_MAX (all -inf or NaN), as Caffe
        for_each_cell<D>(lo, hi, g.size, [&](int flat) {
            T v = src[flat];
            if (v > best) {  // strictly: the first maximum in scan order wins
                best = v;
                arg = flat;
            }
            return false;
        });
        y[index] = best;
        mask[index] = M(arg);
    }
}

// dx = dy routed to the input cells `mask` names, summed over overlapping windows (MAX, and
// STOCHASTIC with pad 0).
template <typename T, typename M, int D>
__global__ void pool_route_backward_kernel(const T* __restrict__ dy, const M* __restrict__ mask,
                                           T* __restrict__ dx, int count, GEOMETRY_PARAMS) {
    GEOMETRY_INIT(g);
    int plane, outs;
    plane_sizes<D>(g, plane, outs);
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int s = i % plane, lo[3], hi[3];
        for (int a = D - 1, rest = s; a >= 0; --a) {  // the outputs whose windows hold s
            int p = rest % g.size[a] + g.pad[a];
            rest /= g.size[a];
            lo[a] = p < g.kernel[a] ? 0 : (p - g.kernel[a]) / g.stride[a] + 1;
            hi[a] = p / g.stride[a] + 1 < g.out[a] ? p / g.stride[a] + 1 : g.out[a];
        }
        long long base = (long long)(i / plane) * outs;
        T sum = T(0);
        for_each_cell<D>(lo, hi, g.out, [&](int o) {
            if ((long long)mask[base + o] == s) sum += dy[base + o];
            return false;
        });
        dx[index] = sum;
    }
}

// MAX backward where windows never overlap (stride >= kernel on every axis): at most one output
// picks each input cell, so each output writes its gradient to the cell it picked, one thread per
// output, into dx the caller zeroed.  Mask -1 (a window that picked no cell) is dropped.
template <typename T, typename M>
__global__ void pool_scatter_backward_kernel(const T* __restrict__ dy, const M* __restrict__ mask,
                                             T* __restrict__ dx, int count, int outs, int plane) {
    GRID_STRIDE_LOOP(index, count) {
        const long long cell = (long long)mask[index];
        if (cell >= 0 && cell < plane) dx[index / outs * plane + cell] = dy[index];
    }
}

// MAX backward where 2-D windows tile the input exactly (stride = kernel, no padding, each cell in
// one window: LeNet's pools): one thread per output writes its whole window, its gradient to the
// cell it picked (none for mask -1) and 0 to the others, so dx needs no zeroing first.
template <typename T, typename M>
__global__ void pool_tile_backward_kernel(const T* __restrict__ dy, const M* __restrict__ mask,
                                          T* __restrict__ dx, int count, int out_h, int out_w, int kernel_h,
                                          int kernel_w) {
    const int width = out_w * kernel_w, plane = out_h * kernel_h * width;
    GRID_STRIDE_LOOP(index, count) {
        const int i = (int)index, x = i % out_w, y = i / out_w % out_h;
        const long long picked = (long long)mask[index], first = (long long)(i / (out_w * out_h)) * plane;
        const T gradient = dy[index];
        for (int r = 0; r < kernel_h; ++r) {
            for (int c = 0; c < kernel_w; ++c) {
                const int cell = (y * kernel_h + r) * width + x * kernel_w + c;
                dx[first + cell] = cell == picked ? gradient : T(0);
            }
        }
    }
}

// Caffe's AVE divisor of the window at `start`: its extent clipped to [-pad, size + pad).
template <int D>
__device__ __forceinline__ int ave_divisor(const Geometry& g, const int* start) {
    int divisor = 1;
#pragma unroll
    for (int a = 0; a < D; ++a) {
        int end = start[a] + g.kernel[a];
        int limit = g.size[a] + g.pad[a];
        divisor *= (end < limit ? end : limit) - start[a];
    }
    return divisor;
}

template <typename T, int D>
__global__ void ave_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int count,
                                        GEOMETRY_PARAMS) {
    GEOMETRY_INIT(g);
    int plane, outs;
    plane_sizes<D>(g, plane, outs);
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int start[3], lo[3], hi[3];
        window<D>(g, i % outs, start, lo, hi);
        const T* src = x + (long long)(i / outs) * plane;
        T sum = T(0);
        for_each_cell<D>(lo, hi, g.size, [&](int flat) {
            sum += src[flat];
            return false;
        });
        y[index] = sum / T(ave_divisor<D>(g, start));
    }
}

template <typename T, int D>
__global__ void ave_pool_backward_kernel(const T* __restrict__ dy, T* __restrict__ dx, int count,
                                         GEOMETRY_PARAMS) {
    GEOMETRY_INIT(g);
    int plane, outs;
    plane_sizes<D>(g, plane, outs);
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int s = i % plane, lo[3], hi[3];
        for (int a = D - 1, rest = s; a >= 0; --a) {
            int p = rest % g.size[a] + g.pad[a];
            rest /= g.size[a];
            lo[a] = p < g.kernel[a] ? 0 : (p - g.kernel[a]) / g.stride[a] + 1;
            hi[a] = p / g.stride[a] + 1 < g.out[a] ? p / g.stride[a] + 1 : g.out[a];
        }
        long long base = (long long)(i / plane) * outs;
        T sum = T(0);
        for_each_cell<D>(lo, hi, g.out, [&](int o) {
            int start[3];
            for (int a = D - 1, rest = o; a >= 0; --a) {
                start[a] = (rest % g.out[a]) * g.stride[a] - g.pad[a];
                rest /= g.out[a];
            }
            sum += dy[base + o] / T(ave_divisor<D>(g, start));
            return false;
        });
        dx[index] = sum;
    }
}

// STOCHASTIC, TRAIN (pad must be 0): the first cell whose running sum reaches rand * (window
// sum); where none does (negative inputs), the last cell of the unclipped window, reading 0
// past the input, as the CPU version.
template <typename T, typename M, int D>
__global__ void stochastic_pool_forward_train_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                     M* __restrict__ index_out,
                                                     const T* __restrict__ rand, int count,
                                                     GEOMETRY_PARAMS) {
    GEOMETRY_INIT(g);
    int plane, outs;
    plane_sizes<D>(g, plane, outs);
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int start[3], lo[3], hi[3];
        window<D>(g, i % outs, start, lo, hi);
        const T* src = x + (long long)(i / outs) * plane;
        T total = T(0);
        for_each_cell<D>(lo, hi, g.size, [&](int flat) {
            total += src[flat];
            return false;
        });
        T threshold = rand[index] * total;
        T running = T(0), value = T(0);
        int pick = -1;
        for_each_cell<D>(lo, hi, g.size, [&](int flat) {
            running += src[flat];
            if (running >= threshold) {
                pick = flat;
                value = src[flat];
                return true;
            }
            return false;
        });
        if (pick < 0) {
            int last[3];
            bool inside = true;
#pragma unroll
            for (int a = 0; a < D; ++a) {
                last[a] = start[a] + g.kernel[a] - 1;
                inside = inside && last[a] < g.size[a];
            }
            pick = flat_position<D>(g, last);
            value = inside ? src[pick] : T(0);
        }
        y[index] = value;
        index_out[index] = M(pick);
    }
}

// STOCHASTIC, TEST (pad must be 0): sum(x^2) / sum(x) over the window, 0 where sum(x) <= 0.
template <typename T, int D>
__global__ void stochastic_pool_forward_test_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                    int count, GEOMETRY_PARAMS) {
    GEOMETRY_INIT(g);
    int plane, outs;
    plane_sizes<D>(g, plane, outs);
    GRID_STRIDE_LOOP(index, count) {
        int i = (int)index;
        int start[3], lo[3], hi[3];
        window<D>(g, i % outs, start, lo, hi);
        const T* src = x + (long long)(i / outs) * plane;
        T sums = T(0), squares = T(0);
        for_each_cell<D>(lo, hi, g.size, [&](int flat) {
            T v = src[flat];
            sums += v;
            squares += v * v;
            return false;
        });
        y[index] = sums > T(0) ? squares / sums : T(0);
    }
}
