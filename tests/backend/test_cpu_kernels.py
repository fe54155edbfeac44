"""The CPU named primitives against plain loop references: im2col/col2im (both column layouts,
adjointness), im2row/row2im, pooling forward/backward, LRN across channels, the accumulating GEMM."""

import itertools
import math

import numpy as np
import pytest

from espresso.backend.cpu import kernels as K

# x shape, kernel, stride, pad, dilation: odd sizes, padding, stride > kernel, dilation, 1-D and 3-D
GEOMETRIES = [
    ((2, 3, 5, 7), (3, 2), (1, 2), (1, 0), (1, 1)),
    ((3, 2, 7, 6), (2, 3), (3, 2), (1, 2), (2, 1)),
    ((2, 2, 9, 8), (2, 2), (3, 4), (0, 1), (1, 1)),
    ((1, 1, 4, 4), (1, 1), (1, 1), (0, 0), (1, 1)),
    ((2, 2, 6, 5), (3, 3), (2, 1), (2, 2), (2, 2)),
    ((2, 3, 11), (3,), (2,), (1,), (3,)),
    ((2, 2, 4, 5, 3), (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2)),
]


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def kernel_path(request, monkeypatch):
    """Every test runs on the Numba fast path (when installed) and on the NumPy fallback."""
    if request.param == "numba" and K.fast is None:
        pytest.skip("Numba is not installed (pip install espresso-nn[fast])")
    if request.param == "numpy":
        monkeypatch.setattr(K, "fast", None)
    return request.param


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def out_shape(spatial, kernel, stride, pad, dilation):
    return tuple((s + 2 * p - d * (k - 1) - 1) // t + 1
                 for s, k, t, p, d in zip(spatial, kernel, stride, pad, dilation))


def im2col_ref(x, kernel, stride, pad, dilation):
    """(N, C, *K, *O): column entry = the input pixel the kernel tap reads, 0 in the padding."""
    n, c, *spatial = x.shape
    out = out_shape(spatial, kernel, stride, pad, dilation)
    col = np.zeros((n, c, *kernel, *out))
    for i, ch in itertools.product(range(n), range(c)):
        for tap in itertools.product(*map(range, kernel)):
            for pos in itertools.product(*map(range, out)):
                src = [q * t - p + k * d for q, t, p, k, d in zip(pos, stride, pad, tap, dilation)]
                if all(0 <= s < size for s, size in zip(src, spatial)):
                    col[(i, ch, *tap, *pos)] = x[(i, ch, *src)]
    return col


def layout_shape(x_shape, kernel, out, batch_last):
    n, c = x_shape[:2]
    rows = c * math.prod(kernel)
    return (rows, math.prod(out) * n) if batch_last else (n, rows, math.prod(out))


def to_batch_major(col, x_shape, kernel, out, batch_last):
    n, c = x_shape[:2]
    if batch_last:
        return np.moveaxis(col.reshape(c, *kernel, *out, n), -1, 0)
    return col.reshape(n, c, *kernel, *out)


def work_for(x_shape, pad, batch_last, dtype=np.float64):
    size = K.im2col_workspace_size(x_shape, pad, batch_last)
    return np.full(size, np.nan, dtype) if size else None  # NaN: stale contents must not leak


@pytest.mark.parametrize("batch_last", [False, True])
@pytest.mark.parametrize("shape, kernel, stride, pad, dilation", GEOMETRIES)
def test_im2col_matches_loops(shape, kernel, stride, pad, dilation, batch_last):
    x = rand(shape)
    out = out_shape(shape[2:], kernel, stride, pad, dilation)
    col = np.full(layout_shape(shape, kernel, out, batch_last), np.nan)
    K.im2col(x, col, kernel, stride, pad, dilation, batch_last, work_for(shape, pad, batch_last))
    got = to_batch_major(col, shape, kernel, out, batch_last)
    np.testing.assert_array_equal(got, im2col_ref(x, kernel, stride, pad, dilation))
    again = np.empty_like(col)
    K.im2col(x, again, kernel, stride, pad, dilation, batch_last, None)  # allocates its own staging
    np.testing.assert_array_equal(again, col)


@pytest.mark.parametrize("batch_last", [False, True])
@pytest.mark.parametrize("shape, kernel, stride, pad, dilation", GEOMETRIES)
def test_col2im_is_the_adjoint_of_im2col(shape, kernel, stride, pad, dilation, batch_last):
    """<im2col(x), y> == <x, col2im(y)>; col2im overwrites (never accumulates into) its output."""
    x = rand(shape, seed=1)
    out = out_shape(shape[2:], kernel, stride, pad, dilation)
    y = rand(layout_shape(shape, kernel, out, batch_last), seed=2)
    col = np.empty_like(y)
    work = work_for(shape, pad, batch_last)
    K.im2col(x, col, kernel, stride, pad, dilation, batch_last, work)
    back = np.full(shape, 123.0)
    K.col2im(y, back, kernel, stride, pad, dilation, batch_last, work)
    assert np.isclose((col * y).sum(), (x * back).sum(), rtol=1e-12)


def test_col2im_matches_loops():
    shape, kernel, stride, pad, dilation = (2, 2, 6, 5), (3, 2), (2, 1), (1, 1), (1, 2)
    out = out_shape(shape[2:], kernel, stride, pad, dilation)
    col = rand((2, 2, *kernel, *out), seed=3)
    expected = np.zeros(shape)
    for i, c, tap, pos in itertools.product(range(2), range(2), itertools.product(*map(range, kernel)),
                                            itertools.product(*map(range, out))):
        src = [q * t - p + k * d for q, t, p, k, d in zip(pos, stride, pad, tap, dilation)]
        if all(0 <= s < size for s, size in zip(src, shape[2:])):
            expected[(i, c, *src)] += col[(i, c, *tap, *pos)]
    got = np.empty(shape)
    K.col2im(col.reshape(2, -1, math.prod(out)), got, kernel, stride, pad, dilation)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


GEOMETRIES_2D = [case for case in GEOMETRIES if len(case[0]) == 4]


def pixel_rows_case(kernel_path):
    if kernel_path == "numpy":
        pytest.skip("im2row and row2im are Numba's (None without it)")


@pytest.mark.parametrize("shape, kernel, stride, pad, dilation", GEOMETRIES_2D)
def test_im2row_is_im2col_transposed(kernel_path, shape, kernel, stride, pad, dilation):
    """Rows (N*OH*OW, kh*kw*C): one per output pixel, each in (kh, kw, c) order."""
    pixel_rows_case(kernel_path)
    x, (n, c) = rand(shape), shape[:2]
    out = out_shape(shape[2:], kernel, stride, pad, dilation)
    rows = np.full((n * math.prod(out), math.prod(kernel) * c), np.nan)
    K.im2row(x, rows, kernel, stride, pad, dilation, work_for(shape, pad, True))
    want = im2col_ref(x, kernel, stride, pad, dilation).transpose(0, 4, 5, 2, 3, 1)  # (N, *O, *K, C)
    np.testing.assert_array_equal(rows.reshape(want.shape), want)


@pytest.mark.parametrize("shape, kernel, stride, pad, dilation", GEOMETRIES_2D)
def test_row2im_is_the_adjoint_of_im2row(kernel_path, shape, kernel, stride, pad, dilation):
    pixel_rows_case(kernel_path)
    x, (n, c) = rand(shape, seed=1), shape[:2]
    out = out_shape(shape[2:], kernel, stride, pad, dilation)
    y = rand((n * math.prod(out), math.prod(kernel) * c), seed=2)
    rows, work = np.empty_like(y), work_for(shape, pad, True)
    K.im2row(x, rows, kernel, stride, pad, dilation, work)
    back = np.full(shape, 123.0)
    K.row2im(y, back, kernel, stride, pad, dilation, work)
    assert np.isclose((rows * y).sum(), (x * back).sum(), rtol=1e-12)


def test_im2col_float32():
    x = rand((2, 3, 6, 5)).astype(np.float32)
    col = np.empty((3 * 4, 5 * 4 * 2), np.float32)
    K.im2col(x, col, (2, 2), (1, 1), (0, 0), (1, 1), True, work_for(x.shape, (0, 0), True, np.float32))
    got = to_batch_major(col, x.shape, (2, 2), (5, 4), True)
    np.testing.assert_array_equal(got, im2col_ref(x, (2, 2), (1, 1), (0, 0), (1, 1)).astype(np.float32))


# *** pooling ***
def distinct(shape, seed=0):
    n = math.prod(shape)
    return (np.random.default_rng(seed).permutation(n) * 0.1 - n * 0.05).reshape(shape)


def pool_ref(x, kernel, stride, pad, out):
    """MAX (value and flat h*W+w argmax, first max wins) and AVE with Caffe's divisor."""
    n, c, h, w = x.shape
    ymax, mask, yave = np.zeros((n, c, *out)), np.zeros((n, c, *out)), np.zeros((n, c, *out))
    for i, ch, oh, ow in itertools.product(range(n), range(c), *map(range, out)):
        hs, ws = oh * stride[0] - pad[0], ow * stride[1] - pad[1]
        he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
        cells = [(r, q) for r in range(max(hs, 0), min(he, h)) for q in range(max(ws, 0), min(we, w))]
        best = max(cells, key=lambda rq: (x[i, ch, rq[0], rq[1]], -rq[0], -rq[1]))
        ymax[i, ch, oh, ow], mask[i, ch, oh, ow] = x[i, ch, best[0], best[1]], best[0] * w + best[1]
        yave[i, ch, oh, ow] = sum(x[i, ch, r, q] for r, q in cells) / ((he - hs) * (we - ws))
    return ymax, mask, yave


POOLS = [  # x shape, kernel, stride, pad, out (Caffe's ceil rule, clipped)
    ((2, 3, 6, 6), (3, 3), (2, 2), (1, 1), (4, 4)),
    ((2, 2, 7, 7), (2, 2), (2, 2), (0, 0), (4, 4)),
    ((1, 2, 5, 5), (2, 2), (2, 2), (1, 1), (3, 3)),
    ((2, 2, 5, 8), (3, 2), (1, 3), (1, 1), (5, 3)),
    ((1, 1, 4, 6), (4, 6), (1, 1), (0, 0), (1, 1)),
]


def pool_work(x_shape, out, kernel, stride, pad):
    return np.full(K.pool_workspace_size(x_shape, x_shape[:2] + out, kernel, stride, pad), np.nan)


@pytest.mark.parametrize("use_work", [True, False])
@pytest.mark.parametrize("shape, kernel, stride, pad, out", POOLS)
def test_pool_forward(shape, kernel, stride, pad, out, use_work):
    x = distinct(shape)
    work = pool_work(shape, out, kernel, stride, pad) if use_work else None
    ymax, mask, yave = pool_ref(x, kernel, stride, pad, out)
    y, m = np.empty(shape[:2] + out), np.empty(shape[:2] + out, np.int32)
    K.max_pool_forward(x, y, m, kernel, stride, pad, work)
    np.testing.assert_array_equal(y, ymax)
    np.testing.assert_array_equal(m, mask)
    K.ave_pool_forward(x, y, kernel, stride, pad, work)
    np.testing.assert_allclose(y, yave, rtol=1e-12)


@pytest.mark.parametrize("shape, kernel, stride, pad, out", POOLS)
def test_pool_backward(shape, kernel, stride, pad, out):
    """MAX routes dy to the argmax cells (accumulating where windows overlap); AVE is the
    adjoint of its forward."""
    x, dy = distinct(shape), rand(shape[:2] + out, seed=4)
    work = pool_work(shape, out, kernel, stride, pad)
    _, mask, _ = pool_ref(x, kernel, stride, pad, out)
    expected = np.zeros(shape)
    for i, c, oh, ow in itertools.product(range(shape[0]), range(shape[1]), *map(range, out)):
        r, q = divmod(int(mask[i, c, oh, ow]), shape[3])
        expected[i, c, r, q] += dy[i, c, oh, ow]
    dx = np.full(shape, 9.0)
    K.max_pool_backward(dy, mask, dx, kernel, stride, pad, work)
    np.testing.assert_allclose(dx, expected, rtol=1e-12)
    y = np.empty(dy.shape)
    K.ave_pool_forward(x, y, kernel, stride, pad, work)
    K.ave_pool_backward(dy, dx, kernel, stride, pad, work)
    assert np.isclose((y * dy).sum(), (x * dx).sum(), rtol=1e-12)


def test_max_pool_all_equal_picks_first_cell_not_padding():
    x = np.full((1, 1, 3, 3), -2.0)
    y, m = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2))
    K.max_pool_forward(x, y, m, (2, 2), (2, 2), (1, 1))
    np.testing.assert_array_equal(y, -2.0)
    np.testing.assert_array_equal(m[0, 0], [[0, 1], [3, 4]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_skips_nan_and_minus_infinity_as_caffe(dtype):
    """Caffe's rule: the running maximum starts at -FLT_MAX with mask -1 and takes a cell only
    when strictly above it, so NaN is never picked and a window of -inf and NaN alone gives
    -FLT_MAX and mask -1, whose gradient backward drops."""
    nan, inf = np.nan, np.inf
    x = np.array([[[[nan, 1.0, -inf, nan],
                    [2.0, 0.5, nan, -inf],
                    [3.0, -1.0, 4.0, 5.0],
                    [nan, 7.0, 6.0, 5.0]]]], dtype)
    y, mask = np.empty((1, 1, 2, 2), dtype), np.empty((1, 1, 2, 2), dtype)
    K.max_pool_forward(x, y, mask, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y[0, 0], [[2.0, -K.FLT_MAX], [7.0, 6.0]])
    np.testing.assert_array_equal(mask[0, 0], [[4, -1], [13, 14]])
    dx, dy = np.full(x.shape, 9.0, dtype), np.where(mask == -1, nan, 1.0).astype(dtype)  # (a dropped NaN)
    K.max_pool_backward(dy, mask, dx, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(np.argwhere(dx[0, 0] == 1).tolist(), [[1, 0], [3, 1], [3, 2]])
    assert dx.sum() == 3
    K.max_pool_backward(dy, mask, dx, (3, 3), (1, 1), (0, 0), pool_work(x.shape, (2, 2), (3, 3), (1, 1), (0, 0)))
    assert dx.sum() == 3  # (the overlapping windows' path drops mask -1 too)
    strided = np.empty((1, 1, 2, 2), np.int64).transpose(0, 1, 3, 2)  # any mask layout
    K.max_pool_forward(x, y, strided, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(strided, mask.astype(np.int64))


def test_stochastic_pool():
    x = np.abs(rand((2, 2, 5, 5))) + 0.1
    out, kernel, stride = (2, 2), (3, 3), (2, 2)
    rand_u = np.random.default_rng(7).random((2, 2, *out))
    y, index = np.empty((2, 2, *out)), np.empty((2, 2, *out), np.int32)
    K.stochastic_pool_forward_train(x, y, index, rand_u, kernel, stride)
    ytest = np.empty_like(y)
    K.stochastic_pool_forward_test(x, ytest, kernel, stride)
    for i, c, oh, ow in itertools.product(range(2), range(2), range(2), range(2)):
        cells = [(r, q) for r in range(2 * oh, 2 * oh + 3) for q in range(2 * ow, 2 * ow + 3)]
        values = np.array([x[i, c, r, q] for r, q in cells])
        running = np.cumsum(values)
        pick = int(np.argmax(running >= rand_u[i, c, oh, ow] * running[-1]))
        assert index[i, c, oh, ow] == cells[pick][0] * 5 + cells[pick][1]
        assert y[i, c, oh, ow] == values[pick]
        assert np.isclose(ytest[i, c, oh, ow], (values ** 2).sum() / values.sum())
    dy, dx = rand(y.shape, seed=8), np.empty_like(x)
    K.stochastic_pool_backward(dy, index, dx, kernel, stride)
    expected = np.zeros_like(x)
    for i, c, oh, ow in itertools.product(range(2), range(2), range(2), range(2)):
        r, q = divmod(int(index[i, c, oh, ow]), 5)
        expected[i, c, r, q] += dy[i, c, oh, ow]
    np.testing.assert_allclose(dx, expected)


# *** LRN ***
def lrn_ref(x, size, alpha, beta, k):
    n, c = x.shape[:2]
    half = (size - 1) // 2
    scale = np.zeros_like(x)
    for ch in range(c):
        scale[:, ch] = k + alpha / size * (x[:, max(0, ch - half): ch + half + 1] ** 2).sum(axis=1)
    return x * scale ** -beta, scale


@pytest.mark.parametrize("size, shape", [(5, (2, 7, 3, 2)), (3, (1, 2, 2, 2)), (7, (2, 4, 1, 3))])
def test_lrn_across(size, shape):
    alpha, beta, k = 0.7, 0.75, 1.3
    x = rand(shape)
    y, scale = np.empty(shape), np.empty(shape)
    work = np.full(K.lrn_workspace_size(shape, size), np.nan)
    K.lrn_across_forward(x, y, scale, size, alpha, beta, k, work)
    ref_y, ref_scale = lrn_ref(x, size, alpha, beta, k)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-12)
    dy, dx = rand(shape, seed=1), np.empty(shape)
    K.lrn_across_backward(x, y, dy, scale, dx, size, alpha, beta, work)
    eps, direction = 1e-6, rand(shape, seed=2)
    numeric = ((lrn_ref(x + eps * direction, size, alpha, beta, k)[0]
                - lrn_ref(x - eps * direction, size, alpha, beta, k)[0]) * dy).sum() / (2 * eps)
    assert np.isclose((dx * direction).sum(), numeric, rtol=1e-6)


@pytest.mark.parametrize("a_shape, b_shape, transposed_b", [
    ((50, 4096), (500, 4096), True),  # a conv weight gradient: computed as (b^T a^T)^T
    ((2048, 2), (2, 1100), False),  # wide, as CaffeNet's fc6 gradient at batch 2: in blocks of rows
    ((3, 20, 64), (3, 25, 64), True),  # batched (groups)
    ((300, 64), (500, 64), True),  # M > 256: the direct product
])
def test_matmul_accumulates_in_every_path(a_shape, b_shape, transposed_b):
    """out += a @ b (Caffe's beta = 1), whichever way the product is computed."""
    a = rand(a_shape, seed=3)
    b = rand(b_shape, seed=4)
    b = b.swapaxes(-1, -2) if transposed_b else b
    out = rand(a.shape[:-1] + b.shape[-1:], seed=5)
    want = out + a @ b
    for dtype in (np.float64, np.float32):
        got = out.astype(dtype)
        K.matmul(a.astype(dtype), b.astype(dtype), got, accumulate=True)
        np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-3)
    assert K._transposed_is_faster(a, b) == (transposed_b and a.shape[-2] <= 256)


def test_matmul_bias_in_both_orientations_and_one_product_buffer_per_thread():
    """InnerProduct's forward x @ W^T + b, computed as (W @ x^T)^T for a short batch (from the
    thread's one product buffer, whatever the batch sizes seen) and directly past the buffer's
    size limit; each as the plain product."""
    w, bias = rand((300, 256), seed=6), rand((300,), seed=7)
    for batch in (1, 7, 64, 33):  # (batch 1 directly)
        x = rand((batch, 256), seed=batch)
        out = np.empty((batch, 300))
        assert K._transposed_is_faster(x, w.T)
        np.testing.assert_allclose(K.matmul_bias(x, w.T, bias, out), x @ w.T + bias, rtol=1e-12)
    buffers = K._PRODUCTS.buffers  # one per dtype (other tests may have run float32 products here)
    assert set(buffers) <= {"<f8", "<f4"} and buffers["<f8"].size >= 64 * 300
    x, w = rand((4, 3), seed=8), rand((K.PRODUCT_ELEMENTS // 4 + 1, 3), seed=9)
    out = np.empty((4, w.shape[0]))
    assert K._transposed_is_faster(x, w.T)
    np.testing.assert_allclose(K.matmul_bias(x, w.T, w[:, 0], out), x @ w.T + w[:, 0], rtol=1e-12)
    assert max(b.size for b in K._PRODUCTS.buffers.values()) <= K.PRODUCT_ELEMENTS
