"""The common and utility layers against plain NumPy float64 references, with gradient checks."""

import itertools

import numpy as np
import pytest

from espresso.errors import LayerParamError, NetError, ShapeError
from espresso.layers import common, utility
from espresso.net import Net
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.testing import TEST, TRAIN, LayerRun, assert_close, check_gradient, check_layer

GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def distinct(*shape, seed=0):
    """Values at least 0.1 apart (no ties for MAX / ArgMax), in random order."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) * 0.1 - n * 0.05).reshape(shape)


def away_from_zero(*shape, seed=0):
    x = randn(*shape, seed=seed)
    return np.sign(x) * (np.abs(x) + 0.3)


def raises(error, snippet, bottoms, match=None, **kwargs):
    with pytest.raises(error, match=match):
        LayerRun(snippet, bottoms, **kwargs)


# *** InnerProduct ***
def ip_ref(x, w, b, axis, transpose):
    M, K = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    x2 = x.reshape(M, K)
    N = w.shape[1] if transpose else w.shape[0]
    y = np.zeros((M, N))
    for m, n in itertools.product(range(M), range(N)):
        for k in range(K):
            y[m, n] += x2[m, k] * (w[k, n] if transpose else w[n, k])
        y[m, n] += b[n] if b is not None else 0
    return y.reshape(x.shape[:axis] + (N,))


@pytest.mark.parametrize("shape, axis, transpose, bias", [
    ((2, 3, 2, 2), 1, False, True),
    ((2, 3, 4), 2, False, True),
    ((2, 3, 4), -1, True, True),
    ((3, 5), 1, True, False),
    ((2, 3, 2), 1, False, False),
])
def test_inner_product(shape, axis, transpose, bias):
    snippet = (f'type: "InnerProduct" inner_product_param {{ num_output: 4 axis: {axis} '
               f'transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} {GAUSS} }}')
    ax = axis % len(shape)
    K = int(np.prod(shape[ax:]))
    run = check_layer(
        snippet, [randn(*shape)],
        reference=lambda b, p: [ip_ref(b[0], p[0], p[1] if bias else None, ax, transpose)],
        top_shapes=[shape[:ax] + (4,)], reshape_batch=3 if ax > 0 else None)
    assert run.layer.blobs[0].shape == ((K, 4) if transpose else (4, K))
    assert len(run.layer.blobs) == (2 if bias else 1)


def test_inner_product_param_propagate_down_respected():
    run = LayerRun(f'type: "InnerProduct" inner_product_param {{ num_output: 2 {GAUSS} }}', [randn(2, 3)])
    run.layer.param_propagate_down = [False, True]
    run.forward()
    run.zero_param_diffs()
    run.backward([np.ones((2, 2))])
    w_diff, b_diff = run.param_diffs()
    assert not w_diff.any()
    assert_close(b_diff, [2.0, 2.0])


def test_inner_product_errors():
    raises(LayerParamError, 'type: "InnerProduct"', [randn(2, 3)], match="num_output")
    raises(LayerParamError, 'type: "InnerProduct" inner_product_param { num_output: 2 axis: 3 }',
           [randn(2, 3)], match="axis")
    run = LayerRun('type: "InnerProduct" inner_product_param { num_output: 2 }', [randn(2, 3)])
    run.set_bottoms([randn(2, 4)])
    with pytest.raises(ShapeError, match="3"):
        run.forward()


# *** Dropout ***
def test_dropout_train_scales_and_mask_matches_backward():
    x = away_from_zero(6, 50)
    run = LayerRun('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', [x])
    y = run.forward()[0]
    scale = 1 / (1 - np.float32(0.25))
    kept = y != 0
    assert_close(y[kept], x[kept] * scale)
    g = randn(6, 50, seed=1)
    dx = run.backward([g])[0]
    assert_close(dx, g * kept * scale)  # the forward's mask
    assert_close(run.forward()[0], y)  # same seed, same mask


def test_dropout_expectation():
    run = LayerRun('type: "Dropout" dropout_param { dropout_ratio: 0.4 }', [np.ones((200, 100))])
    y = run.forward()[0]
    assert abs((y != 0).mean() - 0.6) < 0.02
    assert abs(y.mean() - 1.0) < 0.03
    run2 = LayerRun('type: "Dropout" dropout_param { dropout_ratio: 0.4 }', [np.ones((200, 100))], seed=7)
    assert (run2.forward()[0] != y).any()  # the mask comes from the backend's generator


def test_dropout_gradient_and_inplace():
    check_layer('type: "Dropout" dropout_param { dropout_ratio: 0.5 }', [randn(3, 4, 5)])
    check_layer('type: "Dropout"', [randn(2, 6)], phase=TEST, reference=lambda b, p: [b[0]])


def test_dropout_test_phase_is_identity():
    x = randn(3, 7)
    for inplace in (False, True):
        run = LayerRun('type: "Dropout" dropout_param { dropout_ratio: 0.9 }', [x], phase=TEST,
                       inplace=inplace)
        assert_close(run.forward()[0], x)
        g = randn(3, 7, seed=2)
        assert_close(run.backward([g])[0], g)


def test_dropout_ratio_zero_and_float32():
    x = randn(4, 5)
    assert_close(LayerRun('type: "Dropout" dropout_param { dropout_ratio: 0 }', [x]).forward()[0], x)
    run = LayerRun('type: "Dropout"', [x], dtype=np.float32)
    y = run.forward()[0]
    assert y.dtype == np.float32
    assert_close(y[y != 0], 2 * x.astype(np.float32)[y != 0], rtol=1e-6)


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1"])
def test_dropout_bad_ratio(ratio):
    raises(LayerParamError, f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [randn(2, 2)],
           match="dropout_ratio")


# *** Embed ***
EMBED = f'type: "Embed" embed_param {{ num_output: 3 input_dim: 5 {GAUSS} }}'


def embed_ref(idx, w, b):
    out = np.zeros(idx.shape + (w.shape[1],))
    for pos in np.ndindex(idx.shape):
        out[pos] = w[int(idx[pos])] + (b if b is not None else 0)
    return out


def test_embed_forward_and_param_gradients():
    idx = np.array([[0, 2, 2], [4, 0, 2]], np.float64)  # repeated indices
    check_layer(EMBED, [idx], reference=lambda b, p: [embed_ref(b[0], p[0], p[1])],
                top_shapes=[(2, 3, 3)], check_bottoms=[])
    check_layer(EMBED.replace("input_dim: 5", "input_dim: 5 bias_term: false"), [idx[0]],
                reference=lambda b, p: [embed_ref(b[0], p[0], None)], check_bottoms=[])


def test_embed_weight_gradient_accumulates_over_repeats():
    idx = np.array([1, 3, 1, 1], np.float64)
    run = LayerRun(EMBED, [idx])
    run.forward()
    g = randn(4, 3, seed=3)
    run.zero_param_diffs()
    run.backward([g], [False])
    expected = np.zeros((5, 3))
    for i, k in enumerate(idx.astype(int)):
        expected[k] += g[i]
    w_diff, b_diff = run.param_diffs()
    assert_close(w_diff, expected)
    assert_close(b_diff, g.sum(0))


def test_embed_errors():
    raises(LayerParamError, 'type: "Embed" embed_param { input_dim: 5 }', [np.zeros(2)], match="num_output")
    raises(LayerParamError, 'type: "Embed" embed_param { num_output: 5 }', [np.zeros(2)], match="input_dim")
    run = LayerRun(EMBED, [np.array([0.0, 1.0])])
    run.forward()
    with pytest.raises(NetError, match="indices"):
        run.backward([np.ones((2, 3))], [True])
    assert not run.layer.allow_force_backward(0)
    run.set_bottoms([np.array([0.0, 5.0])])
    with pytest.raises(ShapeError, match="out of range"):
        run.forward()


# *** Flatten and Reshape ***
@pytest.mark.parametrize("params, shape, out", [
    ("", (2, 3, 2, 2), (2, 12)),
    ("axis: 2", (2, 3, 2, 2), (2, 3, 4)),
    ("axis: 1 end_axis: 2", (2, 3, 2, 2), (2, 6, 2)),
    ("axis: 0 end_axis: -2", (2, 3, 2, 2), (12, 2)),
    ("axis: -1", (2, 3), (2, 3)),
])
def test_flatten(params, shape, out):
    batch_kept = out[0] == shape[0]  # then a new batch size carries through

    def ref(b, p):
        return [b[0].reshape((len(b[0]),) + out[1:] if batch_kept else out)]

    run = check_layer(f'type: "Flatten" flatten_param {{ {params} }}', [randn(*shape)], reference=ref,
                      top_shapes=[out], reshape_batch=3 if batch_kept else None)
    assert np.shares_memory(run.top[0].data, run.bottom[0].data)
    assert np.shares_memory(run.top[0].diff, run.bottom[0].diff)


def test_flatten_errors():
    raises(LayerParamError, 'type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [randn(2, 3, 4)],
           match="end_axis")
    raises(LayerParamError, 'type: "Flatten" flatten_param { axis: 4 }', [randn(2, 3, 4)], match="axis")


@pytest.mark.parametrize("params, shape, out", [
    ("shape { dim: 0 dim: -1 }", (2, 3, 4), (2, 12)),
    ("shape { dim: -1 dim: 2 }", (2, 3, 4), (12, 2)),
    ("shape { dim: 0 dim: 2 dim: -1 dim: 2 }", (2, 3, 4), (2, 2, 3, 2)),
    ("shape { dim: 3 dim: 1 } axis: 1 num_axes: 1", (2, 3, 4), (2, 3, 1, 4)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4), (2, 3, 4, 1)),
    ("shape { dim: 6 } axis: -3", (2, 3, 2), (2, 6)),
    ("shape { dim: 1 dim: 1 } axis: 0 num_axes: 0", (2, 3), (1, 1, 2, 3)),
    ("shape { dim: 0 dim: 0 dim: -1 }", (2, 3, 2, 2), (2, 3, 4)),
])
def test_reshape(params, shape, out):
    run = check_layer(f'type: "Reshape" reshape_param {{ {params} }}', [randn(*shape)],
                      reference=lambda b, p: [b[0].reshape(out)], top_shapes=[out])
    assert np.shares_memory(run.top[0].data, run.bottom[0].data)


def test_reshape_follows_batch():
    run = LayerRun('type: "Reshape" reshape_param { shape { dim: -1 dim: 6 } }', [randn(2, 3, 2)])
    run.set_bottoms([randn(5, 3, 2)])
    assert run.forward()[0].shape == (5, 6)


@pytest.mark.parametrize("params, shape, error, match", [
    ("shape { dim: -1 dim: -1 }", (2, 3), LayerParamError, "-1"),
    ("shape { dim: -2 dim: 3 }", (2, 3), LayerParamError, "-1"),
    ("shape { dim: 5 }", (2, 3), ShapeError, "6"),
    ("shape { dim: 4 dim: -1 }", (2, 3), ShapeError, "divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 }", (2, 3), LayerParamError, "copy"),
    ("shape { dim: 1 } axis: 3", (2, 3), LayerParamError, "out of range"),
    ("shape { dim: 1 } num_axes: -2", (2, 3), LayerParamError, "num_axes"),
])
def test_reshape_errors(params, shape, error, match):
    raises(error, f'type: "Reshape" reshape_param {{ {params} }}', [randn(*shape)], match=match)


# *** Concat and Slice ***
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_concat(axis):
    shapes = [[2, 3, 2], [2, 3, 2], [2, 3, 2]]
    for k, n in enumerate((1, 2, 3)):
        shapes[k][axis] = n
    bottoms = [randn(*s, seed=k) for k, s in enumerate(shapes)]
    out = list(shapes[0])
    out[axis] = 6
    check_layer(f'type: "Concat" concat_param {{ axis: {axis} }}', bottoms,
                reference=lambda b, p: [np.concatenate(b, axis=axis)], top_shapes=[out],
                reshape_batch=3 if axis % 3 else None)


def test_concat_legacy_dim_single_bottom_and_partial_backward():
    a, b = randn(2, 2, 3), randn(2, 4, 3, seed=1)
    check_layer('type: "Concat" concat_param { concat_dim: 1 }', [a, b],
                reference=lambda bs, p: [np.concatenate(bs, axis=1)])
    run = check_layer('type: "Concat"', [a], reference=lambda bs, p: [bs[0]])
    assert np.shares_memory(run.top[0].data, run.bottom[0].data)
    run = LayerRun('type: "Concat"', [a, b])
    run.forward()
    run.bottom[0].diff[...] = 7
    g = randn(2, 6, 3, seed=2)
    dx = run.backward([g], [False, True])
    assert (dx[0] == 7).all()
    assert_close(dx[1], g[:, 2:])


def test_concat_errors():
    raises(LayerParamError, 'type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [randn(2, 2)] * 2,
           match="not both")
    raises(ShapeError, 'type: "Concat"', [randn(2, 2), randn(3, 2)], match="bottom 1")
    raises(ShapeError, 'type: "Concat"', [randn(2, 2), randn(2, 2, 1)], match="bottom 1")
    raises(LayerParamError, 'type: "Concat" concat_param { concat_dim: 2 }', [randn(2, 2)] * 2,
           match="concat_dim")


def slice_ref(x, axis, bounds):
    x = np.moveaxis(x, axis, 0)
    return [np.moveaxis(np.stack([x[i] for i in range(a, b)]), 0, axis) for a, b in bounds]


@pytest.mark.parametrize("axis", [0, 1, 2, -2])
@pytest.mark.parametrize("points", [[], [1, 4]])
def test_slice(axis, points):
    shape = [6, 6, 6]
    shape[axis % 3] = 6
    x = randn(*shape)
    bounds = list(zip([0] + points, points + [6], strict=True)) if points else [(0, 2), (2, 4), (4, 6)]
    spec = " ".join(f"slice_point: {p}" for p in points)
    check_layer(f'type: "Slice" slice_param {{ axis: {axis} {spec} }}', [x],
                reference=lambda b, p: slice_ref(b[0], axis, bounds), tops=3)


def test_slice_legacy_dim_and_single_top():
    x = randn(2, 5, 3)
    check_layer('type: "Slice" slice_param { slice_dim: 1 slice_point: 2 }', [x], tops=2,
                reference=lambda b, p: [b[0][:, :2], b[0][:, 2:]], reshape_batch=3)
    run = check_layer('type: "Slice"', [x], reference=lambda b, p: [b[0]])
    assert np.shares_memory(run.top[0].data, run.bottom[0].data)


@pytest.mark.parametrize("params, tops, error, match", [
    ("slice_point: 3 slice_point: 2", 3, LayerParamError, "increasing"),
    ("slice_point: 0 slice_point: 2", 3, LayerParamError, "increasing"),
    ("slice_point: 2", 3, LayerParamError, "needs 2"),
    ("slice_point: 2 slice_point: 7", 3, ShapeError, "out of range"),
    ("", 4, ShapeError, "divide"),
    ("axis: 1 slice_dim: 1", 2, LayerParamError, "not both"),
])
def test_slice_errors(params, tops, error, match):
    raises(error, f'type: "Slice" slice_param {{ {params} }}', [randn(2, 6)], match=match, tops=tops)


# *** Eltwise ***
def eltwise_ref(op, bottoms, coeffs=None):
    out = np.zeros_like(bottoms[0])
    for pos in np.ndindex(out.shape):
        vals = [b[pos] for b in bottoms]
        if op == "PROD":
            out[pos] = np.prod(vals)
        elif op == "SUM":
            out[pos] = sum(c * v for c, v in zip(coeffs or [1] * len(vals), vals, strict=True))
        else:
            out[pos] = max(vals)
    return out


@pytest.mark.parametrize("op, n, extra", [
    ("PROD", 2, ""), ("PROD", 3, ""), ("PROD", 3, "stable_prod_grad: false"),
    ("SUM", 2, ""), ("SUM", 3, "coeff: 1 coeff: -2 coeff: 0.5"), ("SUM", 3, "coeff: -1 coeff: 1 coeff: 1"),
    ("SUM", 3, "coeff: 1 coeff: 1 coeff: -2"), ("MAX", 2, ""), ("MAX", 4, ""),
])
def test_eltwise(op, n, extra):
    bottoms = [away_from_zero(2, 3, 2, seed=k) for k in range(n)]
    if op == "MAX":  # no ties across bottoms
        stacked = distinct(n, 2, 3, 2)
        bottoms = list(stacked)
    coeffs = [float(c) for c in extra.split()[1::2]] if "coeff" in extra else None
    check_layer(f'type: "Eltwise" eltwise_param {{ operation: {op} {extra} }}', bottoms,
                reference=lambda b, p: [eltwise_ref(op, b, coeffs)], top_shapes=[(2, 3, 2)], reshape_batch=3)


def test_eltwise_flags():
    b = [randn(2, 2)] * 2
    flags = {op: LayerRun(f'type: "Eltwise" eltwise_param {{ operation: {op} }}', b).layer
             for op in ("PROD", "SUM", "MAX")}
    assert flags["SUM"].inplace and not flags["PROD"].inplace and not flags["MAX"].inplace
    assert not any(layer.backward_reads_top for layer in flags.values())
    fast = LayerRun('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', b).layer
    assert fast.backward_reads_top


@pytest.mark.parametrize("coeffs", [(-1, 2, 0.5), (1, 1, 0.5), (1, 1)])
def test_eltwise_sum_in_place_gives_every_bottom_its_gradient(coeffs):
    """In place (the top is bottom 0), weighted or not: (1, 1) first adds the two in one pass."""
    bottoms = [randn(2, 3, seed=k) for k in range(len(coeffs))]
    snippet = f'type: "Eltwise" eltwise_param {{ {" ".join(f"coeff: {c}" for c in coeffs)} }}'
    run = LayerRun(snippet, bottoms, inplace=True)
    assert run.top[0] is run.bottom[0]
    assert_close(run.forward()[0], eltwise_ref("SUM", bottoms, list(coeffs)))
    g = randn(2, 3, seed=5)
    for dx, c in zip(run.backward([g]), coeffs, strict=True):
        assert_close(dx, c * g)


def test_eltwise_max_ties_follow_caffe():
    # Caffe: bottom 0 keeps an element only when strictly larger than bottom 1; later bottoms only
    # when strictly larger than the running max.
    a, b, c = np.array([1.0, 2.0, 5.0]), np.array([1.0, 3.0, 4.0]), np.array([0.0, 3.0, 5.0])
    run = LayerRun('type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c])
    assert_close(run.forward()[0], [1.0, 3.0, 5.0])
    dx = run.backward([np.array([10.0, 20.0, 30.0])])
    assert_close(dx[0], [0, 0, 30])
    assert_close(dx[1], [10, 20, 0])
    assert_close(dx[2], [0, 0, 0])


def test_eltwise_prod_gradient_is_product_of_others_even_at_zero():
    a, b, c = np.array([0.0, 2.0]), np.array([3.0, 0.0]), np.array([5.0, 7.0])
    run = LayerRun('type: "Eltwise" eltwise_param { operation: PROD }', [a, b, c])
    run.forward()
    dx = run.backward([np.ones(2)])
    assert_close(dx[0], [15.0, 0.0])
    assert_close(dx[1], [0.0, 14.0])
    assert_close(dx[2], [0.0, 0.0])


def test_eltwise_errors():
    b = [randn(2, 2)] * 2
    raises(LayerParamError, 'type: "Eltwise" eltwise_param { coeff: 1 }', b, match="one per bottom")
    raises(LayerParamError, 'type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', b,
           match="SUM")
    raises(LayerParamError, 'type: "Eltwise" eltwise_param { operation: MAX coeff: 1 coeff: 2 }', b,
           match="SUM")
    raises(ShapeError, 'type: "Eltwise"', [randn(2, 2), randn(2, 3)], match="bottom 1")
    raises(NetError, 'type: "Eltwise"', [randn(2, 2)], match="at least 2")


# *** Tile ***
def tile_ref(x, axis, tiles):
    outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    flat = x.reshape(outer, inner)
    out = np.zeros((outer, tiles * inner))
    for o, t, i in itertools.product(range(outer), range(tiles), range(inner)):
        out[o, t * inner + i] = flat[o, i]
    shape = list(x.shape)
    shape[axis] *= tiles
    return out.reshape(shape)


@pytest.mark.parametrize("axis, tiles", [(1, 3), (0, 2), (-1, 2), (2, 1)])
def test_tile(axis, tiles):
    x = randn(2, 3, 2)
    check_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [x],
                reference=lambda b, p: [tile_ref(b[0], axis % 3, tiles)],
                reshape_batch=3 if axis % 3 else None)


def test_tile_errors():
    raises(LayerParamError, 'type: "Tile"', [randn(2, 2)], match="tiles")
    raises(LayerParamError, 'type: "Tile" tile_param { tiles: 0 }', [randn(2, 2)], match="tiles")


# *** Reduction ***
def reduction_ref(x, op, axis, coeff):
    num, dim = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    flat = x.reshape(num, dim)
    out = np.zeros(num)
    for i in range(num):
        for j in range(dim):
            v = flat[i, j]
            out[i] += {"SUM": v, "MEAN": v, "ASUM": abs(v), "SUMSQ": v * v}[op]
        if op == "MEAN":
            out[i] /= dim
    return (coeff * out).reshape(x.shape[:axis])


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (1, -0.5), (2, 2.0), (-1, 1.0)])
def test_reduction(op, axis, coeff):
    x = away_from_zero(2, 3, 2)
    check_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}', [x],
                reference=lambda b, p: [reduction_ref(b[0], op, axis % 3, coeff)],
                top_shapes=[x.shape[:axis % 3]], reshape_batch=3 if axis % 3 else None)


def test_reduction_default_is_sum_to_scalar():
    x = randn(2, 3)
    run = LayerRun('type: "Reduction"', [x])
    out = run.forward()[0]
    assert out.shape == ()
    assert_close(out, x.sum())


# *** ArgMax ***
def argmax_ref(row, k):
    """Caffe sorts (value, index) pairs descending: ties go to the larger index."""
    pairs = sorted(((v, j) for j, v in enumerate(row)), reverse=True)[:k]
    return [j for _, j in pairs], [v for v, _ in pairs]


def argmax_no_axis_ref(x, k, out_max_val):
    n = x.shape[0]
    out = np.zeros((n, 2 if out_max_val else 1, k) + (1,) * max(0, x.ndim - 3))
    for i in range(n):
        idx, vals = argmax_ref(x[i].ravel(), k)
        out[i, 0, :].flat[:] = idx
        if out_max_val:
            out[i, 1, :].flat[:] = vals
    return out


def argmax_axis_ref(x, k, axis, out_max_val):
    moved = np.moveaxis(x, axis, -1)
    out = np.zeros(moved.shape[:-1] + (k,))
    for pos in np.ndindex(moved.shape[:-1]):
        idx, vals = argmax_ref(moved[pos], k)
        out[pos] = vals if out_max_val else idx
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("shape, k, out_max_val, expected_shape", [
    ((3, 5), 1, False, (3, 1, 1)),
    ((3, 5), 2, True, (3, 2, 2)),
    ((2, 3, 2), 3, False, (2, 1, 3)),
    ((2, 3, 2, 2), 1, True, (2, 2, 1, 1)),
    ((2, 3, 2, 2), 4, False, (2, 1, 4, 1)),
])
def test_argmax_without_axis(shape, k, out_max_val, expected_shape):
    snippet = f'type: "ArgMax" argmax_param {{ top_k: {k} out_max_val: {str(out_max_val).lower()} }}'
    check_layer(snippet, [distinct(*shape)], grad=False, top_shapes=[expected_shape],
                reference=lambda b, p: [argmax_no_axis_ref(b[0], k, out_max_val)])


@pytest.mark.parametrize("axis, k, out_max_val", [(1, 1, False), (1, 2, True), (0, 2, False), (-1, 1, True),
                                                   (2, 2, False)])
def test_argmax_with_axis(axis, k, out_max_val):
    x = distinct(2, 3, 2)
    shape = list(x.shape)
    shape[axis] = k
    flag = str(out_max_val).lower()
    snippet = f'type: "ArgMax" argmax_param {{ top_k: {k} axis: {axis} out_max_val: {flag} }}'
    check_layer(snippet, [x], grad=False, top_shapes=[shape],
                reference=lambda b, p: [argmax_axis_ref(b[0], k, axis % 3, out_max_val)])


def test_argmax_ties_go_to_the_larger_index():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 5.0, 5.0]])
    for k in (1, 3):
        run = LayerRun(f'type: "ArgMax" argmax_param {{ top_k: {k} out_max_val: true }}', [x])
        assert_close(run.forward()[0], argmax_no_axis_ref(x, k, True))
    assert_close(run.forward()[0][:, 0], [[2, 1, 0], [3, 2, 0]])


def test_argmax_errors():
    raises(LayerParamError, 'type: "ArgMax" argmax_param { top_k: 0 }', [randn(2, 3)], match="top_k")
    raises(LayerParamError, 'type: "ArgMax" argmax_param { top_k: 4 }', [randn(2, 3)], match="top_k")
    raises(LayerParamError, 'type: "ArgMax" argmax_param { top_k: 3 axis: 0 }', [randn(2, 3)], match="top_k")
    run = LayerRun('type: "ArgMax"', [randn(2, 3)])
    assert not run.layer.allow_force_backward(0)
    with pytest.raises(NetError):
        run.backward([np.ones((2, 1, 1))])


# *** Silence, BatchReindex, Filter, Parameter ***
def test_silence_zeroes_diffs():
    run = LayerRun('type: "Silence"', [randn(2, 3), randn(4)], tops=0)
    assert run.top == [] and run.forward() == []
    for b in run.bottom:
        b.diff[...] = 5
    dx = run.backward([], [True, False])
    assert not dx[0].any() and (dx[1] == 5).all()


def test_batch_reindex():
    x = randn(4, 2, 3)
    perm = np.array([3, 0, 3, 1, 3], np.float64)  # repeats: their gradients add up

    def ref(b, p):
        return [np.stack([b[0][int(i)] for i in b[1]])]

    run = check_layer('type: "BatchReindex"', [x, perm], reference=ref, top_shapes=[(5, 2, 3)],
                      check_bottoms=[0])
    g = randn(5, 2, 3, seed=1)
    dx = run.backward([g], [True, False])[0]
    expected = np.zeros_like(x)
    for i, k in enumerate(perm.astype(int)):
        expected[k] += g[i]
    assert_close(dx, expected)
    with pytest.raises(NetError, match="indices"):
        run.backward([g], [True, True])
    assert run.layer.allow_force_backward(0) and not run.layer.allow_force_backward(1)


def test_batch_reindex_errors():
    raises(ShapeError, 'type: "BatchReindex"', [randn(4, 2), np.zeros((2, 1))], match="1-D")
    run = LayerRun('type: "BatchReindex"', [randn(4, 2), np.array([0.0, 4.0])])
    with pytest.raises(ShapeError, match="out of range"):
        run.forward()


def test_filter():
    a, b = randn(5, 2, 3), randn(5, 4, seed=1)
    selector = np.array([[1.0], [0.0], [2.0], [0.0], [-1.0]])
    keep = [i for i in range(5) if selector[i, 0] != 0]

    def ref(bs, p):
        return [np.stack([bs[0][i] for i in keep]), np.stack([bs[1][i] for i in keep])]

    run = check_layer('type: "Filter"', [a, b, selector], reference=ref, tops=2,
                      top_shapes=[(3, 2, 3), (3, 4)], check_bottoms=[0, 1])
    g = randn(3, 2, 3, seed=2)
    dx = run.backward([g, np.ones((3, 4))], [True, False, False])[0]
    assert not dx[[1, 3]].any()
    assert_close(dx[keep], g)
    with pytest.raises(NetError, match="selector"):
        run.backward([g, np.ones((3, 4))], [True, True, True])
    assert not run.layer.allow_force_backward(2)


def test_filter_shapes_before_forward_and_errors():
    run = LayerRun('type: "Filter"', [randn(3, 2), np.array([[0.0], [1.0], [0.0]])])
    assert run.top[0].shape == (3, 2)  # full batch until forward counts the selection
    assert run.forward()[0].shape == (1, 2)
    raises(ShapeError, 'type: "Filter"', [randn(3, 2), np.ones((3, 2))], match="selector")
    raises(ShapeError, 'type: "Filter"', [randn(3, 2), np.ones((4, 1))], match="first dimension")
    raises(NetError, 'type: "Filter"', [randn(3, 2), np.ones((3, 1))], tops=2, match="one top per")


def test_parameter():
    run = check_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [],
                      top_shapes=[(2, 3)], reference=lambda b, p: [p[0]])
    run.layer.blobs[0].data[...] = randn(2, 3)
    assert_close(run.forward()[0], run.layer.blobs[0].data)
    run.zero_param_diffs()
    g = randn(2, 3, seed=4)
    run.backward([g])
    run.backward([g])
    assert_close(run.param_diffs()[0], 2 * g)
    check_gradient(run)


def test_parameter_errors():
    raises(LayerParamError, 'type: "Parameter" parameter_param { shape { dim: -1 } }', [], match="shape")
    raises(NetError, 'type: "Parameter" bottom: "x"', [randn(2)])


def test_legacy_names():
    expected = {"InnerProductLayer": "INNER_PRODUCT", "DropoutLayer": "DROPOUT", "FlattenLayer": "FLATTEN",
                "ConcatLayer": "CONCAT", "SliceLayer": "SLICE", "EltwiseLayer": "ELTWISE",
                "ArgMaxLayer": "ARGMAX", "SilenceLayer": "SILENCE", "SplitLayer": "SPLIT"}
    for name, legacy in expected.items():
        assert getattr(common, name, None) or getattr(utility, name)
        assert (getattr(common, name, None) or getattr(utility, name)).legacy == legacy


# *** in a net ***
NET = """
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "ids"
        input_param { shape { dim: 2 dim: 3 dim: 2 } shape { dim: 2 } } }
layer { name: "emb" type: "Embed" bottom: "ids" top: "e"
        embed_param { num_output: 6 input_dim: 4 weight_filler { type: "gaussian" } } }
layer { name: "fl" type: "Flatten" bottom: "x" top: "xf" }
layer { name: "sum" type: "Eltwise" bottom: "xf" bottom: "e" top: "s" eltwise_param { coeff: 1 coeff: 2 } }
layer { name: "drop" type: "Dropout" bottom: "s" top: "s" dropout_param { dropout_ratio: 0 } }
layer { name: "ip" type: "InnerProduct" bottom: "s" top: "y"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "r" type: "Reduction" bottom: "y" top: "loss" loss_weight: 1 }
"""


def make_net(text):
    return Net(parse_text(text, caffe_pb2.NetParameter(), "<net>"), phase=caffe_pb2.TRAIN)


def test_layers_in_a_net_with_force_backward():
    net = make_net(NET)  # force_backward skips Embed's indices (allow_force_backward)
    x = randn(2, 3, 2)
    net.blobs["x"].data[...] = x
    net.blobs["ids"].data[...] = [1, 3]
    net.clear_param_diffs()
    loss = net.forward_backward()
    w, emb = net.layers[5].blobs[0].data, net.layers[1].blobs[0].data
    s = x.reshape(2, 6) + 2 * emb[[1, 3]]
    assert_close(loss, (s @ w.T + net.layers[5].blobs[1].data).sum(), rtol=1e-5)
    assert_close(net.blobs["x"].diff.reshape(2, 6), np.tile(w.sum(0), (2, 1)), rtol=1e-6)
    expected = np.zeros((4, 6))
    expected[[1, 3]] = 2 * w.sum(0)
    assert_close(net.layers[1].blobs[0].diff, expected, rtol=1e-6)


def test_flatten_refuses_in_place_in_a_net():
    with pytest.raises(NetError, match="in place"):
        make_net(NET.replace('top: "xf"', 'top: "x"').replace('bottom: "xf"', 'bottom: "x"'))


@pytest.mark.parametrize("snippet, bottoms", [
    (f'type: "InnerProduct" inner_product_param {{ num_output: 3 transpose: true {GAUSS} }}', [randn(2, 4)]),
    ('type: "Eltwise" eltwise_param { operation: MAX }', list(distinct(3, 2, 3))),
    ('type: "Eltwise" eltwise_param { coeff: 0.5 coeff: -1 }', [randn(2, 3), randn(2, 3, seed=1)]),
    ('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', [randn(2, 3)]),
    ('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [distinct(2, 5)]),
    ('type: "ArgMax" argmax_param { axis: 1 }', [distinct(2, 5)]),
    (f'type: "Embed" embed_param {{ num_output: 2 input_dim: 3 {GAUSS} }}', [np.array([2.0, 0.0, 2.0])]),
    ('type: "Tile" tile_param { tiles: 2 }', [randn(2, 3)]),
])
def test_float32_matches_float64(snippet, bottoms):
    runs = [LayerRun(snippet, bottoms, dtype=dtype) for dtype in (np.float64, np.float32)]
    for blob32, blob64 in zip(runs[1].layer.blobs, runs[0].layer.blobs, strict=True):
        blob32.data[...] = blob64.data
    tops = [run.forward()[0] for run in runs]
    assert tops[1].dtype == np.float32
    assert_close(tops[1], tops[0], rtol=1e-5, atol=1e-6)
    down = [not ("Embed" in snippet or "ArgMax" in snippet)] * len(bottoms)  # no gradient there
    grads = [run.backward([np.ones_like(tops[0])], down) for run in runs]
    for g32, g64 in zip(grads[1], grads[0], strict=True):
        assert_close(g32, g64, rtol=1e-5, atol=1e-6)


def test_dropout_without_scale_train_scales_at_test_time():
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    snippet = 'type: "Dropout" dropout_param { dropout_ratio: 0.25 scale_train: false }'
    run = LayerRun(snippet, [x], phase=TEST)
    assert np.allclose(run.forward()[0], 0.75 * x)
    assert np.allclose(run.backward([np.ones_like(x)])[0], 0.75)
    train = LayerRun(snippet, [x], phase=TRAIN)
    y = train.forward()[0]
    assert set(np.unique(np.round(y / np.where(x == 0, 1, x), 6))) <= {0.0, 1.0}
