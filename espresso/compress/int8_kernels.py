"""The CPU kernels of int8 inference (Numba): quantizing activations to uint8, im2col of a
quantized image, the int8 GEMM with int32 accumulation, and dequantizing into float32 tops.

The GEMM is acc[n, m] = sum over k of x[n, k] * w[m, k], x uint8 activations (K contiguous,
padded to a multiple of 4), w int8 weights.  On CPUs with AVX-512 VNNI it runs on the
`vpdpbusd` instruction (64 multiply-adds of u8 x s8 into 16 int32 lanes), emitted through a
Numba intrinsic because LLVM does not vectorize a plain int8 dot product into it (it stops at
16-bit `vpmaddwd`); weights are packed once as [M/16][K/4][16][4] so one 64-byte load holds 16
output channels x 4 values of k, and each step broadcasts 4 bytes of one activation row.
Elsewhere a plain int32 loop computes the same (exact) result, slower.  Serial on purpose, as
espresso/backend/cpu/fast.py explains; measured against OpenBLAS sgemm on LeNet's shapes on a
Zen 4 core: 2.1-4.6x faster (benchmarks/int8.py).
"""

import functools
import math

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni"))
ROWS = 8  # activation rows per VNNI micro-kernel call: 8 accumulators of 16 lanes
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)


def _micro_kernel(rows):
    """An intrinsic: acc[j, 0:16] = w block (16 channels, all k) . x[j, :] for `rows` rows j,
    with w, x, acc flat arrays and their offsets and row strides given."""

    @intrinsic
    def kernel(typingctx, w, w_at, x, x_at, x_stride, acc, acc_at, acc_stride, k4):
        sig = types.void(w, w_at, x, x_at, x_stride, acc, acc_at, acc_stride, k4)

        def codegen(context, builder, signature, args):
            def data(k):
                return context.make_array(signature.args[k])(context, builder, args[k]).data

            w_at, x_at, x_stride, acc_at, acc_stride, k4 = (builder.sext(args[k], _I64) if args[k].type.width < 64
                                                            else args[k] for k in (1, 3, 4, 6, 7, 8))
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            w0, x0, acc0 = builder.gep(data(0), [w_at]), builder.gep(data(2), [x_at]), builder.gep(data(5), [acc_at])
            module = builder.module
            dot = module.globals.get("llvm.x86.avx512.vpdpbusd.512") or ir.Function(
                module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512")
            entry, loop, done = builder.block, builder.append_basic_block("k"), builder.append_basic_block("done")
            builder.branch(loop)
            builder.position_at_end(loop)
            step = builder.phi(_I64)
            step.add_incoming(const(0), entry)
            sums = [builder.phi(_V16) for _ in range(rows)]
            for s in sums:
                s.add_incoming(ir.Constant(_V16, None), entry)
            weights = builder.load(builder.bitcast(builder.gep(w0, [builder.mul(step, const(64))]),
                                                   _V16.as_pointer()), align=1)
            new = []
            for j in range(rows):  # 4 bytes of row j, broadcast to the 16 lanes
                at = builder.add(builder.mul(const(j), x_stride), builder.mul(step, const(4)))
                four = builder.load(builder.bitcast(builder.gep(x0, [at]), _I32.as_pointer()), align=1)
                lanes = builder.insert_element(ir.Constant(_V16, ir.Undefined), four, ir.Constant(_I32, 0))
                lanes = builder.shuffle_vector(lanes, ir.Constant(_V16, ir.Undefined), ir.Constant(_V16, [0] * 16))
                new.append(builder.call(dot, [sums[j], lanes, weights]))
            following = builder.add(step, const(1))
            step.add_incoming(following, builder.block)
            for s, n in zip(sums, new):
                s.add_incoming(n, builder.block)
            builder.cbranch(builder.icmp_signed("<", following, k4), loop, done)
            builder.position_at_end(done)
            for j in range(rows):
                out = builder.gep(acc0, [builder.mul(const(j), acc_stride)])
                builder.store(new[j], builder.bitcast(out, _V16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


@numba.njit(nogil=True, cache=True)
def plain_gemm(packed, x, acc):
    """acc[n, m] = x[n] . w[m] (packed = plain_pack(w)), in plain int32 loops: any CPU."""
    for r in range(x.shape[0]):
        for m in range(packed.shape[0]):
            total = np.int32(0)
            for k in range(packed.shape[1]):
                total = np.int32(total + np.int32(x[r, k]) * np.int32(packed[m, k]))
            acc[r, m] = total


def plain_pack(w):
    """int8 weights (M, K) -> (M, K padded to 4)."""
    padded = np.zeros((w.shape[0], -(-w.shape[1] // 4) * 4), np.int8)
    padded[:, :w.shape[1]] = w
    return padded


def vnni_pack(w):
    """int8 weights (M, K) -> (M/16, K/4, 16, 4), zero-padded, 64-byte aligned."""
    blocks = -(-w.shape[0] // 16)
    padded = np.zeros((blocks * 16, plain_pack(w).shape[1]), np.int8)
    padded[:w.shape[0], :w.shape[1]] = w
    out = aligned((blocks, padded.shape[1] // 4, 16, 4), np.int8)
    out[...] = padded.reshape(blocks, 16, -1, 4).transpose(0, 2, 1, 3)
    return out


def aligned(shape, dtype, alignment=64):
    """An empty array whose data starts on a cache line: NumPy's own start 16 bytes into one as
    often as not, and then every 64-byte load of packed weights or store of the accumulator
    straddles two lines (LeNet-300-100 at batch 1 took 27 instead of 17 us, by the process)."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + size].view(dtype).reshape(shape)


if VNNI:
    _block_rows, _block_row = _micro_kernel(ROWS), _micro_kernel(1)

    @numba.njit(nogil=True, cache=True)
    def vnni_gemm(packed, x, acc):
        """acc[n, :16*blocks] = x[n] . w for every row n (packed = vnni_pack(w))."""
        n, blocks, k4 = x.shape[0], packed.shape[0], packed.shape[1]
        w, xs, out = packed.ravel(), x.ravel(), acc.ravel()
        x_stride, acc_stride, full = x.shape[1], acc.shape[1], n // ROWS * ROWS
        for b in range(blocks):
            for r in range(0, full, ROWS):
                _block_rows(w, b * k4 * 64, xs, r * x_stride, x_stride, out, r * acc_stride + 16 * b, acc_stride, k4)
            for r in range(full, n):
                _block_row(w, b * k4 * 64, xs, r * x_stride, x_stride, out, r * acc_stride + 16 * b, acc_stride, k4)

    gemm, pack = vnni_gemm, vnni_pack
else:
    gemm, pack = plain_gemm, plain_pack


def padded_k(packed):
    """The padded K of packed weights (the width of the activation rows)."""
    return packed.shape[1] * (4 if packed.ndim == 4 else 1)


def acc_columns(m):
    """Columns of the accumulator for m output channels (whole blocks of 16)."""
    return -(-m // 16) * 16


@numba.njit(nogil=True, cache=True)
def _quantize(v, inverse, zero):
    q = np.rint(v * inverse) + zero
    return np.uint8(min(max(q, 0.0), 255.0))


@numba.njit(nogil=True, cache=True)
def inner_product(x, inverse, zero, xq, packed, acc, scale, bias, correction, relu, y):
    """y (n, m) = dequantized (quantized x (n, k) . w) + bias - correction (the zero point's
    share), ReLU'd where `relu`."""
    n, k = x.shape
    for r in range(n):
        for c in range(k):
            xq[r, c] = _quantize(x[r, c], inverse, zero)
    gemm(packed, xq, acc)
    for r in range(n):
        for c in range(y.shape[1]):
            v = acc[r, c] * scale[c] + (bias[c] - correction[c])
            y[r, c] = max(v, 0.0) if relu else v


@numba.njit(nogil=True, cache=True)
def inner_product_chain(first, x, inverses, zeros, quantized, packed, accs, scales, biases, corrections, relus, ys):
    """The inner products first.. of a fused run (espresso/compress/runtime.py) in one call:
    j reads x (j == 0) or ys[j - 1], the arguments of inner_product taken j-th from each tuple."""
    for j in range(first, len(ys)):
        source = x if j == 0 else ys[j - 1]
        inner_product(source, inverses[j], zeros[j], quantized[j], packed[j], accs[j], scales[j], biases[j],
                      corrections[j], relus[j], ys[j])


@functools.lru_cache(maxsize=None)
def convolution(kh, kw, channels):
    """The int8 2-D convolution for one kernel size and input channel count (compiled once per
    geometry: with them constant, a patch's kernel rows are fixed-length copies that LLVM
    unrolls, 14x faster than a generic loop on LeNet's conv1, measured):

        run(x, inverse, zero, xq, rows, stride, pad, dilation, packed, acc, scale, bias, correction, y)

    x (n, c, h, w) quantized into xq laid out (n, h, w, c); its patches into `rows` (n*oh*ow,
    kh*kw*c padded: the weights ordered (m, kh, kw, c) to match); the GEMM; y (n, m, oh, ow)
    dequantized, plus bias - correction.  Where c is a multiple of 4 the patches move as 32-bit words."""
    unit = 4 if channels % 4 == 0 else 1
    c = channels // unit
    span = kw * c  # units in one kernel row of a patch, contiguous in xq

    @numba.njit(nogil=True)
    def patches(source, dest, n, height, width, out_h, out_w, row_length, stride, pad, dilation, zero):
        for b in range(n):
            for oh in range(out_h):
                h0 = oh * stride[0] - pad[0]
                rows_inside = h0 >= 0 and h0 + (kh - 1) * dilation[0] < height
                for ow in range(out_w):
                    to, w0 = ((b * out_h + oh) * out_w + ow) * row_length, ow * stride[1] - pad[1]
                    if rows_inside and dilation[1] == 1 and w0 >= 0 and w0 + kw <= width:
                        for i in range(kh):  # unsigned indices: no negative-index checks (5x faster)
                            at = np.uintp(((b * height + h0 + i * dilation[0]) * width + w0) * c)
                            first = np.uintp(to + i * span)
                            for t in range(span):
                                dest[first + np.uintp(t)] = source[at + np.uintp(t)]
                    else:
                        _clipped_patch(source, dest, to, b, h0, w0, height, width, c, kh, kw, dilation, zero)

    @numba.njit(nogil=True)
    def run(x, inverse, zero, xq, rows, stride, pad, dilation, packed, acc, scale, bias, correction, y):
        n, height, width = x.shape[0], x.shape[2], x.shape[3]
        for b in range(n):
            for k in range(channels):
                for i in range(height):
                    for j in range(width):
                        xq[b, i, j, k] = _quantize(x[b, k, i, j], inverse, zero)
        source, dest = xq.reshape(-1), rows.reshape(-1)
        if unit == 4:
            patches(source.view(np.uint32), dest.view(np.uint32), n, height, width, y.shape[2], y.shape[3],
                    rows.shape[1] // 4, stride, pad, dilation, np.uint32(zero * 0x01010101))
        else:
            patches(source, dest, n, height, width, y.shape[2], y.shape[3], rows.shape[1], stride, pad, dilation,
                    np.uint8(zero))
        gemm(packed, rows, acc)
        pixels = y.shape[2] * y.shape[3]
        flat = y.reshape(n, y.shape[1], pixels)
        for b in range(n):
            for m in range(y.shape[1]):
                s, o = scale[m], bias[m] - correction[m]
                for p in range(pixels):
                    flat[b, m, p] = acc[b * pixels + p, m] * s + o

    return run


@numba.njit(nogil=True, cache=True)
def _clipped_patch(source, dest, to, b, h0, w0, height, width, c, kh, kw, dilation, zero):
    """One patch position by position (units of c per position): a window clipped by the
    padding (which gets `zero`, the quantized 0), or dilated."""
    for i in range(kh):
        h = h0 + i * dilation[0]
        for j in range(kw):
            w = w0 + j * dilation[1]
            inside = 0 <= h < height and 0 <= w < width
            at = ((b * height + h) * width + w) * c
            for t in range(c):
                dest[to + t] = source[at + t] if inside else zero
            to += c
