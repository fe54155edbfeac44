"""Normalization layers: BatchNorm, Scale, Bias, MVN against float64 references written with
explicit loops, numerical gradients, in place, reshape, and error cases."""

import math

import numpy as np
import pytest

from espresso.errors import LayerParamError, NetError, ShapeError
from espresso.testing import TEST, TRAIN, LayerRun, assert_close, check_gradient, check_layer

SHAPE = (2, 3, 2, 2)
EPS = float(np.float32(1e-5))  # batch_norm_param.eps is a float field


def data(shape, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, shape)


def check_scalar_gradient(run, array, analytic, weights, eps=1e-4, tol=1e-6):
    """Centred difference of sum(top * weights) along the 0-axis `array` (a param or a bottom),
    which the harness cannot perturb (its to_device makes 0-axis arrays 1-D)."""
    value, objective = float(array), []
    for step in (eps, -eps):
        array[...] = value + step
        objective.append(sum(float((t * w).sum()) for t, w in zip(run.forward(), weights, strict=True)))
    array[...] = value
    numeric = (objective[0] - objective[1]) / (2 * eps)
    assert abs(float(analytic) - numeric) <= tol * max(1.0, abs(numeric)), (float(analytic), numeric)


def scalar_gradients(run):
    """Analytic gradients of a random objective; returns the weights used."""
    weights = [np.random.default_rng(3).standard_normal(t.shape) for t in run.forward()]
    run.zero_param_diffs()
    run.backward(weights)
    return weights


# *** BatchNorm ***
def channel_stats(x):
    """Per-channel (axis 1) mean and biased variance over every other axis, by explicit loops."""
    x3 = x.reshape(x.shape[0], x.shape[1] if x.ndim > 1 else 1, -1)
    n, c, s = x3.shape
    means, variances = [], []
    for ch in range(c):
        values = [x3[i, ch, j] for i in range(n) for j in range(s)]
        mu = sum(values) / len(values)
        means.append(mu)
        variances.append(sum((v - mu) ** 2 for v in values) / len(values))
    return np.array(means), np.array(variances)


def normalize(x, means, variances, eps):
    x3 = x.reshape(x.shape[0], x.shape[1] if x.ndim > 1 else 1, -1)
    y = np.empty_like(x3)
    for i, ch, j in np.ndindex(x3.shape):
        y[i, ch, j] = (x3[i, ch, j] - means[ch]) / math.sqrt(variances[ch] + eps)
    return y.reshape(x.shape)


def bn_batch_reference(eps=EPS):
    def reference(bottoms, params):
        return [normalize(bottoms[0], *channel_stats(bottoms[0]), eps)]
    return reference


@pytest.mark.parametrize("shape", [SHAPE, (4, 3), (5,), (2, 2, 3, 1, 2)])
def test_batch_norm_train(shape):
    check_layer('type: "BatchNorm"', [data(shape)], bn_batch_reference(), top_shapes=[shape], reshape_batch=3)


def test_batch_norm_eps_and_moving_average_fraction():
    text = 'type: "BatchNorm" batch_norm_param { eps: 0.1 moving_average_fraction: 0.5 }'
    check_layer(text, [data(SHAPE)], bn_batch_reference(eps=float(np.float32(0.1))))


def test_batch_norm_running_statistics():
    lam = float(np.float32(0.9))  # the proto field is a float
    x1, x2 = data(SHAPE, 1), data(SHAPE, 2) + 0.5
    run = LayerRun(f'type: "BatchNorm" batch_norm_param {{ moving_average_fraction: {lam} }}', [x1])
    assert all(not b.host_data().any() for b in run.layer.blobs)  # starts at zero
    assert [b.shape for b in run.layer.blobs] == [(3,), (3,), (1,)]
    run.forward()
    m = 2 * 2 * 2  # N * H * W values per channel
    mean1, var1 = channel_stats(x1)
    blobs = [b.host_data() for b in run.layer.blobs]
    assert_close(blobs[0], mean1, rtol=1e-12)
    assert_close(blobs[1], var1 * m / (m - 1), rtol=1e-12)
    assert_close(blobs[2], [1.0])
    run.set_bottoms([x2])
    run.forward()
    mean2, var2 = channel_stats(x2)
    blobs = [b.host_data() for b in run.layer.blobs]
    assert_close(blobs[0], lam * mean1 + mean2, rtol=1e-12)
    assert_close(blobs[1], lam * var1 * m / (m - 1) + var2 * m / (m - 1), rtol=1e-12)
    assert_close(blobs[2], [lam + 1], rtol=1e-12)


def test_batch_norm_single_value_per_channel_keeps_the_variance():
    run = LayerRun('type: "BatchNorm"', [data((1, 3))])  # m = 1: no m/(m-1) correction
    run.forward()
    assert_close(run.layer.blobs[1].host_data(), np.zeros(3))
    assert_close(run.layer.blobs[2].host_data(), [1.0])


def set_statistics(run, mean_sum, var_sum, s):
    for blob, value in zip(run.layer.blobs, (mean_sum, var_sum, s), strict=True):
        blob.data[...] = value


@pytest.mark.parametrize("phase, text", [
    (TEST, ""), (TRAIN, "batch_norm_param { use_global_stats: true }"),
])
def test_batch_norm_global_statistics(phase, text):
    mean_sum, var_sum, s = np.array([0.5, -1.0, 2.0]), np.array([2.0, 0.5, 1.5]), 2.5
    x = data(SHAPE)
    run = LayerRun(f'type: "BatchNorm" {text}', [x], phase=phase)
    set_statistics(run, mean_sum, var_sum, s)
    want = normalize(x, mean_sum / s, var_sum / s, EPS)
    assert_close(run.forward()[0], want)
    assert_close(run.layer.blobs[2].host_data(), [s])  # no update in global mode
    check_gradient(run, check_params=False)  # the statistics are not learned
    dy = data(SHAPE, 5)
    dx = run.backward([dy])[0]
    stds = np.sqrt(var_sum / s + EPS)
    for i, ch, h, w in np.ndindex(SHAPE):
        assert math.isclose(dx[i, ch, h, w], dy[i, ch, h, w] / stds[ch], rel_tol=1e-12)


def test_batch_norm_zero_scale_factor_means_zero_statistics():
    x = data(SHAPE)
    run = LayerRun('type: "BatchNorm"', [x], phase=TEST)
    set_statistics(run, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 0.0)
    assert_close(run.forward()[0], x / math.sqrt(EPS), rtol=1e-10)


def test_batch_norm_test_phase_without_global_stats_uses_the_batch():
    text = 'type: "BatchNorm" batch_norm_param { use_global_stats: false }'
    run = check_layer(text, [data(SHAPE)], bn_batch_reference(), phase=TEST)
    assert run.layer.blobs[2].host_data()[0] > 0


def test_batch_norm_backward_ignores_later_overwrites_of_its_top():
    """An in-place Scale or ReLU after BatchNorm overwrites its top: backward uses its own copy."""
    x, dy = data(SHAPE), data(SHAPE, 4)
    run = LayerRun('type: "BatchNorm"', [x])
    run.forward()
    want = run.backward([dy])[0]
    run.forward()
    run.top[0].data[...] = 7.0
    assert_close(run.backward([dy])[0], want)
    assert not run.layer.backward_reads_top and run.layer.inplace


def test_batch_norm_statistics_get_lr_mult_zero():
    run = LayerRun('type: "BatchNorm"', [data(SHAPE)])
    assert [p.lr_mult for p in run.layer.lp.param] == [0, 0, 0]
    run = LayerRun('type: "BatchNorm" param { lr_mult: 0 decay_mult: 0 }', [data(SHAPE)])
    assert [p.lr_mult for p in run.layer.lp.param] == [0, 0, 0]
    with pytest.raises(LayerParamError, match="lr_mult must be 0"):
        LayerRun('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }', [data(SHAPE)])


def test_batch_norm_channel_mismatch():
    run = LayerRun('type: "BatchNorm"', [data(SHAPE)])
    run.set_bottoms([data((2, 4, 2, 2))])
    with pytest.raises(ShapeError, match="3 channels"):
        run.forward()


# *** Scale and Bias ***
def broadcast_reference(op, axis, operand_index=None, bias_index=None):
    """y[i] = op(x[i], s[i[axis:axis+k]]) (+ b[...]); the operand from a bottom or a param."""
    def reference(bottoms, params):
        x = bottoms[0]
        s = bottoms[1] if operand_index is None else params[operand_index]
        start = 0 if s.ndim == 0 else axis % x.ndim
        y = np.empty_like(x)
        for index in np.ndindex(x.shape):
            key = index[start:start + s.ndim]
            y[index] = op(x[index], s[key])
            if bias_index is not None:
                y[index] += params[bias_index][key]
        return [y]
    return reference


def mul(a, b):
    return a * b


def add(a, b):
    return a + b


UNIFORM = 'filler { type: "uniform" min: 0.5 max: 1.5 }'
BIAS_UNIFORM = 'bias_filler { type: "uniform" min: -1 max: 1 }'


@pytest.mark.parametrize("axis, num_axes, shape", [
    (1, 1, (3,)), (1, 2, (3, 2)), (1, -1, (3, 2, 2)), (0, -1, SHAPE), (-2, 1, (2,)), (-1, 1, (2,)),
    (0, 1, (2,)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_scale_learned(axis, num_axes, shape, bias):
    extra = f"bias_term: true {BIAS_UNIFORM}" if bias else ""
    text = f'type: "Scale" scale_param {{ axis: {axis} num_axes: {num_axes} {UNIFORM} {extra} }}'
    ref = broadcast_reference(mul, axis, operand_index=0, bias_index=1 if bias else None)
    run = check_layer(text, [data(SHAPE)], ref, top_shapes=[SHAPE], reshape_batch=None if axis == 0 else 3)
    assert [b.shape for b in run.layer.blobs] == [shape] * (2 if bias else 1)


@pytest.mark.parametrize("axis, operand_shape", [
    (1, (3,)), (1, (3, 2)), (0, (2, 3)), (-1, (2,)), (2, (2, 2)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_scale_from_bottom(axis, operand_shape, bias):
    extra = f"bias_term: true {BIAS_UNIFORM}" if bias else ""
    text = f'type: "Scale" scale_param {{ axis: {axis} {extra} }}'
    ref = broadcast_reference(mul, axis, bias_index=0 if bias else None)
    run = check_layer(text, [data(SHAPE), data(operand_shape, 1)], ref)
    assert [b.shape for b in run.layer.blobs] == ([operand_shape] if bias else [])


def test_scale_scalar_operand():
    """num_axes 0 (a learned scalar) or a 0-axis bottom[1]: the scalar multiplies everything."""
    x = data(SHAPE)
    learned = LayerRun('type: "Scale" scale_param { num_axes: 0 bias_term: true filler { value: 2.5 } }', [x])
    assert [b.shape for b in learned.layer.blobs] == [(), ()]
    assert_close(learned.forward()[0], x * 2.5)
    weights = scalar_gradients(learned)
    for k in range(2):
        check_scalar_gradient(learned, learned.layer.blobs[k].data, learned.param_diffs()[k], weights)
    check_gradient(learned, check_params=False)

    given = LayerRun('type: "Scale"', [x, np.array(-1.5)])
    assert_close(given.forward()[0], x * -1.5)
    weights = scalar_gradients(given)
    check_scalar_gradient(given, given.bottom[1].data, given.bottom[1].host_diff(), weights)
    check_gradient(given, check_bottoms=[0])


def test_scale_default_fillers():
    run = LayerRun('type: "Scale" scale_param { bias_term: true }', [data(SHAPE)])
    assert_close(run.layer.blobs[0].host_data(), np.ones(3))
    assert_close(run.layer.blobs[1].host_data(), np.zeros(3))


def test_scale_learned_gradient_accumulates_when_it_covers_the_bottom():
    run = LayerRun('type: "Scale" scale_param { axis: 0 num_axes: -1 }', [data(SHAPE)])
    weights = scalar_gradients(run)
    once = run.param_diffs()[0]
    run.backward(weights)
    assert_close(run.param_diffs()[0], 2 * once)


def test_scale_in_place_keeps_the_bottom_for_its_gradient():
    x, dy = data(SHAPE), data(SHAPE, 2)
    text = f'type: "Scale" scale_param {{ bias_term: true {UNIFORM} }}'
    apart, shared = LayerRun(text, [x]), LayerRun(text, [x], inplace=True)
    for a, b in zip(apart.layer.blobs, shared.layer.blobs, strict=True):
        b.data[...] = a.data
    assert_close(shared.forward()[0], apart.forward()[0])
    apart.zero_param_diffs()
    shared.zero_param_diffs()
    assert_close(shared.backward([dy])[0], apart.backward([dy])[0])
    for a, b in zip(apart.param_diffs(), shared.param_diffs(), strict=True):
        assert_close(b, a)


@pytest.mark.parametrize("type_name", ["Scale", "Bias"])
def test_broadcast_errors(type_name):
    field = f"{type_name.lower()}_param"
    with pytest.raises(LayerParamError, match="num_axes: must be >= -1"):
        LayerRun(f'type: "{type_name}" {field} {{ num_axes: -2 }}', [data(SHAPE)])
    with pytest.raises(LayerParamError, match="extends past"):
        LayerRun(f'type: "{type_name}" {field} {{ axis: 2 num_axes: 3 }}', [data(SHAPE)])
    with pytest.raises(ShapeError, match="axis: 4 is out of range"):
        LayerRun(f'type: "{type_name}" {field} {{ axis: 4 }}', [data(SHAPE)])
    with pytest.raises(ShapeError, match="does not match"):
        LayerRun(f'type: "{type_name}"', [data(SHAPE), data((4,))])
    with pytest.raises(ShapeError, match="does not match"):
        LayerRun(f'type: "{type_name}" {field} {{ axis: 3 }}', [data(SHAPE), data((2, 2))])
    with pytest.raises(NetError, match="at most 2 bottom"):
        LayerRun(f'type: "{type_name}"', [data(SHAPE)] * 3)


def test_scale_learned_shape_checked_on_reshape():
    run = LayerRun('type: "Scale"', [data(SHAPE)])
    run.set_bottoms([data((2, 4, 2, 2))])
    with pytest.raises(ShapeError, match="does not match"):
        run.forward()


@pytest.mark.parametrize("axis, num_axes, shape", [
    (1, 1, (3,)), (1, -1, (3, 2, 2)), (0, 2, (2, 3)), (-1, 1, (2,)),
])
def test_bias_learned(axis, num_axes, shape):
    text = f'type: "Bias" bias_param {{ axis: {axis} num_axes: {num_axes} {UNIFORM} }}'
    run = check_layer(text, [data(SHAPE)], broadcast_reference(add, axis, operand_index=0),
                      reshape_batch=None if axis == 0 else 3)
    assert run.layer.blobs[0].shape == shape


@pytest.mark.parametrize("axis, operand_shape", [(1, (3,)), (1, (3, 2)), (0, SHAPE), (-2, (2, 2))])
def test_bias_from_bottom(axis, operand_shape):
    text = f'type: "Bias" bias_param {{ axis: {axis} }}'
    run = check_layer(text, [data(SHAPE), data(operand_shape, 1)], broadcast_reference(add, axis))
    assert run.layer.blobs == []


def test_bias_defaults_and_scalar():
    x = data(SHAPE)
    run = LayerRun('type: "Bias"', [x])
    assert_close(run.layer.blobs[0].host_data(), np.zeros(3))  # filler: constant 0
    learned = LayerRun('type: "Bias" bias_param { num_axes: 0 filler { value: 0.75 } }', [x])
    assert learned.layer.blobs[0].shape == ()
    assert_close(learned.forward()[0], x + 0.75)
    weights = scalar_gradients(learned)
    check_scalar_gradient(learned, learned.layer.blobs[0].data, learned.param_diffs()[0], weights)
    given = LayerRun('type: "Bias"', [x, np.array(0.25)])
    assert_close(given.forward()[0], x + 0.25)
    weights = scalar_gradients(given)
    check_scalar_gradient(given, given.bottom[1].data, given.bottom[1].host_diff(), weights)


# *** MVN ***
def mvn_reference(normalize_variance=True, across_channels=False, eps=1e-9):
    def reference(bottoms, params):
        x = bottoms[0]
        rows = x.shape[0] if across_channels or x.ndim == 1 else x.shape[0] * x.shape[1]
        x2, y = x.reshape(rows, -1), np.empty((rows, x.size // rows))
        for r in range(rows):
            values = list(x2[r])
            mu = sum(values) / len(values)
            std = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
            for j, v in enumerate(values):
                y[r, j] = (v - mu) / (std + eps) if normalize_variance else v - mu
        return [y.reshape(x.shape)]
    return reference


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across_channels", [False, True])
@pytest.mark.parametrize("shape", [SHAPE, (3, 4), (2, 2, 3, 1, 2)])
def test_mvn(normalize_variance, across_channels, shape):
    text = (f'type: "MVN" mvn_param {{ normalize_variance: {str(normalize_variance).lower()} '
            f'across_channels: {str(across_channels).lower()} }}')
    ref = mvn_reference(normalize_variance, across_channels)
    run = check_layer(text, [data(shape)], ref, top_shapes=[shape], reshape_batch=3)
    assert run.layer.backward_reads_top is normalize_variance


def test_mvn_adds_eps_to_the_deviation_and_backpropagates_as_caffe():
    eps = float(np.float32(0.5))
    x, dy = data(SHAPE), data(SHAPE, 6)
    run = LayerRun('type: "MVN" mvn_param { eps: 0.5 }', [x])
    y = run.forward()[0]
    assert_close(y, mvn_reference(eps=eps)([x], [])[0])
    dx = run.backward([dy])[0]
    # Caffe's gradient: (dy - mean(dy) - mean(dy * y) * y) / (std + eps) per (n, c)
    for n, c in np.ndindex(2, 3):
        g, yc, xc = dy[n, c].ravel(), y[n, c].ravel(), x[n, c].ravel()
        std = math.sqrt(sum((v - sum(xc) / 4) ** 2 for v in xc) / 4)
        want = [(g[j] - sum(g) / 4 - sum(g * yc) / 4 * yc[j]) / (std + eps) for j in range(4)]
        assert_close(dx[n, c].ravel(), want, rtol=1e-10)


@pytest.mark.parametrize("text, bottoms", [
    ('type: "BatchNorm"', [data(SHAPE)]),
    (f'type: "Scale" scale_param {{ bias_term: true {UNIFORM} }}', [data(SHAPE)]),
    ('type: "Scale"', [data(SHAPE), data((3,), 1)]),
    ('type: "Bias"', [data(SHAPE), data((3,), 1)]),
    ('type: "MVN"', [data(SHAPE)]),
])
def test_float32_matches_float64(text, bottoms):
    runs = [LayerRun(text, bottoms, dtype=dtype) for dtype in (np.float64, np.float32)]
    for a, b in zip(runs[0].layer.blobs, runs[1].layer.blobs, strict=True):
        b.data[...] = a.data
    want, got = (run.forward()[0] for run in runs)
    assert got.dtype == np.float32
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    dy = data(SHAPE, 9)
    assert_close(runs[1].backward([dy])[0], runs[0].backward([dy])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss, force, kept", [(False, False, False), (True, False, True), (False, True, True)])
def test_only_a_net_that_runs_backward_keeps_copies_for_it(loss, force, kept):
    """BatchNorm's normalized values and an in-place Scale's bottom are kept for the backward
    pass: a net with no loss to reach (Caffe's layer_need_backward false: a deploy net) holds
    neither, unless force_backward."""
    import espresso as caffe
    from espresso.proto import caffe_pb2
    from espresso.proto.text import parse_text

    text = f"""force_backward: {str(force).lower()}
        layer {{ name: "data" type: "Input" top: "x" top: "label"
                input_param {{ shape {{ dim: 4 dim: 3 dim: 5 dim: 5 }} shape {{ dim: 4 }} }} }}
        layer {{ name: "bn" type: "BatchNorm" bottom: "x" top: "x" batch_norm_param {{ use_global_stats: false }} }}
        layer {{ name: "scale" type: "Scale" bottom: "x" top: "x" scale_param {{ bias_term: true }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param {{ num_output: 2 }} }}
    """ + ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }' if loss else "")
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), TRAIN)
    net.blobs["x"].data[...] = data((4, 3, 5, 5))
    net.forward()
    bn, scale = (net.layers[list(net._layer_names).index(name)] for name in ("bn", "scale"))
    assert bn.x_norm.count == (300 if kept else 1)  # (shape (): one element)
    assert scale.temp.count == 1  # after an in-place BatchNorm, Scale reads its copy, if any
    assert scale.bottom_copy is (bn.x_norm if kept else None)


def test_scale_after_batch_norm_reads_its_copy_and_gets_the_same_gradients():
    """Scale in place after BatchNorm in place (ResNet's pattern), then ReLU in place, which
    overwrites both layers' top: the gradients through BatchNorm's shared copy equal those of
    a net whose layers keep their own blobs; so do those of a forward that starts at the Scale
    and of one whose callback rounds BatchNorm's top (fixed-point training's), which take a
    copy of the bottom instead."""
    import espresso as caffe
    from espresso.proto import caffe_pb2
    from espresso.proto.text import parse_text

    def net(in_place):
        s, r = ("x", "x") if in_place else ("n", "s")
        text = f"""force_backward: true
            layer {{ name: "data" type: "Input" top: "x" top: "label"
                input_param {{ shape {{ dim: 4 dim: 3 dim: 5 dim: 5 }} shape {{ dim: 4 }} }} }}
            layer {{ name: "bn" type: "BatchNorm" bottom: "x" top: "{s}" }}
            layer {{ name: "scale" type: "Scale" bottom: "{s}" top: "{r}"
                     scale_param {{ bias_term: true filler {{ type: "uniform" min: 0.5 max: 2 }} }} }}
            layer {{ name: "relu" type: "ReLU" bottom: "{r}" top: "{r}" }}
            layer {{ name: "ip" type: "InnerProduct" bottom: "{r}" top: "ip"
                     inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
            layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}"""
        n = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), TRAIN)
        n.blobs["x"].data[...] = data((4, 3, 5, 5), 5)
        n.blobs["label"].data[...] = [0, 1, 1, 0]
        return n

    def same_gradients(shared, apart, **forward):
        for name in ("scale", "ip"):
            for a, b in zip(apart.params[name], shared.params[name], strict=True):
                b.data[...] = a.data
        for n in (shared, apart):
            n.forward()
        if forward:  # the Scale's bottom changed since BatchNorm ran
            shared.blobs["x"].data[...] = apart.blobs["n"].data[...] = data((4, 3, 5, 5), 6)
            shared.forward(**forward)
            apart.forward(**forward)
        for n in (shared, apart):
            n.backward()
        for name in ("scale", "ip"):
            for a, b in zip(apart.params[name], shared.params[name], strict=True):
                assert_close(b.diff, a.diff)
        if not forward:
            assert_close(shared.blobs["x"].diff, apart.blobs["x"].diff)

    shared = net(True)
    same_gradients(shared, net(False))
    assert shared.layers[2].bottom_copy is shared.layers[1].x_norm
    same_gradients(net(True), net(False), start="scale")
    shared, apart = net(True), net(False)
    for n, top in ((shared, "x"), (apart, "n")):
        n.after_forward(lambda i, n=n, top=top: i == 1 and n.blobs[top].data.__setitem__(
            Ellipsis, np.round(n.blobs[top].data * 2) / 2))
    same_gradients(shared, apart)
    assert shared.layers[2].bottom_copy is None


def test_a_stand_in_for_the_batch_norm_leaves_the_scale_its_own_copy():
    """Net.replace_layer (an add-on's stand-in) puts a new BatchNorm before the Scale that read
    the old one's copy: the Scale copies its bottom again, and its gradient stays right."""
    import espresso as caffe
    from espresso.layers.normalization import BatchNormLayer
    from espresso.proto import caffe_pb2
    from espresso.proto.text import parse_text

    text = """force_backward: true
        layer { name: "data" type: "Input" top: "x" top: "label"
                input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } shape { dim: 4 } } }
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
        layer { name: "scale" type: "Scale" bottom: "x" top: "x" scale_param { bias_term: true } }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
                inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""
    nets = [caffe.Net(parse_text(text, caffe_pb2.NetParameter()), TRAIN) for _ in range(2)]
    replaced = nets[1]
    old = replaced.engine_layers[1]
    new = BatchNormLayer(old.lp, old.backend, old.phase, dtype=old.dtype)
    new.setup_all(replaced.bottom_vecs[1], replaced.top_vecs[1])
    replaced.replace_layer(1, new)
    assert replaced.engine_layers[2].copy_source is None
    for net in nets:
        net.params["ip"][0].data[...] = nets[0].params["ip"][0].data
        net.params["scale"][0].data[...] = [0.5, 1.5, 2.0]
        net.blobs["x"].data[...] = data((4, 3, 5, 5), 7)
        net.blobs["label"].data[...] = [0, 1, 1, 0]
        net.forward()
        net.backward()
    assert_close(replaced.params["scale"][0].diff, nets[0].params["scale"][0].diff)
