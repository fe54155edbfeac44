"""GEMM through cuBLAS with the backend's own handle, so that it can be captured in a CUDA graph.

CuPy refuses every cuBLAS call while a stream is capturing (its matmul and its low-level binding
alike), but cuBLAS itself captures fine when the handle is bound to the capturing stream and owns
a preallocated workspace (so it never allocates inside the capture).  This module calls the
library that CuPy already loaded, through ctypes: create a handle, bind stream and workspace, and
run (strided-batched) S/DGEMM.  `matmul(a, b, out)` takes NumPy's broadcasting batched-matmul
shapes on CuPy arrays, any mix of row- and column-major matrix views (transposes are cuBLAS ops,
not copies) and batch dimensions that collapse to one uniform stride per operand (else a Python
loop over the other batch axes).  A small output with a long inner dimension is computed in
slices of it (split-K, `split_parts`), which keeps more of the GPU busy.  Results are
deterministic for one GPU, stream and workspace.
"""

import ctypes
import ctypes.util
import math

import numpy as np

from espresso import graphs
from espresso.backend.cuda import kernels
from espresso.errors import BackendError

OP_N, OP_T = 0, 1
DEFAULT_MATH, TF32_MATH = 0, 3  # cublasMath_t: float32 semantics / TF32 tensor cores allowed
WORKSPACE_BYTES = 32 << 20  # NVIDIA's recommendation for Hopper
# the side stream's handle (parameter gradients put aside): 4 MiB ran LeNet b64/b256 and CaffeNet
# training at the speed of 32 MiB on the H100 (benchmarks/results/perf4_h100) with 28 MiB less peak
SIDE_WORKSPACE_BYTES = 4 << 20
MAX_PARTS, MIN_SLICE = 16, 64  # split-K: at most this many slices, each at least this long
CUDA_R_32F, COMPUTE_32F, GEMM_DEFAULT = 0, 68, -1  # cudaDataType_t, cublasComputeType_t, cublasGemmAlgo_t
CUDA_R_8I, CUDA_R_32I, COMPUTE_32I = 3, 10, 72
_HALF_TYPES = {"float16": 2, "bfloat16": 14}  # CUDA_R_16F, CUDA_R_16BF
COMPUTE_TF32 = 77  # CUBLAS_COMPUTE_32F_FAST_TF32
# cublasLtMatmulDescAttributes_t, cublasLtEpilogue_t, cublasLtMatmulPreferenceAttributes_t
LT_TRANSA, LT_TRANSB, LT_EPILOGUE, LT_BIAS_POINTER, LT_PREF_MAX_WORKSPACE_BYTES = 3, 4, 7, 8, 1
LT_EPILOGUE_BIAS, LT_EPILOGUE_RELU_BIAS = 4, 6
LT_PREF_MIN_ALIGNMENTS = (5, 6, 7, 8)  # of A, B, C and D (uint32 bytes; 256 assumed if not set)
_GEMM = {np.dtype(np.float32): ("cublasSgemm_v2", "cublasSgemmStridedBatched", ctypes.c_float),
         np.dtype(np.float64): ("cublasDgemm_v2", "cublasDgemmStridedBatched", ctypes.c_double)}


def call_failed(lib, call, status, text_functions):
    """The BackendError for a library call that returned `status`: the call's name, the status
    and the library's own name and text for it (from `text_functions`, those this version has)."""
    texts = []
    for name in text_functions:
        function = getattr(lib, name, None)  # (older libraries lack some)
        if function is not None:
            function.restype = ctypes.c_char_p
            texts.append(function(status).decode(errors="replace"))
    return BackendError(f"{call} failed with status {status}" + (f": {', '.join(texts)}" if texts else ""))


def _library(name="cublas"):
    """The lib`name` this process already uses (CuPy loaded libcublas, which loads libcublasLt),
    else the one the loader finds."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if f"/lib{name}.so" in line}
        if paths:
            return ctypes.CDLL(sorted(paths)[0])
    except OSError:
        pass
    for soname in (f"lib{name}.so.13", f"lib{name}.so.12", ctypes.util.find_library(name)):
        if soname:
            try:
                return ctypes.CDLL(soname)
            except OSError:
                continue
    raise OSError(f"lib{name} not found (install CuPy with its CUDA libraries)")


class Blas:
    """One cuBLAS handle bound to `stream`, with a workspace of its own (`workspace_bytes`,
    allocated by `xp`); `backend`'s graphs are voided when a buffer of its moves."""

    def __init__(self, xp, stream, backend, workspace_bytes):
        xp.cuda.device.get_cublas_handle()  # makes CuPy load libcublas, so ours is the same copy
        self.xp, self.backend, self.parts = xp, backend, {}  # parts: dtype -> split-K buffer
        self.processors = xp.cuda.Device().attributes["MultiProcessorCount"]
        self.lib = _library()
        handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = xp.empty(workspace_bytes, np.uint8)
        self._check(self.lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        self._check(self.lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                   ctypes.c_size_t(workspace_bytes)), "cublasSetWorkspace")
        self.stream, self.lt, self.biased = stream, None, {}  # cuBLASLt: made on first use (matmul_bias)
        self.set_tf32(False)

    def set_tf32(self, allow):
        """Allow TF32 tensor cores for float32 GEMMs (10-bit mantissa products), or not."""
        self.tf32 = bool(allow)
        self._check(self.lib.cublasSetMathMode(self.handle, TF32_MATH if allow else DEFAULT_MATH),
                    "cublasSetMathMode")

    def _check(self, status, what):
        if status != 0:
            raise call_failed(self.lib, what, status, ("cublasGetStatusName", "cublasGetStatusString"))

    def matmul(self, a, b, out, accumulate=False, bias=None, relu=None):
        """out = a @ b (or out += a @ b), NumPy's batched-matmul rules; out is never broadcast.
        A bias (matmul_bias's, where cuBLASLt is not used) is added after, then a ReLU of negative
        slope `relu` where given."""
        dtype = np.dtype(out.dtype)
        if dtype not in _GEMM or a.dtype != dtype or b.dtype != dtype:
            raise TypeError(f"matmul takes float32 or float64 arrays of one type, got {a.dtype}, {b.dtype}, {dtype}")
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or \
                out.shape[-2:] != (a.shape[-2], b.shape[-1]):
            raise ValueError(f"matmul shapes {a.shape} @ {b.shape} -> {out.shape} do not fit")
        batch = out.shape[:-2]
        if np.broadcast_shapes(a.shape[:-2], b.shape[:-2], batch) != batch:
            raise ValueError(f"matmul batch shapes {a.shape[:-2]}, {b.shape[:-2]} do not broadcast to {batch}")
        a, b = (_gemm_operand(x) for x in (a, b))
        if _layout(out) != "row":
            raise ValueError(f"matmul out must have unit column stride, got strides {out.strides}")
        m, n, k = out.shape[-2], out.shape[-1], a.shape[-1]
        if m * n == 0:
            return out
        parts = self.split_parts(m, n, k) if not batch and out.flags.c_contiguous else 1
        if parts > 1:  # (the bias and the ReLU where the parts are summed)
            return self._split_k(a, b, out, parts, accumulate, bias, relu)
        if k == 0:
            if not accumulate:
                out.fill(0)
        else:
            strides = [_batch_strides(x, batch) for x in (a, b, out)]
            for index, batched in _batch_plan(batch, strides):
                offsets = [sum(i * s[d] for d, i in index.items()) for s in strides]
                self._gemm(a, b, out, offsets, batched, accumulate)
        if bias is not None:
            out += bias
        if relu is not None:
            kernels.relu_forward(out, out, relu)
        return out

    def matmul_bias(self, a, b, bias, out, relu=None):
        """out = a @ b + bias (bias (n,) added to every row) for 2-D a (m, k) and b (k, n): one
        cuBLASLt call with the bias in its epilogue where it can (float32, an output that is not
        split, cuBLASLt finds an algorithm), else the GEMM and an add.  LeNet's inner products
        at batch 1 ran as two kernels each.  `relu`: a ReLU's negative slope, the ReLU applied
        after (in the epilogue too where the slope is 0)."""
        # (cuBLASLt picks algorithms for the pointers' alignments: a param arena's views have any)
        aligned = tuple(_alignment(x) for x in (b, a, out, bias))
        epilogue = LT_EPILOGUE_RELU_BIAS if relu == 0 else LT_EPILOGUE_BIAS
        key = (a.shape, b.shape, a.strides, b.strides, out.strides, bias.shape, bias.strides,
               tuple(np.dtype(x.dtype).str for x in (a, b, out, bias)), self.tf32, aligned, epilogue)
        if key not in self.biased:
            self.biased[key] = self._bias_plan(a, b, bias, out, aligned, epilogue)
        plan = self.biased[key]
        if plan is None:
            return self.matmul(a, b, out, bias=bias, relu=relu)
        (desc, layouts, algo), one, zero = plan, ctypes.c_float(1), ctypes.c_float(0)
        self._set_lt(desc, LT_BIAS_POINTER, ctypes.c_void_p(bias.data.ptr))
        pa, pb, pc = (ctypes.c_void_p(x.data.ptr) for x in (a, b, out))
        # column-major, out^T = b^T a^T: cuBLASLt's A is our b, its B our a (as in _gemm)
        status = self.lt_lib.cublasLtMatmul(self.lt, desc, ctypes.byref(one), pb, layouts[0], pa, layouts[1],
                                            ctypes.byref(zero), pc, layouts[2], pc, layouts[2], ctypes.byref(algo),
                                            ctypes.c_void_p(self.workspace.data.ptr),
                                            ctypes.c_size_t(self.workspace.nbytes), ctypes.c_void_p(self.stream.ptr))
        self._check(status, "cublasLtMatmul")
        if relu is not None and epilogue != LT_EPILOGUE_RELU_BIAS:  # (a leaky ReLU: cuBLASLt has none)
            kernels.relu_forward(out, out, relu)
        return out

    def _bias_plan(self, a, b, bias, out, aligned, epilogue):
        """(matmul descriptor, layouts of b, a and out, algorithm) for matmul_bias, or None where
        cuBLASLt is not used.  `aligned`: the alignments of b, a, out and bias, in bytes;
        `epilogue`: the bias's, or the bias's and a ReLU's."""
        m, n, k = out.shape[0], out.shape[1], a.shape[1]
        # (no preference states the bias's alignment: cuBLASLt may assume 16 bytes, and a bias in
        # a training net's param arena lies at any 4-byte offset; PyTorch declines those too)
        if (np.dtype(out.dtype) != np.float32 or a.dtype != out.dtype or b.dtype != out.dtype or a.ndim != 2
                or b.ndim != 2 or not out.flags.c_contiguous or min(m, n, k) == 0 or self.split_parts(m, n, k) > 1
                or aligned[3] < 16 or bias.dtype != out.dtype or bias.shape != (n,) or not bias.flags.c_contiguous
                or any(_layout(x) is None or any(s % x.itemsize for s in x.strides) for x in (a, b))):
            return None
        if self.lt is None:
            self.lt_lib, self.lt = _library("cublasLt"), ctypes.c_void_p()
            self._check(self.lt_lib.cublasLtCreate(ctypes.byref(self.lt)), "cublasLtCreate")
        (op_a, lda), (op_b, ldb) = _op_ld(a), _op_ld(b)
        desc = ctypes.c_void_p()
        self._check(self.lt_lib.cublasLtMatmulDescCreate(ctypes.byref(desc), COMPUTE_TF32 if self.tf32 else COMPUTE_32F,
                                                         CUDA_R_32F), "cublasLtMatmulDescCreate")
        for attribute, value in ((LT_TRANSA, ctypes.c_int32(op_b)), (LT_TRANSB, ctypes.c_int32(op_a)),
                                 (LT_EPILOGUE, ctypes.c_uint32(epilogue)),
                                 (LT_BIAS_POINTER, ctypes.c_void_p(bias.data.ptr))):
            self._set_lt(desc, attribute, value)
        stored = [(n, k) if op_b == OP_N else (k, n), (k, m) if op_a == OP_N else (m, k), (n, m)]
        layouts = [self._lt_layout(rows, cols, ld) for (rows, cols), ld in zip(stored, (ldb, lda, n))]
        algo = self._lt_algorithm(desc, layouts, aligned[:3] + aligned[2:3])  # C and D are both out
        return None if algo is None else (desc, layouts, algo)

    def _lt_layout(self, rows, cols, ld):
        """A cuBLASLt float32 matrix layout: column-major rows x cols, leading dimension ld."""
        layout = ctypes.c_void_p()
        self._check(self.lt_lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), CUDA_R_32F, ctypes.c_uint64(rows),
                                                           ctypes.c_uint64(cols), ctypes.c_int64(ld)),
                    "cublasLtMatrixLayoutCreate")
        return layout

    def _lt_algorithm(self, desc, layouts, alignments):
        """cuBLASLt's first choice for `desc` on `layouts` (A, B, C = D) within this handle's
        workspace and the operands' `alignments` (A, B, C, D), or None if it has none."""
        lib, preference = self.lt_lib, ctypes.c_void_p()
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
        wants = [(LT_PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(self.workspace.nbytes))]
        wants += [(attribute, ctypes.c_uint32(bytes_)) for attribute, bytes_ in zip(LT_PREF_MIN_ALIGNMENTS, alignments)]
        for attribute, value in wants:
            self._check(lib.cublasLtMatmulPreferenceSetAttribute(preference, attribute, ctypes.byref(value),
                                                                 ctypes.sizeof(value)),
                        "cublasLtMatmulPreferenceSetAttribute")
        result, found = _LtHeuristic(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.lt, desc, layouts[0], layouts[1], layouts[2], layouts[2],
                                                    preference, 1, ctypes.byref(result), ctypes.byref(found))
        lib.cublasLtMatmulPreferenceDestroy(preference)
        return result.algo if status == 0 and found.value and result.state == 0 else None

    def _set_lt(self, desc, attribute, value):
        self._check(self.lt_lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value),
                                                               ctypes.sizeof(value)), "cublasLtMatmulDescSetAttribute")

    def split_parts(self, m, n, k):
        """Into how many slices of its inner dimension a small-output GEMM is split (1: none).
        cuBLAS gives an (m, n) output about m n / 32^2 thread blocks, each looping over all of k:
        LeNet's ip1 at batch 64 (64 x 500, k 800) kept 32 of the H100's 132 multiprocessors busy
        for 26 us.  Split into p slices (p dividing k, each at least MIN_SLICE long) until about
        two blocks per multiprocessor, the partial products then summed by one more GEMM.  Only
        where the output leaves over half the multiprocessors idle (LeNet's training at batch
        256, whose ip1 has 128 tiles, took 0.370 ms with it split in two, 0.348-0.349 unsplit),
        and not where m or n is below 32: CaffeNet's fc6 at
        batch 1 (a GEMV) ran slower split."""
        tiles = -(-m // 32) * -(-n // 32)
        if 2 * tiles > self.processors or k < 2 * MIN_SLICE or min(m, n) < 32:
            return 1  # (a product with a few rows or columns reads its matrix once: memory-bound)
        most = min(MAX_PARTS, k // MIN_SLICE, -(-2 * self.processors // tiles))
        return next(p for p in range(most, 0, -1) if k % p == 0)

    def _split_k(self, a, b, out, parts, accumulate, bias=None, relu=None):
        """out (+)= a @ b (+ bias) as `parts` products of k-slices (one strided-batched GEMM into a
        buffer of this handle's) and their sum, with the bias, in one kernel (kernels.sum_parts: a
        GEMM with a row of ones and an add took two)."""
        (m, k), n, xp = a.shape, b.shape[1], self.xp
        slice_k = k // parts
        dtype = np.dtype(out.dtype)
        if dtype not in self.parts or self.parts[dtype].size < parts * m * n:
            # made or grown in the eager run that precedes a capture: never inside one
            self.parts[dtype] = xp.empty(parts * m * n, dtype)
            graphs.invalidate(self.backend)
        buffer = self.parts[dtype]
        sliced_a = xp.lib.stride_tricks.as_strided(a, (parts, m, slice_k), (a.strides[1] * slice_k, *a.strides))
        sliced_b = xp.lib.stride_tricks.as_strided(b, (parts, slice_k, n), (b.strides[0] * slice_k, *b.strides))
        products = buffer[: parts * m * n].reshape(parts, m, n)
        self.matmul(sliced_a, sliced_b, products)
        return kernels.sum_parts(products, out, accumulate, bias, relu)

    def half_matmul_t(self, x16, w16, y, type_name):
        """y = x16 @ w16^T in float32 from 16-bit operands (espresso/compress/half.py)."""
        _half_gemm(self, x16, w16, y, type_name)

    def int8_matmul_t(self, w8, x8, acc):
        """acc (M, R) int32 = w8 (M, K) @ x8 (R, K)^T from int8 operands (espresso/compress/int8.py);
        x8's and acc's rows may be strided (a group's columns of the patches, its rows of the sums).
        Column-major, acc^T = x8 w8^T: A = x8 read transposed ("TN", the layout cuBLAS's int8
        tensor-core kernels take), B = w8."""
        (m, k), rows = w8.shape, x8.shape[0]
        one, zero = ctypes.c_int(1), ctypes.c_int(0)
        px, pw, pc = (ctypes.c_void_p(a.data.ptr) for a in (x8, w8, acc))
        status = self.lib.cublasGemmEx(self.handle, OP_T, OP_N, rows, m, k, ctypes.byref(one), px, CUDA_R_8I,
                                       x8.strides[0], pw, CUDA_R_8I, k, ctypes.byref(zero), pc, CUDA_R_32I,
                                       acc.strides[0] // 4, COMPUTE_32I, GEMM_DEFAULT)
        self._check(status, "cublasGemmEx (int8)")

    def _gemm(self, a, b, out, offsets, batched, accumulate):
        """One (strided-batched) call.  Row-major C = A B is column-major C^T = B^T A^T."""
        itemsize, (m, n), k = out.itemsize, out.shape[-2:], a.shape[-1]
        single, strided, scalar = _GEMM[np.dtype(out.dtype)]
        pa, pb, pc = (ctypes.c_void_p(x.data.ptr + offset * itemsize) for x, offset in zip((a, b, out), offsets))
        (op_a, lda), (op_b, ldb), ldc = _op_ld(a), _op_ld(b), _op_ld(out)[1]
        alpha, beta = scalar(1), scalar(1 if accumulate else 0)
        head = (self.handle, op_b, op_a, n, m, k, ctypes.byref(alpha))  # cuBLAS's A is our b
        if batched is None:
            status = getattr(self.lib, single)(*head, pb, ldb, pa, lda, ctypes.byref(beta), pc, ldc)
        else:
            count, (sa, sb, sc) = batched
            status = getattr(self.lib, strided)(*head, pb, ldb, ctypes.c_longlong(sb), pa, lda,
                                                ctypes.c_longlong(sa), ctypes.byref(beta), pc, ldc,
                                                ctypes.c_longlong(sc), count)
        self._check(status, strided if batched else single)


class _LtHeuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: an algorithm (cublasLtMatmulAlgo_t, 8 words) and what it needs."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _half_gemm(blas, x16, w16, y, type_name):
    """y (M, N) float32 = x16 (M, K) @ w16 (N, K)^T, 16-bit operands of `type_name` (float16 or
    bfloat16) and float32 accumulation (cublasGemmEx, compute type 32F: tensor cores).
    Column-major, that is y^T = w16 x16^T: A = w16 read transposed (lda K), B = x16 (ldb K)."""
    (m, k), n = x16.shape, w16.shape[0]
    data_type = _HALF_TYPES[type_name]
    alpha, beta = ctypes.c_float(1), ctypes.c_float(0)
    pw, px, py = (ctypes.c_void_p(a.data.ptr) for a in (w16, x16, y))
    status = blas.lib.cublasGemmEx(blas.handle, OP_T, OP_N, n, m, k, ctypes.byref(alpha), pw, data_type, k, px,
                                   data_type, k, ctypes.byref(beta), py, CUDA_R_32F, n, COMPUTE_32F, GEMM_DEFAULT)
    blas._check(status, "cublasGemmEx")


def _alignment(x):
    """The largest power of two (at most 256) dividing x's device address, in bytes."""
    ptr = x.data.ptr
    return min(256, ptr & -ptr) if ptr else 256


def _layout(x):
    """'row' when x's last two axes are row-major (unit column stride), 'col' when column-major,
    None otherwise.  Size-1 axes fit either."""
    rows, cols = x.shape[-2:]
    sr, sc = (s // x.itemsize for s in x.strides[-2:])
    if (sc == 1 or cols == 1) and (sr >= cols or rows == 1):
        return "row"
    if (sr == 1 or rows == 1) and (sc >= rows or cols == 1):
        return "col"
    return None


def _gemm_operand(x):
    """x itself when cuBLAS can read its matrices in place, else a C-contiguous copy."""
    if _layout(x) is None or any(s % x.itemsize or s < 0 for s in x.strides):
        return x.copy()
    return x


def _op_ld(x):
    """(cuBLAS op, leading dimension) that reads row-major x (r, c) as its column-major transpose."""
    rows, cols = x.shape[-2:]
    sr, sc = (s // x.itemsize for s in x.strides[-2:])
    if _layout(x) == "row":
        return OP_N, max(sr if rows > 1 else cols, cols, 1)
    return OP_T, max(sc if cols > 1 else rows, rows, 1)


def _batch_strides(x, batch):
    """x's element strides along the broadcast batch axes (0 where x is broadcast)."""
    lead = len(batch) - (x.ndim - 2)
    strides = [0] * lead + [s // x.itemsize for s in x.strides[:-2]]
    return [0 if x_dim == 1 else s for x_dim, s in zip((1,) * lead + x.shape[:-2], strides)]


def _batch_plan(batch, strides):
    """[(fixed batch indices {axis: i}, (count, (stride_a, stride_b, stride_c)) or None)]:
    the calls that cover the batch, one strided-batched call per run of a collapsible axis."""
    axes = [d for d, size in enumerate(batch) if size > 1]
    if not axes:
        return [({}, None)]
    if _collapsible(axes, batch, strides):
        inner = axes[-1]
        count = math.prod(batch[d] for d in axes)
        return [({}, (count, tuple(s[inner] for s in strides)))]
    inner = max(axes, key=lambda d: batch[d])  # one batched call over the longest axis, loop the rest
    loops = [d for d in axes if d != inner]
    plan = []
    for index in np.ndindex(*(batch[d] for d in loops)):
        plan.append((dict(zip(loops, index)), (batch[inner], tuple(s[inner] for s in strides))))
    return plan


def _collapsible(axes, batch, strides):
    """True when the non-trivial batch axes form one uniform stride for every operand."""
    for outer, inner in zip(axes, axes[1:]):
        if any(s[outer] != s[inner] * batch[inner] for s in strides):
            return False
    return True
