"""Sparse and weight-shared weight matrices for compressed inference.

`SparseMatrix` holds a (rows, cols) weight matrix in CSR form: int32 row pointers, column
indices (uint16 when cols < 65536, else int32) and per stored entry either a float32 value or,
for a weight-shared layer, a uint8 code into a float32 codebook of at most 256 values, so
the dense matrix never exists in memory.  A layer that is quantized but not pruned keeps a
dense (rows, cols) uint8 code matrix and its codebook instead.

Products, per backend:
- CPU with Numba (the `fast` extra): one pass over the stored entries (`_spmm_*` below);
- CPU without Numba, and dense code matrices: rows decoded in chunks of at most
  CHUNK_BYTES into a scratch buffer, then a BLAS GEMM per chunk (bounded extra memory);
- CUDA: cuSPARSE through cupyx.scipy.sparse (values decoded on the device: 8 bytes per
  stored entry).  NOTE: imported only on that path; untested without a GPU here.
"""

import numpy as np

try:
    import numba
except ImportError:  # the `fast` extra is optional
    numba = None

CHUNK_BYTES = 1 << 20


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
    """A compressed (rows, cols) weight matrix on a backend; see the module docstring."""

    cusparse = None  # the cupyx CSR matrix on a CUDA backend

    def __init__(self, cw, rows, cols, backend, dtype=np.float32, transpose=False):
        self.rows, self.cols, self.backend, self.xp = rows, cols, backend, backend.xp
        self.dtype, self.gpu = np.dtype(dtype), backend.name != "cpu"
        self.quantized = cw.codebook is not None
        self.codebook = None if cw.codebook is None else backend.to_device(cw.codebook, self.dtype)
        self.dense_codes = None
        if cw.positions is None:  # quantized or plain, but not pruned
            codes = cw.symbols.reshape((cols, rows) if transpose else (rows, cols))
            self._set_dense(codes.T if transpose else codes)
            return
        live = cw.symbols != 0
        self.indptr, indices, entries = csr_from_positions(cw.positions[live], cw.symbols[live], rows, cols, transpose)
        to = backend.to_device
        self.indptr, self.indices, self.entries = to(self.indptr), to(indices), to(entries)
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

    def matmul_t(self, x, y):
        """y (M, rows) = x (M, cols) @ W^T."""
        if self.cusparse is not None:
            y[...] = (self.cusparse @ x.T).T
        elif self.numba:
            if self.quantized:
                _xt_codes(self.indptr, self.indices, self.entries, self.codebook, x, y)
            else:
                _xt_values(self.indptr, self.indices, self.entries, x, y)
        else:
            for lo, hi, w in self._row_chunks():
                self.xp.matmul(x, w.T, out=y[:, lo:hi])

    def matmul(self, b, y):
        """y (rows, P) = W @ b (cols, P)."""
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
        """(lo, hi, dense rows lo..hi) decoded into one reused scratch buffer."""
        xp, step = self.xp, max(1, CHUNK_BYTES // (self.cols * self.dtype.itemsize))
        scratch = xp.empty((min(step, self.rows), self.cols), self.dtype)
        for lo in range(0, self.rows, step):
            hi = min(lo + step, self.rows)
            w = scratch[: hi - lo]
            self.decode_rows(lo, hi, w)
            yield lo, hi, w

    def decode_rows(self, lo, hi, out):
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
        out = self.xp.empty((self.rows, self.cols), self.dtype)
        self.decode_rows(0, self.rows, out)
        return out


def _cusparse(matrix):
    """The matrix as a cupyx.scipy.sparse CSR matrix with decoded float values (GPU only)."""
    import cupyx.scipy.sparse as cusparse  # noqa: PLC0415 (only on a CUDA backend)

    xp = matrix.xp
    values = matrix.codebook[matrix.entries] if matrix.quantized else matrix.entries
    csr = cusparse.csr_matrix((values.astype(matrix.dtype), matrix.indices.astype(xp.int32), matrix.indptr),
                              shape=(matrix.rows, matrix.cols))
    matrix.entries = matrix.indices = None  # cuSPARSE holds its own copy
    return csr


if numba is not None:
    # One kernel per (product, entry kind): Numba compiles both sides of a branch, and a
    # branch in the inner loop keeps it from vectorizing.  fastmath lets it reorder the sums
    # (results differ from the dense GEMM's by rounding only).
    _FAST = dict(nogil=True, cache=True, fastmath=True)

    @numba.njit(**_FAST)
    def _xt_codes(indptr, indices, codes, codebook, x, y):
        for m in range(x.shape[0]):
            xm = x[m]
            for i in range(indptr.size - 1):
                s = codebook[0] * 0
                for k in range(indptr[i], indptr[i + 1]):
                    s += codebook[codes[k]] * xm[indices[k]]
                y[m, i] = s

    @numba.njit(**_FAST)
    def _xt_values(indptr, indices, values, x, y):
        for m in range(x.shape[0]):
            xm = x[m]
            for i in range(indptr.size - 1):
                s = values[0] * 0
                for k in range(indptr[i], indptr[i + 1]):
                    s += values[k] * xm[indices[k]]
                y[m, i] = s

    @numba.njit(**_FAST)
    def _rows_codes(indptr, indices, codes, codebook, b, y):
        for i in range(indptr.size - 1):
            yi = y[i]
            yi[:] = 0
            for k in range(indptr[i], indptr[i + 1]):
                v, bc = codebook[codes[k]], b[indices[k]]
                for p in range(yi.size):
                    yi[p] += v * bc[p]

    @numba.njit(**_FAST)
    def _rows_values(indptr, indices, values, b, y):
        for i in range(indptr.size - 1):
            yi = y[i]
            yi[:] = 0
            for k in range(indptr[i], indptr[i + 1]):
                v, bc = values[k], b[indices[k]]
                for p in range(yi.size):
                    yi[p] += v * bc[p]
