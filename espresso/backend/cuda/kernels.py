"""CUDA versions of the named primitives: every public function of espresso/backend/cpu/kernels.py
with the same signature and the same (Caffe's) semantics, run as CUDA kernels on CuPy arrays.

The kernels live in one .cu file per family (im2col.cu, pooling.cu, lrn.cu), each opening with
what it computes, its launch layout and its assumptions.  A family is compiled by NVRTC
(cupy.RawModule) on first use, once per (device, float type, number of spatial axes), its
templates instantiated through `name_expressions`; CuPy also caches the binaries on disk.

Conventions, beyond the CPU module's:
- Arrays are CuPy arrays of one float type (float32 or float64); masks and indices may be int32,
  int64, float32 or float64.  Non-contiguous inputs are copied; outputs must be C-contiguous.
- 1 to 3 spatial axes (MAX_AXES); every element count below 2^31 (the kernels index with int).
- No workspace: the *_workspace_size functions return 0 and `work` is ignored.
- Sums run in the CPU version's order and the kernels are compiled without FMA contraction, so
  results match the CPU to rounding (bit for bit where no math-library call is involved).
- Every primitive writes each element of its output (backward passes gather; MAX pooling's where
  windows never overlap zeroes its output, then scatters).
CuPy is imported on first launch, so this module (and its signatures) can be read without it.
"""

import functools
import math
import pathlib

import numpy as np

from espresso.backend import address

FLT_MIN = float(np.finfo(np.float32).tiny)  # as the CPU module (Caffe's FLT_MIN)
MAX_AXES = 3  # spatial axes the kernels are instantiated for
BLOCK = 256  # threads per block
MAX_BLOCKS = 1 << 16  # grid-stride loops cover larger counts
OPTIONS = ("-std=c++17", "--fmad=false")  # no FMA contraction: the CPU's rounding, step by step
SOURCES = pathlib.Path(__file__).resolve().parent

_FLOATS = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INDICES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long", **_FLOATS}
_INT_LIMIT = 2 ** 31


# *** compiling and launching ***
def name_expressions(family, ctype, ndim):
    """The template instantiations of `family` for float type `ctype` ("float" or "double") and
    `ndim` spatial axes (ignored by lrn): the names NVRTC is asked for, and nvcc in check_cu.sh."""
    if family == "im2col":  # the geometry comes in tables: one instance for every ndim
        return [f"{kernel}<{ctype}, {flag}>" for kernel in ("im2col_kernel", "col2im_kernel")
                for flag in ("false", "true")]
    if family == "pooling":
        masks = dict.fromkeys(_INDICES.values())  # int, long long, float, double
        masked = ("max_pool_forward_kernel", "pool_route_backward_kernel",
                  "stochastic_pool_forward_train_kernel")
        plain = ("ave_pool_forward_kernel", "ave_pool_backward_kernel", "stochastic_pool_forward_test_kernel")
        return ([f"{kernel}<{ctype}, {m}, {ndim}>" for kernel in masked for m in masks]
                + [f"{kernel}<{ctype}, {ndim}>" for kernel in plain]
                + [f"{kernel}<{ctype}, {m}>" for kernel in ("pool_scatter_backward_kernel", "pool_tile_backward_kernel")
                   for m in masks])
    if family == "lrn":
        return [f"{kernel}<{ctype}>" for kernel in ("lrn_across_forward_kernel",
                                                     "lrn_across_backward_kernel")]
    if family == "fused":
        return [f"{kernel}<{ctype}>" for kernel in ("sgd_update_kernel", "softmax_forward_kernel",
                                                     "softmax_loss_forward_kernel", "valid_mean_kernel",
                                                     "softmax_loss_backward_kernel", "accuracy_kernel",
                                                     "small_gemm_kernel", "sum_parts_kernel",
                                                     "softmax_loss_block_kernel")]
    if family == "direct":
        return [f"{kernel}<{ctype}>" for kernel in ("conv_forward_kernel", "conv_grad_parts_kernel",
                                                     "conv_grad_sum_kernel")]
    if family == "channels":
        return [f"{kernel}<{ctype}>" for kernel in ("channel_parts_kernel", "channel_sums_kernel",
                                                     "batch_norm_forward_kernel", "batch_norm_backward_kernel",
                                                     "scale_forward_kernel")]
    if family == "int8":
        return [f"{kernel}<{ctype}>" for kernel in ("int8_patches_kernel", "int8_output_kernel")]
    raise ValueError(f"unknown kernel family '{family}'")


def _cupy():
    import cupy  # deferred: importing espresso (or reading these signatures) never needs CuPy

    return cupy


# the families most nets use, as _module keys less the device: compiled ahead (compile_ahead)
COMMON_FAMILIES = (("fused", "float", None), ("pooling", "float", 2), ("im2col", "float", 2),
                   ("direct", "float", None))
_AHEAD = {}  # (family, device, ctype, ndim) -> the Future of its module, compiling in a thread


def compile_ahead(device, families=COMMON_FAMILIES):
    """Start compiling `families` for `device`, a thread each, while the caller goes on (building
    nets): NVRTC releases the GIL, so a first run on a machine overlaps the compilations with
    each other and with its own work instead of paying them one by one at first use (CuPy's disk
    cache makes later runs' loads quick).  finish_ahead() must precede any CUDA graph capture."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(len(families), "espresso-nvrtc")
    for family, ctype, ndim in families:
        key = (family, device, ctype, ndim)
        _AHEAD[key] = pool.submit(_compile, *key)
    pool.shutdown(wait=False)  # (the threads end with their compilations)


def finish_ahead():
    """Wait for the modules compiling ahead: a module loaded in another thread during a capture
    would break the capture."""
    for future in list(_AHEAD.values()):
        future.exception()  # waits; a failure is raised where the module is first used


@functools.lru_cache(maxsize=None)
def _module(family, device, ctype, ndim):
    ahead = _AHEAD.get((family, device, ctype, ndim))  # (kept: finish_ahead waits for it, whoever else does)
    return ahead.result() if ahead is not None else _compile(family, device, ctype, ndim)


def _compile(family, device, ctype, ndim):
    cupy = _cupy()
    code = (SOURCES / f"{family}.cu").read_text()
    with cupy.cuda.Device(device):
        names = name_expressions(family, ctype, ndim)
        module = cupy.RawModule(code=code, options=OPTIONS, name_expressions=names)
        module.compile()  # (else on first get_function)
        return module


@functools.lru_cache(maxsize=None)
def _function(family, expression, device, ctype, ndim):
    with _cupy().cuda.Device(device):
        return _module(family, device, ctype, ndim).get_function(expression)


def _launch(family, expression, ctype, ndim, count, args):
    """Run kernel `expression` of `family` over `count` elements on the current device and stream."""
    if count == 0:
        return
    device = _cupy().cuda.runtime.getDevice()
    blocks = min(-(-count // BLOCK), MAX_BLOCKS)
    _function(family, expression, device, ctype, ndim)((blocks,), (BLOCK,), args)


# several threads of a warp may share one item (a softmax position, a convolution's output) and
# combine their parts by shuffles: up to LANES of them, while fewer than SPREAD threads would work
LANES = 32
SPREAD = 1 << 17  # about half the threads an H100 holds


def _lanes(items, work, least):
    """Threads per item (a power of two up to LANES): doubled while the items alone would leave the
    GPU idle and each lane keeps at least `least` of an item's `work`."""
    lanes = 1
    while lanes < LANES and items * lanes < SPREAD and work >= 2 * least * lanes:
        lanes *= 2
    return lanes


# *** GEMM ***
_BLAS = {}  # device index -> its backend's Blas (the handle bound to the backend's stream)


def bind_blas(device, blas):
    _BLAS[device] = blas


def matmul(a, b, out, accumulate=False):
    """out = a @ b (or out += a @ b) with NumPy's batched-matmul rules, through the device's own
    cuBLAS handle (capturable in a CUDA graph, unlike CuPy's matmul); a small product in one
    kernel of our own (small_gemm)."""
    if _small_product(a, b, out):
        return small_gemm(a, b, out, accumulate=accumulate)
    return _BLAS[_cupy().cuda.runtime.getDevice()].matmul(a, b, out, accumulate)


def matmul_bias(a, b, bias, out):
    """out = a @ b + bias (n,) for 2-D a (m, k), b (k, n): where cuBLASLt can, one GEMM with the
    bias in its epilogue (InnerProduct's forward), else the GEMM and an add; a small product in
    one kernel of our own, the bias added in it."""
    return matmul_bias_relu(a, b, bias, out, None)


def matmul_bias_relu(a, b, bias, out, slope):
    """out = a @ b + bias through a ReLU of negative slope `slope` (None: no ReLU): an InnerProduct
    and the in-place ReLU after it, the ReLU in the kernel that adds the bias (cuBLASLt's epilogue,
    the split-K sum, small_gemm) where there is one."""
    if _small_product(a, b, out) and bias.shape == (out.shape[1],) and bias.dtype == out.dtype:
        return small_gemm(a, b, out, bias=_input(bias), relu=slope)
    return _BLAS[_cupy().cuda.runtime.getDevice()].matmul_bias(a, b, bias, out, slope)


# the most multiply-adds a product runs through small_gemm (LeNet's ip2 at batch 256 has 1.3M),
# and the most terms an output sums (its lanes walk them one after another)
SMALL_GEMM_WORK, SMALL_GEMM_TERMS = 1 << 22, 4096


def _small_product(a, b, out):
    """Whether out = a @ b is a product small_gemm runs instead of cuBLAS: 2-D, one float type, at
    most SMALL_GEMM_WORK multiply-adds and SMALL_GEMM_TERMS terms an output, and few rows, columns
    or terms (< 32: cuBLAS's tiles are 32 or more wide).  Not a GEMV (one row or column):
    cuBLAS's streams its matrix as fast as any."""
    if not (a.ndim == b.ndim == out.ndim == 2 and a.dtype == b.dtype == out.dtype and out.dtype in _FLOATS
            and out.flags.c_contiguous):
        return False
    (m, k), n = a.shape, out.shape[1]
    return (b.shape == (k, n) and out.shape[0] == m and min(m, n) >= 2 and min(m, n, k) < 32
            and m * n * k <= SMALL_GEMM_WORK and k <= SMALL_GEMM_TERMS
            and all(s % a.itemsize == 0 for s in a.strides + b.strides))


def small_gemm(a, b, out, accumulate=False, bias=None, relu=None):
    """out = a @ b (+ bias (n,)), or out += a @ b, for 2-D a (m, k) and b (k, n) of any strides and
    C-contiguous out, in one kernel: `lanes` threads per output split the k terms, whose sums
    combine in a fixed order.  `relu`: a ReLU's negative slope, the ReLU applied to out."""
    ctype = _float_type(a, b, out)
    (m, k), n = a.shape, out.shape[1]
    lanes = _lanes(m * n, k, 4)
    rows, cols = (np.int64(s // a.itemsize) for s in a.strides)
    b_rows, b_cols = (np.int64(s // b.itemsize) for s in b.strides)
    _launch("fused", f"small_gemm_kernel<{ctype}>", ctype, None, m * n * lanes,
            (np.int32(m), np.int32(n), np.int32(k), np.int32(lanes), a, rows, cols, b, b_rows, b_cols,
             out if bias is None else bias, np.int32(bias is not None), np.int32(accumulate), *_relu_args(relu, out),
             out))
    return out


def _relu_args(relu, out):
    """The kernels' (relu, slope) arguments for a ReLU of negative slope `relu` (None: none)."""
    return np.int32(relu is not None), out.dtype.type(relu or 0)


def sum_parts(products, out, accumulate=False, bias=None, relu=None):
    """out = products (parts, m, n) summed over parts, in order (+ bias (n,)), or out += that
    sum: the split-K GEMM's last step (blas.py), in one kernel; through a ReLU of negative slope
    `relu` where given."""
    ctype = _float_type(products, out, *([] if bias is None else [bias]))
    parts, count, n = len(products), out.size, out.shape[-1]
    _launch("fused", f"sum_parts_kernel<{ctype}>", ctype, None, count,
            (np.int64(count), np.int32(parts), np.int32(n), _input(products), out if bias is None else _input(bias),
             np.int32(bias is not None), np.int32(accumulate), *_relu_args(relu, out), _output(out, count, "out")))
    return out


def csr_matrix(values, indices, indptr, shape):
    """A cuSPARSE CSR matrix of device arrays (cupyx.scipy.sparse; `@` runs SpMV/SpMM), for the
    compressed models' sparse layers."""
    import cupyx.scipy.sparse  # deferred, as CuPy itself

    return cupyx.scipy.sparse.csr_matrix((values, indices, indptr), shape=shape)


def relu_forward(x, y, slope):
    """y = max(x, 0) + slope * min(x, 0) in one kernel; a NaN stays a NaN (Caffe's std::max)."""
    _elementwise("relu_forward", "T x, T slope", "T y", "y = (x < 0 ? T(0) : x) + slope * (x < 0 ? x : T(0))")(
        x, x.dtype.type(slope), y)


def add_relu(a, b, y, slope):
    """y = relu(a + b) of negative slope `slope`, in one kernel: an Eltwise SUM and the ReLU after it.
    y may be a or b."""
    _elementwise("add_relu", "T a, T b, T slope", "T y",
                 "T v = a + b; y = (v < 0 ? T(0) : v) + slope * (v < 0 ? v : T(0))")(a, b, a.dtype.type(slope), y)


def relu_backward(x, dy, dx, slope):
    """dx = dy * ((x > 0) + slope * (x <= 0)), Caffe's expression, in one kernel."""
    _elementwise("relu_backward", "T x, T dy, T slope", "T dx", "dx = dy * (T(x > 0) + slope * T(x <= 0))")(
        x, dy, dy.dtype.type(slope), dx)


def to_half(x, out, kind):
    """out = x rounded to nearest even in the 16-bit float `kind`: float16 (out float16) or
    bfloat16 (out uint16, its bit patterns: float32's upper half)."""
    if kind == "float16":
        _elementwise("to_float16", "float32 x", "float16 y", "y = x")(x, out)
    else:
        _elementwise("to_bfloat16", "float32 x", "uint16 y",
                     "unsigned int u = __float_as_uint(x); "
                     "y = isnan(x) ? ((u >> 16) | 0x40u) : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16")(x, out)


def from_half(h, bias, y, kind):
    """y (n, c, ...) float32 = the 16-bit values h + bias per channel (axis 1)."""
    bias = bias.reshape((1, -1) + (1,) * (h.ndim - 2))
    if kind == "float16":
        _elementwise("from_float16", "float16 h, float32 b", "float32 y", "y = float(h) + b")(h, bias, y)
    else:
        _elementwise("from_bfloat16", "uint16 h, float32 b", "float32 y",
                     "y = __uint_as_float(((unsigned int)h) << 16) + b")(h, bias, y)


def int8_patches(x, inverse, zero, kernel, stride, pad, dilation, groups, group_k, out_spatial, patches):
    """The quantized patches of x (n, c, h, w) for an int8 convolution (int8.cu): patches (rows,
    groups * padded k) int8, rows >= n * out_h * out_w, padded k a multiple of 16."""
    ctype, x = _float_type(x), _input(x)
    padded_k = patches.shape[1] // groups
    args = (np.int64(patches.size // 4), x, np.float64(inverse), np.int32(zero), *map(np.int32, x.shape),
            *map(np.int32, (*out_spatial, *kernel, *stride, *pad, *dilation, groups, group_k, padded_k)), patches)
    _launch("int8", f"int8_patches_kernel<{ctype}>", ctype, None, patches.size // 4, args)


def int8_output(acc, offset, scale, bias, correction, y):
    """y (n, m, ...) = (acc[m, row] + offset[m]) * scale[m] + bias[m] - correction[m] (int8.cu),
    acc (m, rows) int32 with rows >= n * pixels."""
    ctype = _float_type(y, scale, bias, correction)
    pixels = y.size // (y.shape[0] * y.shape[1])
    args = (np.int64(y.size), acc, np.int64(acc.shape[1]), np.int32(y.shape[1]), np.int32(pixels), offset, scale,
            bias, correction, y)
    _launch("int8", f"int8_output_kernel<{ctype}>", ctype, None, y.size, args)


@functools.lru_cache(maxsize=None)
def _elementwise(name, inputs, outputs, body):
    return _cupy().ElementwiseKernel(inputs, outputs, body, f"espresso_{name}", options=OPTIONS)


# *** argument checks ***
def _float_type(*arrays):
    """The C type of the arrays' common float dtype."""
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOATS:
        raise TypeError(f"the CUDA kernels take arrays of one float type (float32 or float64), "
                        f"got {sorted(str(d) for d in dtypes)}")
    return _FLOATS[dtypes.pop()]


def _index_type(array):
    dtype = np.dtype(array.dtype)
    if dtype not in _INDICES:
        raise TypeError(f"indices must be int32, int64, float32 or float64, got {dtype}")
    return _INDICES[dtype]


def _spatial_axes(shape):
    d = len(shape) - 2
    if not 1 <= d <= MAX_AXES:
        raise ValueError(f"the CUDA kernels take images (N, C, *spatial) with 1 to {MAX_AXES} spatial "
                         f"axes, got shape {tuple(shape)}")
    return d


def _input(array):
    """A C-contiguous version of an input (a copy only when it is not one already)."""
    if array.size >= _INT_LIMIT:
        raise ValueError(f"array of {array.size} elements: the CUDA kernels index with 32-bit ints")
    return array if array.flags.c_contiguous else array.copy()


def _output(array, size, what):
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (the CUDA kernels write it in place)")
    if array.size != size:
        raise ValueError(f"{what} holds {array.size} elements, the geometry needs {size}")
    if array.size >= _INT_LIMIT:
        raise ValueError(f"{what} of {array.size} elements: the CUDA kernels index with 32-bit ints")
    return array


def _axes(*groups):
    """int32 kernel arguments: each per-axis tuple padded to MAX_AXES (size-1 axes, no padding)."""
    args = []
    for values, fill in groups:
        values = tuple(int(v) for v in values)
        args += [np.int32(v) for v in values + (fill,) * (MAX_AXES - len(values))]
    return args


# *** im2col / col2im ***
im2row = row2im = None  # the pixel-rows layout suits OpenBLAS (the CPU); convolutions here keep theirs


def im2col_workspace_size(x_shape, pad, batch_last):
    """0: the CUDA primitives need no staging buffer."""
    return 0


def _tap_sources(spatial, kernel, stride, pad, dilation):
    """(source (K*O,) int32: the plane offset tap k of output o reads, -1 in the padding;
    starts (S+1,), taps: for each pixel the flat k*O + o reading it, in increasing k)."""
    out = [(s + 2 * p - d * (k - 1) - 1) // t + 1 for s, k, t, p, d in zip(spatial, kernel, stride, pad, dilation)]
    grids = np.meshgrid(*[np.arange(k) for k in kernel], *[np.arange(o) for o in out], indexing="ij")
    axes = len(spatial)
    offset, inside = np.zeros(grids[0].shape, np.int64), np.ones(grids[0].shape, bool)
    for a in range(axes):  # position along axis a of tap k_a of output o_a
        pos = grids[axes + a] * stride[a] - pad[a] + grids[a] * dilation[a]
        inside &= (pos >= 0) & (pos < spatial[a])
        offset = offset * spatial[a] + pos
    source = np.where(inside, offset, -1).reshape(-1)
    hits = np.flatnonzero(source >= 0)  # flat k*O + o, increasing
    order = hits[np.argsort(source[hits], kind="stable")]  # by pixel, increasing k within one
    starts = np.searchsorted(source[order], np.arange(math.prod(spatial) + 1))
    return source.astype(np.int32), starts.astype(np.int32), order.astype(np.int32)


@functools.lru_cache(maxsize=256)
def _tables(device, spatial, kernel, stride, pad, dilation):
    """_tap_sources on GPU `device` (host arrays for None), built once per geometry and outside
    any graph capture (the eager run before a capture makes them)."""
    tables = _tap_sources(spatial, kernel, stride, pad, dilation)
    if device is None:
        return tables
    with _cupy().cuda.Device(device):
        return tuple(_cupy().asarray(t) for t in tables)


def _col_geometry(x, kernel, stride, pad, dilation):
    """(column entries, kernel args after the counts, the tables) for images shaped like x."""
    spatial = tuple(int(s) for s in x.shape[2:])
    geometry = tuple(tuple(int(v) for v in g) for g in (kernel, stride, pad, dilation))
    device = getattr(x.data, "device_id", None)  # None: host arrays (the kernels' CPU emulation in tests)
    source, starts, taps = _tables(device, spatial, *geometry)
    size = math.prod(x.shape[:2]) * source.size
    dims = (np.int32(x.shape[0]), np.int32(x.shape[1]), np.int32(source.size), np.int32(math.prod(spatial)))
    return size, dims, (source, starts, taps)


def im2col(x, col, kernel, stride, pad, dilation, batch_last=False, work=None):
    """Columns of x (N, C, *S) into col: (N, C*prod(K), prod(O)), or batch_last
    (C*prod(K), prod(O)*N).  Padding reads as zero.  One thread per column entry."""
    ctype, d = _float_type(x, col), _spatial_axes(x.shape)
    size, dims, (source, _, _) = _col_geometry(x, kernel, stride, pad, dilation)
    args = (_input(x), _output(col, size, "col"), np.int32(size), *dims, source)
    _launch("im2col", f"im2col_kernel<{ctype}, {str(bool(batch_last)).lower()}>", ctype, d, size, args)


def col2im(col, x, kernel, stride, pad, dilation, batch_last=False, work=None):
    """The adjoint of im2col: x (N, C, *S) is overwritten with, for each pixel, the sum of the
    column entries that read it.  One thread per pixel, gathering in kernel-offset order."""
    ctype, d = _float_type(x, col), _spatial_axes(x.shape)
    size, dims, (_, starts, taps) = _col_geometry(x, kernel, stride, pad, dilation)
    if col.size != size:
        raise ValueError(f"col holds {col.size} elements, the geometry needs {size}")
    args = (_input(col), _output(x, x.size, "x"), np.int32(x.size), *dims, starts, taps)
    _launch("im2col", f"col2im_kernel<{ctype}, {str(bool(batch_last)).lower()}>", ctype, d, x.size, args)


# *** pooling ***
def pool_workspace_size(x_shape, y_shape, kernel, stride, pad):
    """0: the CUDA primitives need no planes or padded copy."""
    return 0


def _pool_args(x_shape, y_shape, kernel, stride, pad):
    if len(x_shape) != len(y_shape) or tuple(x_shape[:2]) != tuple(y_shape[:2]):
        raise ValueError(f"pooling input {tuple(x_shape)} and output {tuple(y_shape)} differ in batch "
                         f"or channels")
    return _axes((x_shape[2:], 1), (kernel, 1), (stride, 1), (pad, 0), (y_shape[2:], 1))


def max_pool_forward(x, y, mask, kernel, stride, pad, work=None):
    """MAX pooling of x (N, C, *S) into y (N, C, *O); mask (int or float) gets the argmax as
    a flat h*W+w index into the unpadded input: the first maximum in scan order of the cells
    above -FLT_MAX (NaN never is), as Caffe; -FLT_MAX and -1 where none is.  Padding cells are
    never picked."""
    ctype, m, d = _float_type(x, y), _index_type(mask), _spatial_axes(x.shape)
    geometry = _pool_args(x.shape, y.shape, kernel, stride, pad)
    args = (_input(x), _output(y, y.size, "y"), _output(mask, y.size, "mask"), np.int32(y.size), *geometry)
    _launch("pooling", f"max_pool_forward_kernel<{ctype}, {m}, {d}>", ctype, d, y.size, args)


def _route_backward(dy, index, dx, kernel, stride, pad):
    ctype, m, d = _float_type(dy, dx), _index_type(index), _spatial_axes(dx.shape)
    geometry = _pool_args(dx.shape, dy.shape, kernel, stride, pad)
    if index.size != dy.size:
        raise ValueError(f"the index holds {index.size} elements, dy {dy.size}")
    args = (_input(dy), _input(index), _output(dx, dx.size, "dx"), np.int32(dx.size), *geometry)
    _launch("pooling", f"pool_route_backward_kernel<{ctype}, {m}, {d}>", ctype, d, dx.size, args)


def max_pool_backward(dy, mask, dx, kernel, stride, pad, work=None):
    """dx (N, C, *S) = dy (N, C, *O) routed to the cells `mask` names, summed where windows
    overlap; mask -1 (a window that picked no cell) names none.  Where windows never overlap, dx
    is zeroed and each output writes its cell: a thread per output, not per input cell with its
    windows' arithmetic (LeNet's pool1 at batch 256: the gather took 23 us); where 2-D windows
    tile the input, each output writes its whole window, with no zeroing first."""
    if not all(s >= k for s, k in zip(stride, kernel)):
        return _route_backward(dy, mask, dx, kernel, stride, pad)
    ctype, m, d = _float_type(dy, dx), _index_type(mask), _spatial_axes(dx.shape)
    _pool_args(dx.shape, dy.shape, kernel, stride, pad)  # (the shapes' checks)
    if mask.size != dy.size:
        raise ValueError(f"the index holds {mask.size} elements, dy {dy.size}")
    _output(dx, dx.size, "dx")
    if d == 2 and tuple(stride) == tuple(kernel) and not any(pad) and \
            dx.shape[2:] == tuple(o * k for o, k in zip(dy.shape[2:], kernel)):
        args = (_input(dy), _input(mask), dx, np.int32(dy.size), *(np.int32(v) for v in (*dy.shape[2:], *kernel)))
        return _launch("pooling", f"pool_tile_backward_kernel<{ctype}, {m}>", ctype, d, dy.size, args)
    dx.fill(0)
    args = (_input(dy), _input(mask), dx, np.int32(dy.size), np.int32(math.prod(dy.shape[2:])),
            np.int32(math.prod(dx.shape[2:])))
    _launch("pooling", f"pool_scatter_backward_kernel<{ctype}, {m}>", ctype, d, dy.size, args)


def ave_pool_forward(x, y, kernel, stride, pad, work=None):
    """AVE pooling: window sums (padding reads 0) over Caffe's divisor, the window clipped to
    [-pad, size + pad): padding cells count, cells past the padding do not."""
    ctype, d = _float_type(x, y), _spatial_axes(x.shape)
    geometry = _pool_args(x.shape, y.shape, kernel, stride, pad)
    args = (_input(x), _output(y, y.size, "y"), np.int32(y.size), *geometry)
    _launch("pooling", f"ave_pool_forward_kernel<{ctype}, {d}>", ctype, d, y.size, args)


def ave_pool_backward(dy, dx, kernel, stride, pad, work=None):
    """dx = each output's dy / divisor spread over its window cells inside the input."""
    ctype, d = _float_type(dy, dx), _spatial_axes(dx.shape)
    geometry = _pool_args(dx.shape, dy.shape, kernel, stride, pad)
    args = (_input(dy), _output(dx, dx.size, "dx"), np.int32(dx.size), *geometry)
    _launch("pooling", f"ave_pool_backward_kernel<{ctype}, {d}>", ctype, d, dx.size, args)


def stochastic_pool_forward_train(x, y, index, rand, kernel, stride, work=None):
    """Caffe's STOCHASTIC pooling in TRAIN (its GPU code; no padding): each window picks the
    first cell whose running sum reaches rand * (window sum), rand uniform in [0, 1) per
    output; y is that cell's value and index its flat h*W+w position.  Inputs are expected
    non-negative, as in Caffe."""
    ctype, m, d = _float_type(x, y, rand), _index_type(index), _spatial_axes(x.shape)
    geometry = _pool_args(x.shape, y.shape, kernel, stride, (0,) * len(kernel))
    if rand.size != y.size:
        raise ValueError(f"rand holds {rand.size} elements, y {y.size}")
    args = (_input(x), _output(y, y.size, "y"), _output(index, y.size, "index"), _input(rand),
            np.int32(y.size), *geometry)
    _launch("pooling", f"stochastic_pool_forward_train_kernel<{ctype}, {m}, {d}>", ctype, d, y.size, args)


def stochastic_pool_forward_test(x, y, kernel, stride, work=None):
    """STOCHASTIC pooling in TEST: the probability-weighted average sum(x^2) / sum(x), 0
    where sum(x) <= 0, as Caffe's GPU code."""
    ctype, d = _float_type(x, y), _spatial_axes(x.shape)
    geometry = _pool_args(x.shape, y.shape, kernel, stride, (0,) * len(kernel))
    args = (_input(x), _output(y, y.size, "y"), np.int32(y.size), *geometry)
    _launch("pooling", f"stochastic_pool_forward_test_kernel<{ctype}, {d}>", ctype, d, y.size, args)


def stochastic_pool_backward(dy, index, dx, kernel, stride, work=None):
    """dx = dy routed to the cells picked in TRAIN (index), as Caffe's GPU code."""
    _route_backward(dy, index, dx, kernel, stride, (0,) * len(kernel))


# *** local response normalization across channels ***
def lrn_workspace_size(x_shape, size):
    """0: the CUDA primitives need no channel-padded buffer."""
    return 0


def _lrn_shape(x):
    if x.ndim < 2:
        raise ValueError(f"LRN takes (N, C, *spatial) arrays, got shape {x.shape}")
    return np.int32(x.size), np.int32(x.shape[1]), np.int32(math.prod(x.shape[2:]))


def _unaliased(array, outputs):
    """`array`, copied when it is one of `outputs` (the kernels read neighbours other threads write)."""
    if any(address(array) == address(out) for out in outputs):
        return array.copy()
    return _input(array)


def lrn_across_forward(x, y, scale, size, alpha, beta, k, work=None):
    """Caffe's ACROSS_CHANNELS LRN of (N, C, *S): scale = k + alpha/size * (sum of x^2 over
    the `size` channels centred on each one, zeros past the ends); y = x * scale^-beta.
    scale is kept for the backward pass."""
    ctype, t = _float_type(x, y, scale), x.dtype.type
    outputs = (_output(y, x.size, "y"), _output(scale, x.size, "scale"))
    args = (_unaliased(x, outputs), *outputs, *_lrn_shape(x), np.int32(size), t(alpha / size), t(k), t(-beta))
    _launch("lrn", f"lrn_across_forward_kernel<{ctype}>", ctype, None, x.size, args)


def lrn_across_backward(x, y, dy, scale, dx, size, alpha, beta, work=None):
    """dx = dy * scale^-beta - (2 alpha beta / size) * x * (window sum of dy * y / scale)."""
    ctype, t = _float_type(x, y, dy, scale, dx), x.dtype.type
    out = _output(dx, x.size, "dx")
    inputs = [_unaliased(a, (out,)) for a in (x, y, dy, scale)]
    args = (*inputs, out, *_lrn_shape(x), np.int32(size), t(-2.0 * alpha * beta / size), t(-beta))
    _launch("lrn", f"lrn_across_backward_kernel<{ctype}>", ctype, None, x.size, args)


# *** fused kernels (CUDA only: layers and the solver use them when the backend has them) ***
def sgd_update(w, g, h, segments, rate, momentum, normalize, regularization):
    """Caffe's SGD step over the arena in one pass: normalize (g *= normalize), regularize
    (0 none, 1 L2, 2 L1 with the segment's decay), h = momentum h + lr_mult rate g, g = h,
    w -= h.  segments = (ends int64, lr_mult, decay) device arrays, one entry per param;
    rate a 0-d device array."""
    ctype, t = _float_type(w, g, h), w.dtype.type
    ends, lr_mult, decay = segments
    args = (np.int64(w.size), w, g, h, np.int32(ends.size), ends, lr_mult, decay, rate, t(momentum),
            t(normalize), np.int32(regularization))
    _launch("fused", f"sgd_update_kernel<{ctype}>", ctype, None, w.size, args)


def gather_batch(cache, labels, pos, mean, scale, out, out_labels, shard=(0, 1)):
    """A batch of a dataset held on the device, in two kernels: item b of out (N, ...) =
    (cache[(pos + b * ranks + rank) % n] - mean) * scale (mean: one value per value of an item, or
    None), its label likewise when out_labels is given; then pos = (pos + N * ranks) % n.
    shard = (rank, ranks) of data-parallel training (espresso/parallel.py)."""
    n, item, (rank, ranks) = len(cache), cache[0].size, shard
    _elementwise("gather_batch", "raw S cache, raw T labels, raw int64 pos, raw T mean, int64 n, int64 item, T scale, "
                 "int32 has_mean, int32 has_labels, int64 rank, int64 ranks", "T y, raw T out_labels",
                 "long long b = i / item, j = i % item, row = (pos[0] + b * ranks + rank) % n; "
                 "T v = T(cache[row * item + j]); "
                 "if (has_mean) v = v - mean[j]; y = v * scale; if (has_labels && j == 0) out_labels[b] = labels[row]")(
        cache, labels, pos, labels if mean is None else mean, n, item, out.dtype.type(scale), int(mean is not None),
        int(out_labels is not None), rank, ranks, out, labels if out_labels is None else out_labels)
    _elementwise("advance_cursor", "int64 step, int64 n", "int64 pos", "pos = (pos + step) % n")(len(out) * ranks, n,
                                                                                                  pos)


def record_iteration(loss, weight, rates, ring, slot, rate):
    """A graphed iteration's bookkeeping in one kernel: ring[slot] = loss * weight (one-element
    arrays), rate = rates[slot], slot += 1."""
    _elementwise("record_iteration", "raw T loss, raw T weight, raw T rates", "raw T ring, raw int64 slot, raw T rate",
                 "long long s = slot[0]; ring[s] = loss[0] * weight[0]; rate[0] = rates[s]; slot[0] = s + 1")(
        loss, weight, rates, ring, slot, rate, size=1)


def softmax_forward(x, y, dims):
    """Softmax forward: y = softmax of x (outer, classes, inner) over classes, one kernel (the
    xp steps took five), the classes of a position split between a warp's threads when positions
    are few; y may be x."""
    ctype = _float_type(x, y)
    outer, classes, inner = dims
    lanes = _lanes(outer * inner, classes, 1)
    _launch("fused", f"softmax_forward_kernel<{ctype}>", ctype, None, outer * inner * lanes,
            (np.int32(outer * inner), np.int32(lanes), np.int32(classes), np.int32(inner), _input(x), y))


# the most positions whose SoftmaxWithLoss forward runs in one block (both steps in one kernel), in
# one pass of its threads: fewer lanes a position, not more passes (LeNet's 64 positions at 8 lanes
# in two passes took 5.8 us on an H100, more than the two kernels' 2.9 + 1.8)
ONE_BLOCK_SOFTMAX_LOSS = BLOCK


SOFTMAX_LOSS_MOST = None  # the fused pair below takes any size


def softmax_loss_forward(x, labels, prob, losses, valid, loss, normalizer, dims, ignore_label, fixed_normalizer,
                         problem):
    """SoftmaxWithLoss forward: prob = softmax of x (outer, classes, inner) over classes;
    loss (0-d) = sum of -log(max(prob[label], FLT_MIN)) over non-ignored positions / normalizer,
    normalizer = max(1, valid count) when fixed_normalizer is None, else fixed_normalizer.
    losses / valid: per-position scratch (outer * inner).  problem: int64 [2], where a label that
    is not a class is recorded (position + 1, label) unless one is already."""
    ctype, t = _float_type(x, prob, losses, valid, loss, normalizer), x.dtype.type
    outer, classes, inner = dims
    positions = outer * inner
    labels, lanes = _input(labels.astype(x.dtype, copy=False)), _lanes(positions, classes, 1)
    one_block = positions <= ONE_BLOCK_SOFTMAX_LOSS
    while one_block and positions * lanes > BLOCK:
        lanes //= 2
    args = (np.int32(positions), np.int32(lanes), np.int32(classes), np.int32(inner), _input(x), labels, prob,
            losses, valid, *_ignore(ignore_label), t(FLT_MIN), _output(problem, 2, "problem"))
    if one_block:
        fixed = t(-1 if fixed_normalizer is None else fixed_normalizer)
        return _launch("fused", f"softmax_loss_block_kernel<{ctype}>", ctype, None, BLOCK,
                       (*args, loss, normalizer, fixed))
    _launch("fused", f"softmax_loss_forward_kernel<{ctype}>", ctype, None, positions * lanes, args)
    _valid_mean(ctype, positions, losses, valid, loss, normalizer, fixed_normalizer)


def accuracy_forward(x, labels, hits, valid, accuracy, normalizer, dims, ignore_label, top_k, problem):
    """Accuracy forward: accuracy (0-d) = the fraction of the positions of x (outer, classes, inner)
    whose label is among the top_k scores (a tie counts against), over the labels that count (not
    ignored).  hits / valid: per-position scratch (outer * inner); normalizer: 0-d scratch.
    problem: int64 [2], where a label that is not a class is recorded, as in softmax_loss_forward."""
    ctype = _float_type(x, hits, valid, accuracy, normalizer)
    outer, classes, inner = dims
    positions = outer * inner
    _launch("fused", f"accuracy_kernel<{ctype}>", ctype, None, positions,
            (np.int32(positions), np.int32(classes), np.int32(inner), _input(x),
             _input(labels.astype(x.dtype, copy=False)), np.int32(top_k), hits, valid, *_ignore(ignore_label),
             _output(problem, 2, "problem")))
    _valid_mean(ctype, positions, hits, valid, accuracy, normalizer, None)


# *** direct convolution (CUDA only, as the fused kernels: a convolution engine the layer times) ***
DIRECT_FILTERS = 4  # filters per thread (direct.cu's FILTERS)


def _direct_lanes(positions, taps):
    """Threads per output position in direct.cu: each lane keeps at least 4 taps."""
    return _lanes(positions, taps, 4)


def _direct_geometry(x, w, out, bias, stride, pad, dilation, groups, what):
    """(output spatial sizes, direct.cu's int32 geometry arguments) of the 2-D convolution of x
    (N, C, H, W) with filters shaped as w (M, C/groups, KH, KW) into `out` (the output or its
    gradient, named `what`) and a per-filter bias (or None), after checking that the shapes fit."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"direct convolution: x {x.shape} and w {w.shape} must be 4-D (2-D images and filters)")
    (n, channels, height, width), (filters, _, kernel_h, kernel_w) = x.shape, w.shape
    spatial = [(s + 2 * p - d * (k - 1) - 1) // t + 1
               for s, k, t, p, d in zip((height, width), w.shape[2:], stride, pad, dilation)]
    if (filters % groups or w.shape[1] * groups != channels or out.shape != (n, filters, *spatial)
            or (bias is not None and bias.shape != (filters,))):
        raise ValueError(f"direct convolution of x {x.shape} with w {w.shape} in {groups} groups into {what} "
                         f"{out.shape}: the shapes do not fit ({what} should be {(n, filters, *spatial)})")
    geometry = map(np.int32, (channels, height, width, filters, *spatial, kernel_h, kernel_w, *stride, *pad,
                              *dilation, groups))
    return spatial, list(geometry)


def direct_conv_forward(x, w, bias, y, stride, pad, dilation, groups):
    """y (N, M, OH, OW) = the 2-D convolution of x (N, C, H, W) with w (M, C/groups, KH, KW), plus
    bias (M,) unless None, in one kernel (direct.cu): for convolutions too small for cuDNN's and
    im2col's launches to pay."""
    ctype = _float_type(x, w, y, *([] if bias is None else [bias]))
    spatial, geometry = _direct_geometry(x, w, y, bias, stride, pad, dilation, groups, "y")
    n, filters = x.shape[0], w.shape[0]
    positions = n * groups * -(-filters // groups // DIRECT_FILTERS) * math.prod(spatial)
    lanes = _direct_lanes(positions, math.prod(w.shape[1:]))
    if positions * lanes >= _INT_LIMIT or y.size >= _INT_LIMIT:
        raise ValueError(f"direct convolution of {y.size} outputs: too many for 32-bit indexing")
    args = (np.int32(positions), np.int32(lanes), _input(x), _input(w), np.int64(0) if bias is None else _input(bias),
            _output(y, y.size, "y"), *geometry)
    _launch("direct", f"conv_forward_kernel<{ctype}>", ctype, None, positions * lanes, args)


GRAD_TAPS = 32  # direct.cu's: the direct weight gradient takes filters of at most this many taps
GRAD_SLICES = 64  # at most this many slices of the positions, each thread summing >= 8 of them


def direct_conv_weight_grad(x, dy, dw, db, stride, pad, dilation, groups):
    """dw (M, C/groups, KH, KW) += the weight gradient of the 2-D convolution of x (N, C, H, W)
    whose output gradient is dy (N, M, OH, OW), and db (M,) += dy summed per filter unless None,
    in two kernels (direct.cu): for filters of at most GRAD_TAPS taps (a first layer's), where
    cuDNN's FFT took five."""
    ctype = _float_type(x, dy, dw, *([] if db is None else [db]))
    spatial, geometry = _direct_geometry(x, dw, dy, db, stride, pad, dilation, groups, "dy")
    n, filters, taps = x.shape[0], dw.shape[0], math.prod(dw.shape[1:])
    if taps > GRAD_TAPS:
        raise ValueError(f"direct weight gradient of filters {dw.shape}: at most {GRAD_TAPS} taps")
    positions = n * math.prod(spatial)
    slices = max(1, min(GRAD_SLICES, positions // (8 * BLOCK)))
    per_slice = -(-positions // slices)
    parts = _parts(getattr(x.data, "device_id", None), np.dtype(x.dtype), slices * filters * (taps + 1))
    _launch("direct", f"conv_grad_parts_kernel<{ctype}>", ctype, None, slices * filters * BLOCK,
            (_input(x), _input(dy), parts, np.int64(positions), np.int32(slices), np.int32(per_slice), *geometry))
    _launch("direct", f"conv_grad_sum_kernel<{ctype}>", ctype, None, filters * (taps + 1),
            (parts, _output(dw, dw.size, "dw"), np.int64(0) if db is None else _output(db, filters, "db"),
             np.int32(slices), np.int32(filters), np.int32(taps)))


direct_conv_weight_grad.max_taps = GRAD_TAPS


@functools.lru_cache(maxsize=None)
def _parts(device, dtype, size):
    """The per-slice partial sums of direct_conv_weight_grad: one buffer per device, type and
    size, made on the first (eager) call and never freed, as graphs captured later hold it."""
    if device is None:  # (host arrays: the kernels' emulation in tests)
        return np.empty(size, dtype)
    with _cupy().cuda.Device(device):
        return _cupy().empty(size, dtype)


# *** per-channel sums and maps (CUDA only, as the fused kernels: BatchNorm, Scale and Bias) ***
CHANNEL_BLOCKS = 1024  # (channel, part) blocks the sums aim for: some 8 per SM of an H100
CHANNEL_ILP = 4  # elements a thread in channels.cu's elementwise passes (its ILP)
CHANNEL_SHARE = 4096  # the fewest cells a part sums


def _channel_parts(dims):
    outer, channels, inner = dims
    return max(1, min(outer * inner // CHANNEL_SHARE, -(-CHANNEL_BLOCKS // max(channels, 1))))


def channel_sums_workspace_size(dims):
    """Elements of the `work` buffer channel_sums takes for an (outer, channels, inner) array."""
    return 2 * dims[1] * _channel_parts(dims)


def _maybe(array):
    """A kernel's pointer argument that may be absent: the array, or a null pointer."""
    return np.int64(0) if array is None else _input(array)


def _channel_dims(dims, *arrays):
    """(outer, channels, inner) as Python ints, after checking the arrays' sizes."""
    outer, channels, inner = map(int, dims)
    if any(a.size != outer * channels * inner for a in arrays):
        raise ValueError(f"arrays of {[a.size for a in arrays]} elements do not fit dims {tuple(dims)}")
    return outer, channels, inner


def channel_sums(x, dims, work, sums=None, dots=None, y=None, shift=None, scale=1.0, accumulate=False):
    """Per channel c of x seen as dims (outer, channels, inner): sums[c] = scale * the sum of a
    and dots[c] = scale * the sum of a * y (a * a without y) over its cells, a = x - shift[c]
    (x without shift), added to their values when `accumulate`; either may be None.  Two
    kernels in a fixed order (deterministic).  work: channel_sums_workspace_size(dims) elements."""
    ctype = _float_type(*(a for a in (x, y, shift, sums, dots, work) if a is not None))
    outer, channels, inner = _channel_dims(dims, x, *([] if y is None else [y]))
    parts = _channel_parts(dims)
    blocks = channels * parts
    if work.size < 2 * blocks or not work.flags.c_contiguous:
        raise ValueError(f"work: needs {2 * blocks} contiguous elements, got {work.size}")
    outputs = [None if a is None else _output(a, channels, what) for a, what in ((sums, "sums"), (dots, "dots"))]
    if x.size == 0:
        for out in outputs:
            if out is not None and not accumulate:
                out.fill(0)
        return
    _launch("channels", f"channel_parts_kernel<{ctype}>", ctype, None, blocks * BLOCK,
            (np.int64(outer), np.int32(channels), np.int64(inner), np.int32(parts), _input(x), _maybe(y),
             _maybe(shift), work))
    _launch("channels", f"channel_sums_kernel<{ctype}>", ctype, None, channels,
            (np.int32(channels), np.int32(parts), work, x.dtype.type(scale), np.int32(accumulate),
             *map(_maybe, outputs)))


def batch_norm_forward(x, mean, std, y, x_norm, dims, scale=None, bias=None, slope=None):
    """y = (x - mean[c]) / std[c] over x seen as dims (outer, channels, inner), one pass; x_norm
    (None: none) keeps a copy.  A following Scale folded in: y = that * scale[c] (+ bias[c]),
    x_norm still the normalized values; then a ReLU of negative slope `slope` (None: none).  y
    may be x."""
    ctype = _float_type(x, mean, std, y, *(a for a in (x_norm, scale, bias) if a is not None))
    outer, channels, inner = _channel_dims(dims, x, y)
    if any(a is not None and a.size != channels for a in (mean, std, scale, bias)):
        raise ValueError(f"batch norm of {int(channels)} channels: mean, std, scale and bias need one value each")
    _launch("channels", f"batch_norm_forward_kernel<{ctype}>", ctype, None, -(-x.size // CHANNEL_ILP),
            (np.int64(x.size), np.int32(channels), np.int64(inner), _input(x), _input(mean), _input(std),
             _output(y, x.size, "y"), np.int64(0) if x_norm is None else _output(x_norm, x.size, "x_norm"),
             _maybe(scale), _maybe(bias), np.int32(slope is not None), x.dtype.type(slope or 0)))


def batch_norm_backward(dy, y, sum_dy, sum_dyy, std, dx, dims):
    """BatchNorm's gradient with batch statistics, Caffe's steps: dx = (dy - (y * sum_dyy[c] +
    sum_dy[c]) / m) / std[c], m = outer * inner (sum_dy, sum_dyy: channel_sums of dy and dy * y).
    dx may be dy."""
    ctype = _float_type(dy, y, sum_dy, sum_dyy, std, dx)
    outer, channels, inner = _channel_dims(dims, dy, y, dx)
    neg_inv_m = dy.dtype.type(-1.0 / (outer * inner))  # Caffe's Dtype(-1. / (num * spatial_dim))
    _launch("channels", f"batch_norm_backward_kernel<{ctype}>", ctype, None, -(-dy.size // CHANNEL_ILP),
            (np.int64(dy.size), np.int32(channels), np.int64(inner), _input(dy), _input(y), _input(sum_dy),
             _input(sum_dyy), _input(std), neg_inv_m, _output(dx, dy.size, "dx")))


def scale_forward(x, scale, bias, y, dims):
    """y = x * scale[c] (+ bias[c] unless None) over x seen as dims (outer, channels, inner), one
    pass.  y may be x."""
    ctype = _float_type(x, scale, y, *([] if bias is None else [bias]))
    outer, channels, inner = _channel_dims(dims, x, y)
    _launch("channels", f"scale_forward_kernel<{ctype}>", ctype, None, -(-x.size // CHANNEL_ILP),
            (np.int64(x.size), np.int32(channels), np.int64(inner), _input(x), _input(scale), _maybe(bias),
             _output(y, x.size, "y")))


def _ignore(ignore_label):
    """(has_ignore, ignore_label) as the fused kernels take them."""
    return (np.int32(0), np.int32(0)) if ignore_label is None else (np.int32(1), np.int32(ignore_label))


def _valid_mean(ctype, positions, values, valid, mean, normalizer, fixed_normalizer):
    """mean (0-d) = sum(values) / normalizer, normalizer = max(1, sum(valid)) or fixed_normalizer,
    in one block (a fixed order: deterministic)."""
    fixed = values.dtype.type(-1 if fixed_normalizer is None else fixed_normalizer)
    _launch("fused", f"valid_mean_kernel<{ctype}>", ctype, None, BLOCK,  # one block
            (np.int32(positions), values, valid, mean, normalizer, fixed))


def softmax_loss_backward(prob, labels, top_diff, normalizer, dx, dims, ignore_label):
    """dx = (prob - onehot(label)) * valid * (top_diff / normalizer)."""
    ctype = _float_type(prob, dx, top_diff, normalizer)
    outer, classes, inner = dims
    labels = _input(labels.astype(prob.dtype, copy=False))
    _launch("fused", f"softmax_loss_backward_kernel<{ctype}>", ctype, None, prob.size,
            (np.int64(prob.size), np.int32(classes), np.int32(inner), prob, labels, top_diff, normalizer,
             _output(dx, prob.size, "dx"), *_ignore(ignore_label)))


def instances_source(family):
    """A .cu translation unit that includes FAMILY.cu and takes the address of every template
    instantiation the backend can ask for (tools/check_cu.sh compiles it with nvcc)."""
    names = [n for ctype in _FLOATS.values() for d in range(1, MAX_AXES + 1)
             for n in name_expressions(family, ctype, d)]
    lines = [f'#include "{SOURCES / (family + ".cu")}"', "void* espresso_instances[] = {"]
    lines += [f"    (void*)&{name}," for name in dict.fromkeys(names)]
    return "\n".join(lines + ["};", ""])
