"""Sparse and weight-shared weight matrices for compressed inference.

`SparseMatrix` holds a (rows, cols) weight matrix in CSR form: int32 row pointers, column
indices (uint16 when cols < 65536, else int32) and per stored entry either a float32 value or,
for a weight-shared layer, a uint8 code into a float32 codebook of at most 256 values, so
the dense matrix never exists in memory.  A layer that is quantized but not pruned, or that
keeps more than DENSE_ABOVE of its weights (CSR would save little there and run slower than a
GEMM), keeps a dense (rows, cols) uint8 code matrix and its codebook instead (float32 values
when it is not quantized).

Products, per backend:
- CPU with Numba (the `fast` extra): fully connected layers scatter each non-zero input
  through CSR of W^T (`_scatter`; a fused run of them in one call, `pack`), convolutions run
  CSR rows of W over the im2col columns (`_rows_*`);
- CPU without Numba, and dense code matrices: rows decoded in chunks of at most
  CHUNK_BYTES into a scratch buffer, then a BLAS GEMM per chunk (bounded extra memory);
- CUDA: cuSPARSE through cupyx.scipy.sparse (values decoded on the device: 8 bytes per
  stored entry).  NOTE: imported only on that path; untested without a GPU here.
"""

import functools

import numpy as np

try:
    import numba
except ImportError:  # the `fast` extra is optional
    numba = None

CHUNK_BYTES = 1 << 20
DENSE_ABOVE = 0.5  # a pruned layer keeping more than this fraction runs from a dense code matrix


def _every_symbol(cw):
    """The symbol (code, or value) of every weight, zero (code 0) where none is stored."""
    if cw.positions is None:
        return cw.symbols
    out = np.zeros(cw.count, cw.symbols.dtype)
    out[cw.positions] = cw.symbols
    return out


def csr_from_positions(positions, values, rows, cols, transpose=False):
    """(indptr, indices, entries) of the (rows, cols) matrix whose flat positions (row-major,
    or of its (cols, rows) transpose when `transpose`) hold `values`; zero entries dropped."""
    positions, values = np.asarray(positions, np.int64), np.asarray(values)
    r, c = (positions % rows, positions // rows) if transpose else (positions // cols, positions % cols)
    order = np.lexsort((c, r))
    r, c, values = r[order], c[order], values[order]
    indptr = np.zeros(rows + 1, np.int32)
    np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
    return indptr, c.astype(np.uint16 if cols < 1 << 16 else np.int32), values


class SparseMatrix:
    """A compressed (rows, cols) weight matrix W on a backend; see the module docstring.

    Stored as CSR of A = W, or with `by_column` as CSR of A = W^T (one run of entries per
    input column), which the fully connected product x W^T prefers on the CPU: it scatters
    each non-zero input into the outputs and skips zero inputs (ReLU outputs, background
    pixels) altogether, as EIE (Han et al., 2016) does; the row form walks every entry with
    two gathers and measured 4x slower at batch 1 on LeNet-300-100's ip1."""

    cusparse = None  # the cupyx CSR matrix on a CUDA backend

    def __init__(self, cw, rows, cols, backend, dtype=np.float32, transpose=False, by_column=False):
        self.rows, self.cols, self.backend, self.xp = rows, cols, backend, backend.xp
        self.dtype, self.gpu = np.dtype(dtype), not backend.host_arrays
        self.by_column = by_column and not self.gpu  # cuSPARSE gets W itself
        self._no_bias = np.zeros(0, self.dtype)
        self.quantized = cw.codebook is not None
        self.codebook = None if cw.codebook is None else backend.to_device(cw.codebook, self.dtype)
        self.dense_codes = None
        # `cw` holds S = W, or W^T when `transpose` (InnerProduct's transpose: true), row-major
        a_shape = (cols, rows) if self.by_column else (rows, cols)
        live = cw.symbols != 0
        if cw.positions is None or live.sum() > DENSE_ABOVE * rows * cols:
            stored = _every_symbol(cw).reshape((cols, rows) if transpose else (rows, cols))
            self._set_dense(stored if transpose == self.by_column else stored.T)
            return
        indptr, indices, entries = csr_from_positions(cw.positions[live], cw.symbols[live], *a_shape,
                                                      transpose != self.by_column)
        to = backend.to_device
        self.indptr, self.indices, self.entries = to(indptr), to(indices), to(entries)
        self.cusparse = _cusparse(self) if self.gpu else None

    def _set_dense(self, codes):
        to = self.backend.to_device
        if self.quantized:
            self.dense_codes = to(np.ascontiguousarray(codes, np.uint8))
        else:  # a plain dense matrix (a layer compressed by no stage)
            self.dense_codes = to(np.ascontiguousarray(codes, self.dtype))

    @property
    def numba(self):
        """Whether the Numba kernels run this matrix (CPU, sparse, Numba installed, non-empty)."""
        return numba is not None and not self.gpu and self.dense_codes is None and self.entries.size > 0

    @property
    def nnz(self):
        return self.rows * self.cols if self.dense_codes is not None else int(self.indptr[-1])

    @property
    def nbytes(self):
        """Bytes this matrix keeps on its device."""
        arrays = [self.codebook, self.dense_codes] + ([] if self.dense_codes is not None else
                                                      [self.indptr, self.indices, self.entries])
        extra = 8 * self.nnz if self.cusparse is not None and self.dense_codes is None else 0
        return sum(a.nbytes for a in arrays if a is not None) + extra

    def product_t(self, bias=None):
        """A function (x, y) -> None computing y (M, rows) = x (M, cols) @ W^T (+ bias), with
        this matrix's arrays bound once (batch-1 inference pays for every Python step)."""
        if self.numba and self.by_column:
            b = self._no_bias if bias is None else bias
            return functools.partial(_scatter, self.indptr, self.indices, self.entries, self.codebook, b, False)
        return functools.partial(self.matmul_t, bias=bias)

    def matmul_t(self, x, y, bias=None):
        """y (M, rows) = x (M, cols) @ W^T (+ bias)."""
        if self.cusparse is not None:
            y[...] = (self.cusparse @ x.T).T
        elif self.numba and self.by_column:
            self.product_t(bias)(x, y)
            return
        elif self.by_column:  # A = W^T: y = sum over row chunks of A of x[:, chunk] @ A[chunk]
            y[...] = 0
            for lo, hi, a in self._row_chunks():
                y += x[:, lo:hi] @ a
        else:
            for lo, hi, w in self._row_chunks():
                self.xp.matmul(x, w.T, out=y[:, lo:hi])
        if bias is not None:
            y += bias

    def matmul(self, b, y):
        """y (rows, P) = W @ b (cols, P)."""
        assert not self.by_column
        if self.cusparse is not None:
            y[...] = self.cusparse @ b
        elif self.numba:
            if self.quantized:
                _rows_codes(self.indptr, self.indices, self.entries, self.codebook, b, y)
            else:
                _rows_values(self.indptr, self.indices, self.entries, b, y)
        else:
            for lo, hi, w in self._row_chunks():
                self.xp.matmul(w, b, out=y[lo:hi])

    def _row_chunks(self):
        """(lo, hi, dense rows lo..hi of A) decoded into one reused scratch buffer."""
        xp, (rows, cols) = self.xp, self._a_shape
        step = max(1, CHUNK_BYTES // (cols * self.dtype.itemsize))
        scratch = xp.empty((min(step, rows), cols), self.dtype)
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            a = scratch[: hi - lo]
            self.decode_rows(lo, hi, a)
            yield lo, hi, a

    @property
    def _a_shape(self):
        return (self.cols, self.rows) if self.by_column else (self.rows, self.cols)

    def decode_rows(self, lo, hi, out):
        """Rows lo..hi of A (W, or W^T with by_column) into `out`."""
        xp = self.xp
        if self.dense_codes is not None:
            rows = self.dense_codes[lo:hi]
            out[...] = self.codebook[rows] if self.quantized else rows
            return
        start, stop = int(self.indptr[lo]), int(self.indptr[hi])
        counts = xp.diff(self.indptr[lo:hi + 1])
        row = xp.repeat(xp.arange(hi - lo), counts.tolist() if self.gpu else counts)
        entries = self.entries[start:stop]
        out[...] = 0
        out[row, self.indices[start:stop].astype(np.int64)] = self.codebook[entries] if self.quantized else entries

    def dense(self):
        """W as a new dense array."""
        out = self.xp.empty(self._a_shape, self.dtype)
        self.decode_rows(0, self._a_shape[0], out)
        return out.T.copy() if self.by_column else out


def pack(matrices, relus):
    """A function bind(first, biases, x, ys) -> f, f() running the fully connected layers
    first.. of a fused run in one Numba call (`_scatter_run`): layer j has matrices[j], bias
    biases[j] and output ys[j], a ReLU after it where relus[j], and reads x (j == 0) or
    ys[j - 1].  The matrices' arrays are concatenated and each matrix's own become views
    into them (nothing is stored twice).  None where the matrices do not run the same Numba
    kernel (dense codes, quantized or not, index widths)."""
    a = matrices[0]
    if not all(m.numba and m.by_column and (m.quantized, m.indices.dtype) == (a.quantized, a.indices.dtype)
               for m in matrices):
        return None
    table = np.zeros((len(matrices), 4), np.int64)
    table[:, 3] = relus
    packed = {}
    for name, column in (("indptr", 0), ("indices", 1), ("entries", 1), ("codebook", 2)):
        if getattr(a, name) is None:  # no codebook: entries are values
            packed[name] = None
            continue
        parts = [getattr(m, name) for m in matrices]
        offsets = np.cumsum([0] + [part.size for part in parts])
        packed[name] = np.concatenate(parts)
        for m, lo, hi in zip(matrices, offsets[:-1], offsets[1:]):
            setattr(m, name, packed[name][lo:hi])
        table[:, column] = offsets[:-1]

    def bind(first, biases, x, ys):
        # the compiled function itself: Numba's per-call dispatch on the argument types costs
        # ~0.8 us for these tuples, and the arguments keep their types until the next bind
        args = (table, *packed.values(), first, biases, x, ys)
        return functools.partial(_scatter_run.compile(tuple(numba.typeof(v) for v in args)), *args)

    return bind


def _cusparse(matrix):
    """The matrix as a cupyx.scipy.sparse CSR matrix with decoded float values (GPU only)."""
    xp, csr_matrix = matrix.xp, matrix.backend.k.csr_matrix
    values = matrix.codebook[matrix.entries] if matrix.quantized else matrix.entries
    csr = csr_matrix(values.astype(matrix.dtype), matrix.indices.astype(xp.int32), matrix.indptr,
                     (matrix.rows, matrix.cols))
    matrix.entries = matrix.indices = None  # cuSPARSE holds its own copy
    return csr


if numba is not None:
    # One kernel per (product, entry kind): Numba compiles both sides of a branch, and a
    # branch in the inner loop keeps it from vectorizing.  Indices are cast to unsigned so
    # that Numba drops its negative-index wraparound code (1.5x on LeNet-300-100's ip1).
    # fastmath lets it reorder sums (results differ from the dense GEMM's by rounding only).
    _FAST = dict(nogil=True, cache=True, fastmath=True)
    _u = numba.uint32

    @numba.njit(**_FAST)
    def _scatter(indptr, indices, entries, codebook, bias, relu, x, y):
        """y[m] = x[m] W^T + bias from CSR of W^T: each non-zero input scattered into the
        outputs; then max(y, 0) with `relu` (a fused in-place ReLU).  `codebook` None: the
        entries are the values (Numba compiles only the branch the argument types take)."""
        for m in range(x.shape[0]):
            xm, ym = x[m], y[m]
            for r in range(ym.size):
                ym[r] = bias[r] if bias.size else 0
            start = _u(indptr[0])
            for c in range(xm.size):
                stop, xc = _u(indptr[c + 1]), xm[c]
                if xc != 0:
                    if codebook is None:
                        for k in range(start, stop):
                            ym[_u(indices[k])] += entries[k] * xc
                    else:
                        for k in range(start, stop):
                            ym[_u(indices[k])] += codebook[_u(entries[k])] * xc
                start = stop
            if relu:
                for r in range(ym.size):
                    ym[r] = max(ym[r], 0)

    @numba.njit(**_FAST)
    def _scatter_run(table, indptr, indices, entries, codebooks, first, biases, x, ys):
        """Fully connected layers first.. of a fused run, packed by `pack`: layer j reads x
        (j == 0) or ys[j - 1] and writes ys[j]; table[j] = offsets of its indptr, entries and
        codebook in the packed arrays, and whether a ReLU follows it."""
        for j in range(first, len(ys)):
            xj = x if j == 0 else ys[j - 1]
            io, eo, co, relu = table[j, 0], table[j, 1], table[j, 2], table[j, 3] != 0
            ip = indptr[io:io + xj.shape[1] + 1]
            if codebooks is None:
                _scatter(ip, indices[eo:], entries[eo:], None, biases[j], relu, xj, ys[j])
            else:
                _scatter(ip, indices[eo:], entries[eo:], codebooks[co:], biases[j], relu, xj, ys[j])

    @numba.njit(**_FAST)
    def _rows_codes(indptr, indices, codes, codebook, b, y):
        for i in range(indptr.size - 1):
            yi = y[i]
            yi[:] = 0
            for k in range(_u(indptr[i]), _u(indptr[i + 1])):
                v, bc = codebook[_u(codes[k])], b[_u(indices[k])]
                for p in range(yi.size):
                    yi[p] += v * bc[p]

    @numba.njit(**_FAST)
    def _rows_values(indptr, indices, values, b, y):
        for i in range(indptr.size - 1):
            yi = y[i]
            yi[:] = 0
            for k in range(_u(indptr[i]), _u(indptr[i + 1])):
                v, bc = values[k], b[_u(indices[k])]
                for p in range(yi.size):
                    yi[p] += v * bc[p]
