"""CPU versions of the named primitives.  The CUDA backend mirrors every signature here.

Each primitive works on whole batches (no Python loop per sample or per pixel) and writes
into the output arrays it is given, so callers control every allocation.

Conventions shared by the primitives below:
- Images are C-contiguous (N, C, *S) arrays with D spatial axes; `kernel`, `stride`, `pad`
  and `dilation` are D-tuples of ints.  Output sizes are read from the output array's shape.
- Columns follow Caffe's row order (c, k_1..k_D) and its column order (o_1..o_D), in one of
  two layouts (`batch_last`):
    False  (N, C*prod(K), prod(O))   Caffe's per-image matrix, stacked over the batch
    True   (C*prod(K), prod(O)*N)    one matrix for the whole batch, the batch innermost
  The batch-last layout keeps the inner copy loops long when maps are small and allows one
  large GEMM per group; the batch-major one needs no transposes.
- `work` takes a flat contiguous buffer of at least `*_workspace_size(...)` elements,
  allocated once by the layer's reshape (the CUDA backend needs none and reports 0); None
  makes the primitive allocate one for that call.
- Loops run over kernel offsets (prod(K) iterations), never over samples or pixels.
"""

import functools
import itertools
import math
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

try:  # the optional `fast` extra: Numba loops for the 2-D cases NumPy handles poorly
    from espresso.backend.cpu import fast
except ImportError:
    fast = None

FLT_MIN = float(np.finfo(np.float32).tiny)  # Caffe's FLT_MIN, SoftmaxWithLoss's floor on probabilities
FLT_MAX = float(np.finfo(np.float32).max)  # Caffe's: MAX pooling's running maximum starts at -FLT_MAX
# the contract's fused fast paths (espresso/backend/__init__.py): with Numba the SGD step, the
# SoftmaxWithLoss pair, im2row and row2im (below); the rest none (layers use xp code)
relu_forward = relu_backward = softmax_forward = None
accuracy_forward = direct_conv_forward = direct_conv_weight_grad = None
channel_sums_workspace_size = channel_sums = batch_norm_forward = batch_norm_backward = scale_forward = None
gather_batch = record_iteration = csr_matrix = add_relu = matmul_bias_relu = None


def _sgd_update(w, g, h, segments, rate, momentum, normalize, regularization):
    """Caffe's SGD step over the arena in one pass (the CUDA kernel's contract): LeNet's arena
    (431k floats) took 0.33-0.41 ms in NumPy's 8 passes, 0.10 ms in this one (2-core VM).  `rate`: a
    number or a 0-d array."""
    t = w.dtype.type
    fast.sgd_update(w, g, h, *segments, t(rate), t(momentum), t(normalize), regularization)


sgd_update = _sgd_update if fast is not None else None


def _softmax_loss_forward(x, labels, prob, losses, valid, loss, normalizer, dims, ignore_label, fixed_normalizer,
                          problem):
    """SoftmaxWithLoss forward in one kernel (the CUDA kernel's contract; `losses` and `valid`
    hold each position's max and sum): in a LeNet b64 training step, forward and backward took
    0.19 ms as NumPy calls, 0.06 ms so.  A label that is no class counts as ignored and is
    recorded in `problem` (position + 1, label) unless one is; where `problem` is None (host
    arrays) it is returned for the layer to raise, the loss unwritten."""
    t = x.dtype.type
    ignore = 0 if ignore_label is None else ignore_label
    total, counted, bad, label = fast.softmax_loss_forward(x.reshape(dims), labels.reshape(-1), prob.reshape(dims),
                                                           losses, valid, ignore, ignore_label is not None, t(FLT_MIN))
    if bad and problem is None:
        return bad, label
    if bad and not problem[0]:
        problem[...] = bad, label
    normalizer[...] = max(1, counted) if fixed_normalizer is None else fixed_normalizer
    loss[...] = t(total) / normalizer
    return None


def _softmax_loss_backward(prob, labels, top_diff, normalizer, dx, dims, ignore_label):
    """dx = (prob - onehot(label)) * valid * (top_diff / normalizer)."""
    fast.softmax_loss_backward(prob.reshape(dims), labels.reshape(-1), (top_diff / normalizer)[()], dx.reshape(dims),
                               0 if ignore_label is None else ignore_label, ignore_label is not None)


softmax_loss_forward, softmax_loss_backward = ((_softmax_loss_forward, _softmax_loss_backward) if fast is not None
                                               else (None, None))
# the most inputs the pair takes (SoftmaxWithLoss's xp code beyond): Numba's exp is scalar, NumPy's
# calls cost more than their vector exp saves only for small ones (2 cores, forward and backward:
# fused 0.01 against 0.05 ms at LeNet's 640 inputs, even between 6,400 and 17,000, 0.52 against
# 0.21 at 64,000)
SOFTMAX_LOSS_MOST = 1 << 14

# *** geometry helpers ***
def _view(array, shape):
    """`array` reshaped without a copy (raises if that is impossible): outputs must stay views."""
    return array.reshape(shape, copy=False)


def _carve(work, shape, dtype):
    """A `shape` view of the front of the flat buffer `work` (or a fresh array when None)."""
    if work is None:
        return np.empty(shape, dtype)
    return _view(work[: math.prod(shape)], shape)


def _window_view(src, lead, out, stride, dilation, kernel):
    """Windows of `src` (lead axes, D spatial axes, trailing axes) as a read-only view of
    shape (*lead, *out, *kernel, *trailing)."""
    d = len(out)
    spatial = src.strides[lead: lead + d]
    shape = src.shape[:lead] + tuple(out) + tuple(kernel) + src.shape[lead + d:]
    strides = (src.strides[:lead] + tuple(s * t for s, t in zip(stride, spatial))
               + tuple(s * t for s, t in zip(dilation, spatial)) + src.strides[lead + d:])
    return as_strided(src, shape, strides, writeable=False)


def _taps(offset, stride, dilation, out):
    """Slices of a padded image hit by kernel offset `offset` over all output positions."""
    return tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                 for o, s, d, m in zip(offset, stride, dilation, out))


def _offsets(kernel):
    return itertools.product(*(range(k) for k in kernel))


def _stage(x, work, pad, extent, value, last=None):
    """Copy x (N, C, *S) into `work` of spatial size `extent` at offset `pad`, the rest set to
    `value`.  `last` moves an axis of x innermost: 0 the batch, (C, *extent, N); 1 the channels,
    (N, *extent, C); None neither, (N, C, *extent).  Returns the staged array."""
    n, c, *spatial = x.shape
    shape = {None: (n, c, *extent), 0: (c, *extent, n), 1: (n, *extent, c)}[last]
    staged = _carve(work, shape, x.dtype)
    lead = 2 if last is None else 1
    inner = tuple(slice(p, p + s) for p, s in zip(pad, spatial))
    for axis, (p, s, e) in enumerate(zip(pad, spatial, extent)):
        head = (slice(None),) * (lead + axis)
        staged[head + (slice(0, p),)] = value
        staged[head + (slice(p + s, e),)] = value
    staged[(slice(None),) * lead + inner] = x if last is None else np.moveaxis(x, last, -1)
    return staged


def _unstage(staged, x, pad, last=None):
    """The interior of a staged array (`_stage`'s layouts) written back into x (N, C, *S)."""
    lead = 2 if last is None else 1
    inner = tuple(slice(p, p + s) for p, s in zip(pad, x.shape[2:]))
    region = staged[(slice(None),) * lead + inner]
    x[...] = region if last is None else np.moveaxis(region, -1, last)


# *** im2col / col2im ***
def matmul(a, b, out, accumulate=False):
    """out = a @ b (or, accumulating, out += a @ b: Caffe's GEMM with beta = 1) with NumPy's
    batched-matmul rules: the GEMM every layer calls through `k`.  Accumulating goes through a
    product buffer kept per thread, so the hot path allocates nothing after the first call: of at
    most PRODUCT_ELEMENTS (a larger output accumulates a block of rows at a time; a whole-size
    buffer doubled CaffeNet's fully connected gradients, 234 MB).  There the product may be
    computed transposed, where that is faster."""
    if not accumulate:
        return np.matmul(a, b, out=out)
    m = out.shape[-2]
    if _transposed_is_faster(a, b) and out.size <= PRODUCT_ELEMENTS:  # out += (b^T @ a^T)^T
        product = np.matmul(b.swapaxes(-1, -2), a.swapaxes(-1, -2), out=_product(out.swapaxes(-1, -2).shape, out.dtype))
        return np.add(out, product.swapaxes(-1, -2), out=out)
    block = max(1, PRODUCT_ELEMENTS // max(1, out.size // m))
    for lo in range(0, m, block):
        rows = out[..., lo:lo + block, :]
        np.add(rows, np.matmul(a[..., lo:lo + block, :], b, out=_product(rows.shape, out.dtype)), out=rows)
    return out


def matmul_bias(a, b, bias, out):
    """out = a @ b + bias (n,) for 2-D a (m, k) and b (k, n): InnerProduct's forward, x @ W^T,
    which runs as (W @ x^T)^T where that is faster (the bias added in the pass that transposes):
    from 4 rows, for weights of 64k or more.  Measured (us direct / transposed), LeNet's ip1
    (500 x 800) at m = 1, 2: 22 / 26, 25 / 28; at m = 4: 141 / 62; ip2 (10 x 500): 2.3 / 4.5."""
    if a.shape[0] < 4 or b.size < 1 << 16 or out.size > PRODUCT_ELEMENTS or not _transposed_is_faster(a, b):
        np.matmul(a, b, out=out)
        return np.add(out, bias, out=out)
    product = np.matmul(b.T, a.T, out=_product(out.T.shape, out.dtype))
    return np.add(product.T, bias, out=out)


def _product(shape, dtype):
    """A product buffer of this shape for the calling thread (the parts of a split batch
    accumulate side by side): a view of one flat buffer per dtype, grown to the largest product
    asked for (at most PRODUCT_ELEMENTS), which each caller has consumed before it asks again."""
    buffers = _PRODUCTS.__dict__.setdefault("buffers", {})
    dtype, size = np.dtype(dtype), math.prod(shape)
    if dtype.str not in buffers or buffers[dtype.str].size < size:
        buffers[dtype.str] = np.empty(size, dtype)
    return buffers[dtype.str][:size].reshape(shape)


def _transposed_is_faster(a, b):
    """Whether a @ b (a C-contiguous (M, L), b the transpose of a C-contiguous (K, L): the weight
    gradients of convolutions, InnerProduct's forward) runs faster as b^T @ a^T.  OpenBLAS runs
    this "NT" product slowly when M is short; measured on 2 cores (ms direct / transposed): M, K,
    L = 50, 500, 4096 (LeNet's conv2) 2.50 / 1.67; 20, 25, 36864 (conv1) 1.49 / 0.99; 96, 363,
    12100 7.75 / 6.21; 256, 256, 64 0.16 / 0.13; 64, 500, 800 (LeNet's ip1) 0.41 / 0.29; 64, 4096,
    9216 (CaffeNet's fc6) 36.4 / 30.6; but 300, 500, 4096 7.72 / 8.04 and 1000, 500, 4096 24.0 /
    30.3."""
    m, k = a.shape[-2], b.shape[-1]
    return m <= 256 and m <= k and a.flags.c_contiguous and b.swapaxes(-1, -2).flags.c_contiguous


_PRODUCTS = threading.local()  # .buffers: dtype -> the flat buffer of `_product`
PRODUCT_ELEMENTS = 1 << 21  # 8 MB of float32


def im2col_workspace_size(x_shape, pad, batch_last):
    """Elements of the staging buffer im2col/col2im need for images of `x_shape`."""
    if not batch_last and not any(pad):
        return 0
    n, c, *spatial = x_shape
    return n * c * math.prod(s + 2 * p for s, p in zip(spatial, pad))


def _col_geometry(x_shape, kernel, stride, pad, dilation):
    spatial = x_shape[2:]
    out = tuple((s + 2 * p - d * (k - 1) - 1) // t + 1
                for s, k, t, p, d in zip(spatial, kernel, stride, pad, dilation))
    extent = tuple(s + 2 * p for s, p in zip(spatial, pad))
    return out, extent


def _fast_2d(*arrays):
    """Whether the Numba kernels take this call: installed, 2-D images, contiguous arrays."""
    return fast is not None and arrays[0].ndim == 4 and all(a.flags.c_contiguous for a in arrays)


def im2col(x, col, kernel, stride, pad, dilation, batch_last=False, work=None):
    """Columns of x (N, C, *S) into col: (N, C*prod(K), prod(O)), or batch_last
    (C*prod(K), prod(O)*N).  Padding reads as zero.  One strided copy."""
    n, c = x.shape[:2]
    d = x.ndim - 2
    out, extent = _col_geometry(x.shape, kernel, stride, pad, dilation)
    if not batch_last and _fast_2d(x, col):
        fast.im2col_2d(x, _view(col, (n, c, *kernel, *out)), *kernel, *stride, *pad, *dilation)
        return
    src = x
    if batch_last or any(pad):
        src = _stage(x, work, pad, extent, 0, 0 if batch_last else None)
    if batch_last:  # windows (C, *O, *K, N) -> (C, *K, *O, N)
        win = _window_view(src, 1, out, stride, dilation, kernel)
        order = (0, *range(1 + d, 1 + 2 * d), *range(1, 1 + d), 1 + 2 * d)
        _view(col, (c, *kernel, *out, n))[...] = win.transpose(order)
    else:  # windows (N, C, *O, *K) -> (N, C, *K, *O)
        win = _window_view(src, 2, out, stride, dilation, kernel)
        order = (0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))
        _view(col, (n, c, *kernel, *out))[...] = win.transpose(order)


def col2im(col, x, kernel, stride, pad, dilation, batch_last=False, work=None):
    """The adjoint of im2col: x (N, C, *S) is overwritten with, for each pixel, the sum of
    the column entries that read it.  One strided add per kernel offset."""
    n, c = x.shape[:2]
    out, extent = _col_geometry(x.shape, kernel, stride, pad, dilation)
    if _fast_2d(x, col):
        if not batch_last:
            fast.col2im_2d(_view(col, (n, c, *kernel, *out)), x, *kernel, *stride, *pad, *dilation)
        else:
            staged = _carve(work, (c, *extent, n), x.dtype)
            fast.col2im_2d_batch_last(_view(col, (c, *kernel, *out, n)), staged, *kernel, *stride, *dilation)
            _unstage(staged, x, pad, 0)
        return
    staged = batch_last or any(pad)
    if staged:
        acc = _carve(work, (c, *extent, n) if batch_last else (n, c, *extent), x.dtype)
    else:
        acc = x
    acc[...] = 0
    lead = (slice(None),) if batch_last else (slice(None), slice(None))
    cols = _view(col, (c, *kernel, *out, n) if batch_last else (n, c, *kernel, *out))
    for offset in _offsets(kernel):
        acc[lead + _taps(offset, stride, dilation, out)] += cols[lead + offset]
    if staged:
        _unstage(acc, x, pad, 0 if batch_last else None)


def _im2row(x, col, kernel, stride, pad, dilation, work=None):
    """Columns of x (N, C, H, W) as rows, one per output pixel: col (N*OH*OW, kh*kw*C), contiguous
    as the layers pass it, each row in (kh, kw, c) order, so that a window's cells lie in runs in
    x staged channels-last (`work`: of im2col_workspace_size(x.shape, pad, True) elements)."""
    n, c = x.shape[:2]
    out, extent = _col_geometry(x.shape, kernel, stride, pad, dilation)
    staged = _stage(x, work, pad, extent, 0, 1)
    fast.im2row_2d(staged, _view(col, (n, *out, *kernel, c)), *stride, *dilation)


def _row2im(col, x, kernel, stride, pad, dilation, work=None):
    """The adjoint of im2row: x (N, C, H, W) is overwritten with, for each pixel, the sum of the
    row entries that read it."""
    n, c = x.shape[:2]
    out, extent = _col_geometry(x.shape, kernel, stride, pad, dilation)
    staged = _carve(work, (n, *extent, c), x.dtype)
    fast.row2im_2d(_view(col, (n, *out, *kernel, c)), staged, *stride, *dilation)
    _unstage(staged, x, pad, 1)


# the pixel-rows layout's pair: 2-D, with Numba only (NumPy's row2im, a strided add per kernel
# offset, took 5x col2im's time)
im2row, row2im = (_im2row, _row2im) if fast is not None else (None, None)


# *** pooling ***
# Each call copies the windows into "planes" (prod(K), N*C*prod(O)), one contiguous plane per
# kernel offset, so the reductions run over long contiguous rows.
def pool_workspace_size(x_shape, y_shape, kernel, stride, pad):
    """Elements of the buffer the pooling primitives need: planes plus a padded input copy."""
    n, c, *spatial = x_shape
    extent = _pool_extent(spatial, y_shape[2:], kernel, stride, pad)
    staged = n * c * math.prod(extent) if _needs_staging(spatial, extent, pad) else 0
    return math.prod(kernel) * math.prod(y_shape) + staged


def _pool_extent(spatial, out, kernel, stride, pad):
    """Padded extent that holds every window: [-pad, (out-1)*stride + kernel - pad)."""
    return tuple(max(p + s, (o - 1) * t + k) for s, o, k, t, p in zip(spatial, out, kernel, stride, pad))


def _needs_staging(spatial, extent, pad):
    return any(pad) or extent != tuple(spatial)


def _planes(x, out, kernel, stride, pad, value, work):
    """Window planes (prod(K), N*C*prod(O)) of x; cells outside the input read as `value`."""
    n, c, *spatial = x.shape
    d = len(spatial)
    count = math.prod(kernel) * n * c * math.prod(out)
    planes = _carve(None if work is None else work[:count], (*kernel, n, c, *out), x.dtype)
    extent = _pool_extent(spatial, out, kernel, stride, pad)
    src = x
    if _needs_staging(spatial, extent, pad):
        src = _stage(x, None if work is None else work[count:], pad, extent, value)
    win = _window_view(src, 2, out, stride, (1,) * d, kernel)  # (N, C, *O, *K)
    planes[...] = win.transpose(*range(2 + d, 2 + 2 * d), 0, 1, *range(2, 2 + d))
    return planes.reshape(math.prod(kernel), -1)


def _accumulator(dy, dx, kernel, stride, pad, work):
    """Where window contributions to dx add up: a zeroed padded buffer (taken after the
    planes in `work`) when windows reach outside the input, else dx itself."""
    n, c, *spatial = dx.shape
    extent = _pool_extent(spatial, dy.shape[2:], kernel, stride, pad)
    if not _needs_staging(spatial, extent, pad):
        acc = dx
    else:
        acc = _carve(None if work is None else work[math.prod(kernel) * dy.size:], (n, c, *extent), dx.dtype)
    acc[...] = 0
    return acc


def _window_taps(offset, stride, out):
    return (slice(None), slice(None)) + _taps(offset, stride, (1,) * len(out), out)


@functools.lru_cache(maxsize=256)
def _index_tables(spatial, out, kernel, stride, pad):
    """Flat-index pieces of window cells: index = base[output] + cells[offset], with
    index = h*W + w into the unpadded input, as Caffe stores its argmax.  cells has one extra
    entry (the last cell again) for windows where nothing was picked."""
    pitch = [math.prod(spatial[i + 1:]) for i in range(len(spatial))]
    cells = [sum(o * p for o, p in zip(offset, pitch)) for offset in _offsets(kernel)]
    starts = [(np.arange(o) * s - p) * q for o, s, p, q in zip(out, stride, pad, pitch)]
    base = functools.reduce(np.add.outer, starts)
    return np.asarray(cells + cells[-1:], np.int32), base.astype(np.int32)


@functools.lru_cache(maxsize=256)
def _ave_divisor(spatial, out, kernel, stride, pad, dtype):
    """Caffe's AVE pool size: the window clipped to [-pad, size + pad) (padding counts)."""
    sizes = [np.minimum(np.arange(o) * s - p + k, n + p) - (np.arange(o) * s - p)
             for n, o, k, s, p in zip(spatial, out, kernel, stride, pad)]
    return functools.reduce(np.multiply.outer, sizes).astype(dtype)


@functools.lru_cache(maxsize=None)
def _first_bit_table(k):
    """code -> K - bit_length(code): the first offset whose bit is set (K where none is)."""
    return np.array([k - c.bit_length() for c in range(1 << k)], np.intp)


def _first_hits(hits):
    """Per column of hits (K, M) (bool): the first offset that is true, K where none is, so
    the earliest offset (Caffe's scan order: h, then w) wins ties.  Up to 16 offsets, the
    hits are weighted by 2^(K-1-o) in one pass and the highest set bit names the first."""
    k = hits.shape[0]
    if k <= 16:
        weights = (1 << np.arange(k - 1, -1, -1)).astype(np.uint8 if k <= 8 else np.uint16)
        return np.take(_first_bit_table(k), np.einsum("km,k->m", hits.view(np.uint8), weights))
    first = np.full(hits.shape[1], k, np.intp)
    for o in range(k - 1, -1, -1):  # large windows (global pooling): few columns
        first[hits[o]] = o
    return first


def _store_index(index, first, spatial, out, kernel, stride, pad):
    """index (N, C, *O) = flat h*W+w input position of window offset `first` (the last
    window cell where first == K); index may be of any int or float dtype."""
    cells, base = _index_tables(tuple(spatial), tuple(out), tuple(kernel), tuple(stride), tuple(pad))
    picked = np.take(cells, first).reshape(index.shape)
    np.add(picked, base, out=index, casting="unsafe")


def max_pool_forward(x, y, mask, kernel, stride, pad, work=None):
    """MAX pooling of x (N, C, *S) into y (N, C, *O); mask (int or float) gets the argmax as
    a flat h*W+w index into the unpadded input: the first maximum in scan order of the cells
    above -FLT_MAX (NaN never is), as Caffe; a window with none (all -inf or NaN) gives -FLT_MAX
    and mask -1, as Caffe.  Padding cells read as -inf, so they are never picked."""
    if _fast_2d(x, y, mask):
        planes = x.shape[0] * x.shape[1]
        fast.max_pool_forward_2d(_view(x, (planes, *x.shape[2:])), _view(y, (planes, *y.shape[2:])),
                                 _view(mask, (planes, *y.shape[2:])), *kernel, *stride, *pad, x.dtype.type(-FLT_MAX))
        return
    planes = _planes(x, y.shape[2:], kernel, stride, pad, -np.inf, work)
    flat = _view(y, (-1,))
    np.fmax.reduce(planes, axis=0, out=flat)  # (NaN skipped)
    np.fmax(flat, -FLT_MAX, out=flat)
    first = _first_hits((planes == flat) & (planes > -FLT_MAX))
    _store_index(mask, first, x.shape[2:], y.shape[2:], kernel, stride, pad)
    mask[(first == planes.shape[0]).reshape(mask.shape)] = -1  # no cell above -FLT_MAX


def max_pool_backward(dy, mask, dx, kernel, stride, pad, work=None):
    """dx (N, C, *S) = dy (N, C, *O) routed to the cells `mask` names, summed where windows
    overlap; mask -1 (a window that picked no cell) is dropped."""
    if _fast_2d(dx, dy, mask):
        planes = dx.shape[0] * dx.shape[1]
        fast.max_pool_backward_2d(_view(dy, (planes, -1)), _view(mask, (planes, -1)), _view(dx, (planes, -1)))
        return
    if all(s >= k for s, k in zip(stride, kernel)):  # windows never overlap: a plain scatter
        n, c, *spatial = dx.shape
        planes = np.arange(n * c, dtype=np.intp).reshape(n, c, *(1,) * len(spatial)) * math.prod(spatial)
        picked = (mask >= 0).reshape(-1)
        dx[...] = 0
        _view(dx, (-1,))[(mask.astype(np.intp) + planes).reshape(-1)[picked]] = dy.reshape(-1)[picked]
        return
    _route_backward(dy, mask, dx, kernel, stride, pad, work)


def _route_backward(dy, index, dx, kernel, stride, pad, work):
    """dx = dy sent to the window cell `index` names: one masked strided add per offset
    (overlapping windows accumulate; cells outside the input are dropped)."""
    acc = _accumulator(dy, dx, kernel, stride, pad, work)
    out = dy.shape[2:]
    cells, base = _index_tables(tuple(dx.shape[2:]), tuple(out), tuple(kernel), tuple(stride), tuple(pad))
    relative = np.where(index >= 0, index - base, -1)  # the chosen cell from each window's first cell
    for o, offset in enumerate(_offsets(kernel)):  # (where=: a NaN dy stays in its own cell)
        taps = acc[_window_taps(offset, stride, out)]
        np.add(taps, dy, out=taps, where=relative == cells[o])
    if acc is not dx:
        _unstage(acc, dx, pad)


def ave_pool_forward(x, y, kernel, stride, pad, work=None):
    """AVE pooling: window sums (padding reads 0) over Caffe's divisor, the window clipped to
    [-pad, size + pad): padding cells count, cells past the padding do not."""
    planes = _planes(x, y.shape[2:], kernel, stride, pad, 0, work)
    np.sum(planes, axis=0, out=_view(y, (-1,)))  # summed plane by plane, in Caffe's scan order
    y /= _ave_divisor(x.shape[2:], y.shape[2:], tuple(kernel), tuple(stride), tuple(pad), y.dtype)


def ave_pool_backward(dy, dx, kernel, stride, pad, work=None):
    """dx = each output's dy / divisor spread over its window cells inside the input."""
    acc = _accumulator(dy, dx, kernel, stride, pad, work)
    out = dy.shape[2:]
    share = dy / _ave_divisor(dx.shape[2:], out, tuple(kernel), tuple(stride), tuple(pad), dy.dtype)
    for offset in _offsets(kernel):
        acc[_window_taps(offset, stride, out)] += share
    if acc is not dx:
        _unstage(acc, dx, pad)


def stochastic_pool_forward_train(x, y, index, rand, kernel, stride, work=None):
    """Caffe's STOCHASTIC pooling in TRAIN (its GPU code; no padding): each window picks the
    first cell whose running sum reaches rand * (window sum), rand uniform in [0, 1) per
    output; y is that cell's value and index its flat h*W+w position.  Inputs are expected
    non-negative, as in Caffe."""
    nopad = (0,) * len(kernel)
    planes = _planes(x, y.shape[2:], kernel, stride, nopad, 0, work)
    running = np.cumsum(planes, axis=0)  # in scan order, as Caffe's two loops add
    first = _first_hits(running >= rand.reshape(-1) * running[-1])
    np.minimum(first, planes.shape[0] - 1, out=first)  # none reached (negative input): the last cell
    _store_index(index, first, x.shape[2:], y.shape[2:], kernel, stride, nopad)
    np.copyto(_view(y, (-1,)), np.take_along_axis(planes, first[None], 0)[0])


def stochastic_pool_forward_test(x, y, kernel, stride, work=None):
    """STOCHASTIC pooling in TEST: the probability-weighted average sum(x^2) / sum(x), 0 where
    sum(x) <= 0, as Caffe's GPU code."""
    planes = _planes(x, y.shape[2:], kernel, stride, (0,) * len(kernel), 0, work)
    sums = np.zeros(planes.shape[1], planes.dtype)
    squares = np.zeros_like(sums)
    for plane in planes:
        sums += plane
        squares += plane * plane
    out = _view(y, (-1,))
    out[...] = 0
    np.divide(squares, sums, out=out, where=sums > 0)


def stochastic_pool_backward(dy, index, dx, kernel, stride, work=None):
    """dx = dy routed to the cells picked in TRAIN (index), as Caffe's GPU code."""
    _route_backward(dy, index, dx, kernel, stride, (0,) * len(kernel), work)


# *** local response normalization across channels ***
def lrn_workspace_size(x_shape, size):
    """Elements of the channel-padded buffer (N, C + size - 1, *S) the LRN primitives use."""
    return x_shape[0] * (x_shape[1] + size - 1) * math.prod(x_shape[2:])


def _channel_window_sum(values, out, size, work):
    """out[:, c] = sum of values[:, c'] for c' within (size-1)/2 of c, zeros past the
    channel range: one add per window position."""
    n, c, *spatial = values.shape
    pre = (size - 1) // 2
    padded = _carve(work, (n, c + size - 1, *spatial), values.dtype)
    padded[:, :pre] = 0
    padded[:, pre + c:] = 0
    padded[:, pre: pre + c] = values
    out[...] = padded[:, :c]
    for i in range(1, size):
        out += padded[:, i: i + c]


def lrn_across_forward(x, y, scale, size, alpha, beta, k, work=None):
    """Caffe's ACROSS_CHANNELS LRN of (N, C, *S): scale = k + alpha/size * (sum of x^2 over
    the `size` channels centred on each one, zeros past the ends); y = x * scale^-beta.
    scale is kept for the backward pass."""
    _channel_window_sum(x * x, scale, size, work)
    scale *= alpha / size
    scale += k
    np.power(scale, -beta, out=y)
    y *= x


def lrn_across_backward(x, y, dy, scale, dx, size, alpha, beta, work=None):
    """dx = dy * scale^-beta - (2 alpha beta / size) * x * (window sum of dy * y / scale)."""
    ratio = dy * y
    ratio /= scale
    _channel_window_sum(ratio, ratio, size, work)  # reads its input into work first
    ratio *= x
    ratio *= -2.0 * alpha * beta / size
    np.power(scale, -beta, out=dx)
    dx *= dy
    dx += ratio
