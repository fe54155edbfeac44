// Direct 2-D convolution forward, bias included: y = conv(x, w) + bias in one kernel, for the
// small convolutions where cuDNN's launches and transforms cost more than the arithmetic (LeNet
// at batch 1: conv2's FFT takes five kernels and the bias a sixth).  The layer times it against
// cuDNN and im2col + GEMM and keeps it only where it is the fastest (espresso/layers/vision.py).
//   x (N, C, H, W), w (M, C/groups, KH, KW), bias (M) or null, y (N, M, OH, OW), C-contiguous;
//   output (n, m, oy, ox) sums w[m, c, ky, kx] * x[n, g*C/groups + c, oy*sh - ph + ky*dh,
//   ox*sw - pw + kx*dw] over the taps (c, ky, kx) inside the image (padding reads as zero).
// Launch: `lanes` consecutive threads (a power of two, at most 32: one warp's part) share an
// output.  Lane l sums the taps l, l + lanes, l + 2 lanes, ... in order (taps flattened as a row
// of w), then the lanes' sums are added by shuffles in a fixed tree: results are deterministic.
// One lane: neighbouring threads take neighbouring outputs of one filter, so the weight read is
// a broadcast and the image reads nearly coalesced; more lanes split long sums when there are
// too few outputs to fill the GPU.  Each block first writes where each tap reads (relative to
// the window's corner) into shared memory, TABLE taps at a time, so the sum's loop has no
// divisions and no branches and its loads can be issued several at once.  Grid-stride loop
// whose trip count is the same for every thread of a block (the shuffles and barriers need it).
// Assumptions (checked by kernels.py): every element count and outputs * lanes below 2^31.

#define TABLE 1024  // taps per shared-memory table: 12 KB

template <typename T>
__global__ void conv_forward_kernel(int outputs, int lanes, const T* __restrict__ x, const T* __restrict__ w,
                                    const T* __restrict__ bias, T* __restrict__ y, int channels, int height,
                                    int width, int filters, int out_h, int out_w, int kernel_h, int kernel_w,
                                    int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                                    int dilation_w, int groups) {
    __shared__ int tap_offset[TABLE], tap_y[TABLE], tap_x[TABLE];
    const int group_channels = channels / groups, taps = group_channels * kernel_h * kernel_w;
    const int taps_per_channel = kernel_h * kernel_w, pixels = out_h * out_w;
    const long long threads = (long long)outputs * lanes;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < threads;
         first += (long long)blockDim.x * gridDim.x) {
        const long long t = first + threadIdx.x;
        const bool live = t < threads;
        const int o = live ? (int)(t / lanes) : 0, lane = (int)(t % lanes);
        const int ox = o % out_w, oy = (o / out_w) % out_h, m = (o / pixels) % filters;
        const int n = o / (pixels * filters), group = m / (filters / groups);
        const T* image = x + ((long long)n * channels + (long long)group * group_channels) * height * width;
        const T* row = w + (long long)m * taps;
        const int top = oy * stride_h - pad_h, left = ox * stride_w - pad_w;
        const long long corner = (long long)top * width + left;
        T sum = T(0);
        for (int chunk = 0; chunk < taps; chunk += TABLE) {
            const int count = min(TABLE, taps - chunk);
            __syncthreads();  // (the last chunk's reads are done)
            for (int k = threadIdx.x; k < count; k += blockDim.x) {
                const int c = (chunk + k) / taps_per_channel, r = (chunk + k) % taps_per_channel;
                tap_y[k] = r / kernel_w * dilation_h;
                tap_x[k] = r % kernel_w * dilation_w;
                tap_offset[k] = (c * height + tap_y[k]) * width + tap_x[k];
            }
            __syncthreads();
            if (!live) continue;
#pragma unroll 4
            for (int k = lane; k < count; k += lanes) {
                const int iy = top + tap_y[k], ix = left + tap_x[k];
                const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
                sum += row[chunk + k] * (inside ? image[corner + tap_offset[k]] : T(0));
            }
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset, lanes);
        if (live && lane == 0) y[o] = bias ? sum + bias[m] : sum;
    }
}
