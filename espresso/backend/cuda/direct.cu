// Direct 2-D convolution forward, bias included: y = conv(x, w) + bias in one kernel, for the
// small convolutions where cuDNN's launches and transforms cost more than the arithmetic (LeNet
// at batch 1: conv2's FFT takes five kernels and the bias a sixth).  The layer times it against
// cuDNN and im2col + GEMM and keeps it only where it is the fastest (espresso/layers/vision.py).
//   x (N, C, H, W), w (M, C/groups, KH, KW), bias (M) or null, y (N, M, OH, OW), C-contiguous;
//   output (n, m, oy, ox) sums w[m, c, ky, kx] * x[n, g*C/groups + c, oy*sh - ph + ky*dh,
//   ox*sw - pw + kx*dw] over the taps (c, ky, kx) inside the image (padding reads as zero).
// Launch: each thread group computes FILTERS neighbouring filters of one group at one output
// position (each image read serves them all); `lanes` consecutive threads (a power of two, at
// most 32: one warp's part) share such a group.  Lane l sums the taps l, l + lanes, ... in order
// (taps flattened as a row of w), then the lanes' sums are added by shuffles in a fixed tree: for
// given shapes the result is deterministic (the lanes, and so the order of the sums, follow the
// number of positions: another batch size may round differently).  Neighbouring groups take
// neighbouring positions: the weight reads are broadcasts, the image reads nearly coalesced.
// More lanes split long sums when there are too few outputs to fill the GPU.  Each block first
// writes where each tap reads (relative to the window's corner) into shared memory, TABLE taps
// at a time, so the sum's loop has no divisions or branches and issues several loads at once.
// Grid-stride loop whose trip count is the same for every thread of a block (the shuffles and
// barriers need it).
// Assumptions (checked by kernels.py): every element count and the thread count below 2^31.

#define TABLE 1024    // taps per shared-memory table (16 KB)
#define FILTERS 4     // filters per thread

template <typename T>
__global__ void conv_forward_kernel(int positions, int lanes, const T* __restrict__ x, const T* __restrict__ w,
                                    const T* __restrict__ bias, T* __restrict__ y, int channels, int height,
                                    int width, int filters, int out_h, int out_w, int kernel_h, int kernel_w,
                                    int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                                    int dilation_w, int groups) {
    __shared__ int4 table[TABLE];  // a tap's (offset, row, column) from the window's corner
    const int group_channels = channels / groups, group_filters = filters / groups;
    const int taps = group_channels * kernel_h * kernel_w, taps_per_channel = kernel_h * kernel_w;
    const int pixels = out_h * out_w, blocks = (group_filters + FILTERS - 1) / FILTERS;  // per group
    const long long threads = (long long)positions * lanes;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < threads;
         first += (long long)blockDim.x * gridDim.x) {
        const long long t = first + threadIdx.x;
        const bool live = t < threads;
        // position p = ((n * groups + group) * blocks + block) * pixels + pixel
        const int p = live ? (int)(t / lanes) : 0, lane = (int)(t % lanes), pixel = p % pixels;
        const int block = p / pixels % blocks, group = p / (pixels * blocks) % groups, n = p / (pixels * blocks * groups);
        const int ox = pixel % out_w, oy = pixel / out_w, top = oy * stride_h - pad_h, left = ox * stride_w - pad_w;
        const T* image = x + ((long long)n * channels + (long long)group * group_channels) * height * width;
        const long long corner = (long long)top * width + left;
        const T* rows[FILTERS];  // past the group's last filter: its last one again (not stored)
        for (int f = 0; f < FILTERS; ++f)
            rows[f] = w + (long long)(group * group_filters + min(block * FILTERS + f, group_filters - 1)) * taps;
        T sums[FILTERS];
        for (int f = 0; f < FILTERS; ++f) sums[f] = T(0);
        for (int chunk = 0; chunk < taps; chunk += TABLE) {
            const int count = min(TABLE, taps - chunk);
            __syncthreads();  // (the last chunk's reads are done)
            for (int k = threadIdx.x; k < count; k += blockDim.x) {
                const int c = (chunk + k) / taps_per_channel, r = (chunk + k) % taps_per_channel;
                const int dy = r / kernel_w * dilation_h, dx = r % kernel_w * dilation_w;
                table[k] = make_int4((c * height + dy) * width + dx, dy, dx, 0);
            }
            __syncthreads();
            if (!live) continue;
#pragma unroll 2
            for (int k = lane; k < count; k += lanes) {
                const int4 tap = table[k];
                const bool inside = (unsigned)(top + tap.y) < (unsigned)height && (unsigned)(left + tap.z) < (unsigned)width;
                const T v = inside ? image[corner + tap.x] : T(0);
#pragma unroll
                for (int f = 0; f < FILTERS; ++f) sums[f] += rows[f][chunk + k] * v;
            }
        }
#pragma unroll
        for (int f = 0; f < FILTERS; ++f) {
            for (int offset = lanes / 2; offset > 0; offset /= 2)
                sums[f] += __shfl_down_sync(0xffffffffu, sums[f], offset, lanes);
            const int m = group * group_filters + block * FILTERS + f;
            if (live && lane == 0 && block * FILTERS + f < group_filters)
                y[((long long)n * filters + m) * pixels + pixel] = bias ? sums[f] + bias[m] : sums[f];
        }
    }
}

// Direct 2-D convolution weight and bias gradients for filters of few taps (at most GRAD_TAPS:
// a first layer's, as LeNet's conv1 of 25), where cuDNN ran four FFT kernels and a GEMV:
//   dw[m, c, ky, kx] += sum over (n, oy, ox) of dy[n, m, oy, ox] * x[n, g*C/groups + c, iy, ix]
//   db[m] += sum of dy[n, m, oy, ox]  (when db is not null)
// Two kernels.  conv_grad_parts_kernel: block b = (slice s, filter m) sums the output positions
// of slice s (slices of `per_slice` consecutive flat (n, oy, ox) positions), each thread holding
// every tap's sum (and the bias's) in registers over its positions, then the block adds them:
// shuffles within each warp, then the warps in order; parts[s, m, k] gets the result (k = taps:
// the bias).  conv_grad_sum_kernel: one thread per (m, k) adds the slices' parts in order into
// dw (or db).  Fixed orders throughout: deterministic.  Blocks of a multiple of 32 threads up to
// 1024 (the shuffles take whole warps), or of one thread (no shuffles); the
// block loop is grid-stride (any grid).

#define GRAD_TAPS 32

template <typename T>
__global__ void conv_grad_parts_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ parts,
                                       long long positions, int slices, int per_slice, int channels, int height,
                                       int width, int filters, int out_h, int out_w, int kernel_h, int kernel_w,
                                       int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                                       int dilation_w, int groups) {
    __shared__ int4 table[GRAD_TAPS];  // a tap's (offset, row, column) from the window's corner
    __shared__ T warp_sums[32][GRAD_TAPS + 1];
    const int group_channels = channels / groups, taps = group_channels * kernel_h * kernel_w;
    const int pixels = out_h * out_w, warps = (blockDim.x + 31) / 32, lane = threadIdx.x % 32;
    for (int k = threadIdx.x; k < taps; k += blockDim.x) {
        const int c = k / (kernel_h * kernel_w), r = k % (kernel_h * kernel_w);
        const int row = r / kernel_w * dilation_h, column = r % kernel_w * dilation_w;
        table[k] = make_int4((c * height + row) * width + column, row, column, 0);
    }
    __syncthreads();
    for (int b = blockIdx.x; b < slices * filters; b += gridDim.x) {
        const int s = b / filters, m = b % filters, group = m / (filters / groups);
        T sums[GRAD_TAPS + 1];
#pragma unroll
        for (int k = 0; k <= GRAD_TAPS; ++k) sums[k] = T(0);
        const long long end = min(positions, (long long)(s + 1) * per_slice);
        for (long long q = (long long)s * per_slice + threadIdx.x; q < end; q += blockDim.x) {
            const int n = (int)(q / pixels), pixel = (int)(q % pixels);  // q: flat (n, oy, ox)
            const T g = dy[((long long)n * filters + m) * pixels + pixel];
            const int top = pixel / out_w * stride_h - pad_h, left = pixel % out_w * stride_w - pad_w;
            const T* image = x + ((long long)n * channels + (long long)group * group_channels) * height * width;
            const long long corner = (long long)top * width + left;
#pragma unroll
            for (int k = 0; k < GRAD_TAPS; ++k) {
                if (k >= taps) break;
                const int4 tap = table[k];
                const bool inside = (unsigned)(top + tap.y) < (unsigned)height && (unsigned)(left + tap.z) < (unsigned)width;
                sums[k] += g * (inside ? image[corner + tap.x] : T(0));
            }
            sums[GRAD_TAPS] += g;
        }
#pragma unroll
        for (int k = 0; k <= GRAD_TAPS; ++k) {  // within each warp (none in a block of one thread)
            for (int offset = (blockDim.x < 32 ? blockDim.x : 32) / 2; offset > 0; offset /= 2)
                sums[k] += __shfl_down_sync(0xffffffffu, sums[k], offset);
            if (lane == 0) warp_sums[threadIdx.x / 32][k] = sums[k];
        }
        __syncthreads();
        for (int k = threadIdx.x; k <= taps; k += blockDim.x) {  // then the warps, in order
            T total = T(0);
            for (int w = 0; w < warps; ++w) total += warp_sums[w][k < taps ? k : GRAD_TAPS];
            parts[((long long)s * filters + m) * (taps + 1) + k] = total;
        }
        __syncthreads();  // (before the next block's pass rewrites warp_sums)
    }
}

template <typename T>
__global__ void conv_grad_sum_kernel(const T* __restrict__ parts, T* __restrict__ dw, T* __restrict__ db,
                                     int slices, int filters, int taps) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < filters * (taps + 1); i += blockDim.x * gridDim.x) {
        const int m = i / (taps + 1), k = i % (taps + 1);
        T total = T(0);
        for (int s = 0; s < slices; ++s) total += parts[((long long)s * filters + m) * (taps + 1) + k];
        if (k < taps)
            dw[(long long)m * taps + k] += total;
        else if (db)
            db[m] += total;
    }
}
