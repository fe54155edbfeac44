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
// too few outputs to fill the GPU.  Grid-stride loop whose trip count is the same for every
// thread of a block (the shuffles need whole warps).
// Assumptions (checked by kernels.py): every element count and outputs * lanes below 2^31.

template <typename T>
__global__ void conv_forward_kernel(int outputs, int lanes, const T* __restrict__ x, const T* __restrict__ w,
                                    const T* __restrict__ bias, T* __restrict__ y, int channels, int height,
                                    int width, int filters, int out_h, int out_w, int kernel_h, int kernel_w,
                                    int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                                    int dilation_w, int groups) {
    const int group_channels = channels / groups, taps = group_channels * kernel_h * kernel_w;
    const int taps_per_channel = kernel_h * kernel_w, pixels = out_h * out_w;
    const long long threads = (long long)outputs * lanes;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < threads;
         first += (long long)blockDim.x * gridDim.x) {
        const long long t = first + threadIdx.x;
        const int o = (int)(t / lanes), lane = (int)(t % lanes);
        T sum = T(0);
        if (t < threads) {
            const int ox = o % out_w, oy = (o / out_w) % out_h, m = (o / pixels) % filters;
            const int n = o / (pixels * filters), group = m / (filters / groups);
            const T* image = x + ((long long)n * channels + (long long)group * group_channels) * height * width;
            const T* row = w + (long long)m * taps;
            const int top = oy * stride_h - pad_h, left = ox * stride_w - pad_w;
            int c = lane / taps_per_channel, ky = lane % taps_per_channel / kernel_w, kx = lane % kernel_w;
            for (int k = lane; k < taps; k += lanes) {
                const int iy = top + ky * dilation_h, ix = left + kx * dilation_w;
                if (iy >= 0 && iy < height && ix >= 0 && ix < width)
                    sum += row[k] * image[((long long)c * height + iy) * width + ix];
                for (kx += lanes; kx >= kernel_w; kx -= kernel_w)  // the next tap: carry (kx, ky, c)
                    if (++ky == kernel_h) {
                        ky = 0;
                        ++c;
                    }
            }
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset, lanes);
        if (t < threads && lane == 0) y[o] = bias ? sum + bias[o / pixels % filters] : sum;
    }
}
