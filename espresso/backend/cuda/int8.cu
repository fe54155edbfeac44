// int8 inference (espresso/compress/int8.py) on the GPU: a 2-D convolution (an InnerProduct is
// one of a 1x1 image) as quantized patches, an int8 GEMM with int32 sums (cuBLAS, tensor cores),
// and a dequantizing pass, computing exactly the integers of the CPU kernels
// (espresso/compress/int8_kernels.py) and their float32 outputs bit for bit.
//
// The CPU multiplies uint8 activations u = clamp(rint(x / scale) + zero, 0, 255) (u = zero in
// the padding); cuBLAS multiplies signed bytes, so the patches hold u - 128 and the output adds
// 128 * sum_k w[m, k] back (`offset`): sum_k w (u - 128) + 128 sum_k w = sum_k w u.
//
// int8_patches_kernel: patches (rows, groups * padded_k) bytes, one 32-bit word (4 bytes along
// k) per thread; row r = (n, oh, ow) of the output (rows past the batch's, padding for cuBLAS,
// are zero), group g's k = (c, i, j) in Caffe's weight order, zero past group_k.
// int8_output_kernel: y (n, m, pixels) float32 from acc (m, rows) int32 (cuBLAS's column-major
// output: channel m's sums contiguous), y = (acc + offset) * scale + (bias - correction) in
// double, as the CPU kernel's (Numba's int32 * float32 is a double).
// Launch: grid-stride loops, one thread per 32-bit word of patches / per output element.
// Assumptions: padded_k a multiple of 16 (a word never straddles two groups); channels, pixels,
// rows and each array's count below 2^31 but the loops' element counts (64-bit).

template <typename T>
__device__ int quantized_minus_128(T v, double inverse, int zero) {
    double q = rint((double)v * inverse) + zero;
    return (int)fmin(fmax(q, 0.0), 255.0) - 128;
}

template <typename T>
__global__ void int8_patches_kernel(long long words, const T* x, double inverse, int zero, int batch,
                                    int channels, int height, int width, int out_h, int out_w, int kh, int kw,
                                    int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                                    int dilation_w, int groups, int group_k, int padded_k, int* patches) {
    long long row_words = (long long)groups * padded_k / 4;
    int group_channels = channels / groups, taps = kh * kw;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words;
         i += (long long)blockDim.x * gridDim.x) {
        long long row = i / row_words;
        int first = (int)(i % row_words) * 4, g = first / padded_k;
        int n = (int)(row / (out_h * out_w)), pixel = (int)(row % (out_h * out_w));
        int h0 = (pixel / out_w) * stride_h - pad_h, w0 = (pixel % out_w) * stride_w - pad_w;
        unsigned int word = 0;
        for (int t = 0; t < 4; ++t) {
            int k = first % padded_k + t, value = 0;
            if (n < batch && k < group_k) {
                int c = g * group_channels + k / taps, h = h0 + (k % taps) / kw * dilation_h,
                    w = w0 + (k % kw) * dilation_w;
                value = zero - 128;
                if (h >= 0 && h < height && w >= 0 && w < width)
                    value = quantized_minus_128(x[(((long long)n * channels + c) * height + h) * width + w],
                                                inverse, zero);
            }
            word |= ((unsigned int)value & 0xFFu) << (8 * t);
        }
        patches[i] = (int)word;
    }
}

template <typename T>
__global__ void int8_output_kernel(long long count, const int* acc, long long rows, int channels_out, int pixels,
                                   const int* offset, const T* scale, const T* bias, const T* correction, T* y) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        int m = (int)(i / pixels % channels_out);
        long long n = i / ((long long)pixels * channels_out), p = i % pixels;
        int sum = acc[m * rows + n * pixels + p] + offset[m];
        y[i] = T((double)sum * (double)scale[m] + (double)(bias[m] - correction[m]));
    }
}
