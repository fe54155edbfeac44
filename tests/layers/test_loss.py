"""Softmax, the loss layers and Accuracy, against plain NumPy float64 references."""

import itertools

import numpy as np
import pytest
from devices import ON_GPU, FakeDevice

import espresso as caffe
from espresso import backend as backends
from espresso.backend.cpu import kernels as cpu_kernels
from espresso.errors import LabelError, LayerParamError, ModelFileError, NetError, ShapeError
from espresso.layer import legacy_types
from espresso.net import TEST, TRAIN, Net
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.testing import LayerRun, assert_close, check_gradient, check_layer

FLT_MIN = float(np.finfo(np.float32).tiny)
MODES = {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3}


@pytest.fixture(autouse=True, params=["fused", "xp"])
def softmax_loss_path(request, monkeypatch):
    """Every test with the CPU's fused SoftmaxWithLoss kernels (Numba's) and with the xp code."""
    if request.param == "fused" and cpu_kernels.softmax_loss_forward is None:
        pytest.skip("the fused CPU kernels need Numba (pip install espresso-nn[fast])")
    if request.param == "xp":
        monkeypatch.setattr(cpu_kernels, "softmax_loss_forward", None)
        monkeypatch.setattr(cpu_kernels, "softmax_loss_backward", None)
    return request.param


# *** plain references ***
def softmax_ref(x, axis):
    """Softmax by explicit loops over every position but the class axis."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        e = np.exp(x[idx] - x[idx].max())
        out[idx] = e / e.sum()
    return np.moveaxis(out, -1, axis)


def positions(x, axis):
    """(outer, inner) index pairs and the class count, as Caffe splits a blob at `axis`."""
    outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1:]))
    return list(itertools.product(range(outer), range(inner))), x.shape[axis], outer, inner


def normalizer_ref(mode, outer, inner, valid):
    return max(1.0, {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode])


def softmax_loss_ref(x, label, axis=1, ignore=None, mode="VALID", infogain=None):
    """SoftmaxWithLoss, or InfogainLoss when H is given, position by position."""
    pos, classes, outer, inner = positions(x, axis)
    p = softmax_ref(x, axis).reshape(outer, classes, inner)
    lab = label.reshape(outer, inner)
    loss, valid = 0.0, 0
    for o, i in pos:
        k = int(lab[o, i])
        if ignore is not None and k == ignore:
            continue
        if infogain is None:
            loss -= np.log(max(p[o, k, i], FLT_MIN))
        else:
            loss -= sum(infogain[k, c] * np.log(max(p[o, c, i], 1e-20)) for c in range(classes))
        valid += 1
    return loss / normalizer_ref(mode, outer, inner, valid)


def labels_for(rng, shape, classes, ignore=None, n_ignored=0):
    lab = rng.integers(0, classes, size=shape).astype(np.float64)
    if ignore is not None:
        flat = lab.reshape(-1)
        flat[rng.choice(flat.size, n_ignored, replace=False)] = ignore
    return lab


def loss_snippet(type_, body=""):
    return f'type: "{type_}" {body}'


# *** Softmax ***
@pytest.mark.parametrize("shape,axis", [((2, 3, 2, 2), 1), ((2, 3, 4), -1), ((3, 4), 0), ((2, 3, 2), 2)])
def test_softmax(shape, axis, rng):
    x = rng.standard_normal(shape)
    a = axis % len(shape)
    check_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [x],
                reference=lambda b, p: [softmax_ref(b[0], a)], top_shapes=[shape],
                reshape_batch=4 if a != 0 else None)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1001.0]])
    (y,) = LayerRun('type: "Softmax"', [x]).forward()
    assert np.isfinite(y).all()
    assert_close(y, softmax_ref(x - x.max(axis=1, keepdims=True), 1))


def test_softmax_float32_and_axis_error(rng):
    x = rng.standard_normal((2, 5))
    (y,) = LayerRun('type: "Softmax"', [x], dtype=np.float32).forward()
    assert y.dtype == np.float32
    assert_close(y, softmax_ref(x, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(LayerParamError, match=r"softmax_param.axis: axis 2 out of range .* \(2, 5\)"):
        LayerRun('type: "Softmax" softmax_param { axis: 2 }', [x])


# *** SoftmaxWithLoss ***
SWL_CASES = [  # (shape, axis, normalization or None, ignore_label or None, ignored count)
    ((3, 4), 1, None, None, 0),
    ((2, 3, 2, 2), 1, None, None, 0),
    ((2, 3, 2, 2), 1, "VALID", 255, 3),
    ((2, 3, 2, 2), 1, "FULL", 255, 3),
    ((2, 3, 2, 2), 1, "BATCH_SIZE", -1, 2),
    ((2, 3, 2, 2), 1, "NONE", 255, 2),
    ((2, 2, 3, 2), 2, "VALID", 0, 2),  # class axis 2 of (N, C, H, W); class 0 ignored
    ((2, 2, 2, 3), -1, "FULL", None, 0),
]


@pytest.mark.parametrize("shape,axis,mode,ignore,n_ignored", SWL_CASES)
def test_softmax_with_loss(shape, axis, mode, ignore, n_ignored, rng):
    a = axis % len(shape)
    x = rng.standard_normal(shape)
    label_shape = shape[:a] + shape[a + 1:]
    lab = labels_for(rng, label_shape, shape[a], ignore, n_ignored)
    body = f"softmax_param {{ axis: {axis} }} loss_param {{ "
    body += f"normalization: {mode} " if mode else ""
    body += f"ignore_label: {ignore} " if ignore is not None else ""
    ref = lambda b, p: [np.array(softmax_loss_ref(b[0], b[1], a, ignore, mode or "VALID"))]  # noqa: E731
    check_layer(loss_snippet("SoftmaxWithLoss", body + "}"), [x, lab], reference=ref,
                top_shapes=[()], check_bottoms=[0])


@pytest.mark.parametrize("normalize,normalization,expected", [
    ("false", None, "BATCH_SIZE"), ("true", None, "VALID"), ("false", "FULL", "FULL"), (None, None, "VALID")])
def test_softmax_with_loss_legacy_normalize(normalize, normalization, expected, rng):
    x, lab = rng.standard_normal((2, 3, 2)), np.array([[0, 255], [255, 255.0]])
    body = "loss_param { ignore_label: 255 "
    body += f"normalize: {normalize} " if normalize else ""
    body += f"normalization: {normalization} " if normalization else ""
    (loss,) = LayerRun(loss_snippet("SoftmaxWithLoss", body + "}"), [x, lab]).forward()
    assert_close(loss, softmax_loss_ref(x, lab, 1, 255, expected))


def test_softmax_with_loss_clamps_at_flt_min_and_all_ignored():
    x = np.array([[0.0, -200.0], [1.0, 2.0]])  # p = e^-200 underflows FLT_MIN
    run = LayerRun(loss_snippet("SoftmaxWithLoss", "loss_param { normalization: NONE }"), [x, [1, 1.0]])
    want = -np.log(FLT_MIN) - np.log(softmax_ref(x, 1)[1, 1])
    assert_close(run.forward()[0], want)
    run = LayerRun(loss_snippet("SoftmaxWithLoss", "loss_param { ignore_label: 7 }"), [x, [7, 7.0]])
    assert run.forward()[0] == 0  # the normalizer is max(1, 0)
    assert not run.backward([np.array(1.0)], [True, False])[0].any()


def test_softmax_with_loss_second_top_is_probabilities(rng):
    x, lab = rng.standard_normal((2, 4, 3)), rng.integers(0, 4, (2, 3)).astype(float)
    run = LayerRun('type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0', [x, lab], tops=2)
    loss, prob = run.forward()
    assert_close(loss, softmax_loss_ref(x, lab))
    assert_close(prob, softmax_ref(x, 1))
    # as in Caffe, the loss_weight default covers one top only
    with pytest.raises(NetError, match="loss_weight"):
        LayerRun('type: "SoftmaxWithLoss"', [x, lab], tops=2)


def test_softmax_with_loss_fused_matches_the_numpy_steps(softmax_loss_path, monkeypatch, rng):
    """float32: the fused CPU loss, probabilities and gradient agree with the NumPy steps to
    float32 rounding (its sums run in Caffe's loop order, with libm's exp); from the same
    probabilities, its gradient is theirs bit for bit."""
    if softmax_loss_path == "xp":
        pytest.skip("compares the fused path with the xp one")
    x, lab = rng.standard_normal((6, 5, 3)) * 4, rng.integers(0, 5, (6, 3)).astype(float)
    lab[1, 2] = lab[4, 0] = 255
    snippet = 'type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0 loss_param { ignore_label: 255 }'
    fused = cpu_kernels.softmax_loss_backward
    results = []
    for path in ("fused", "xp"):
        if path == "xp":
            monkeypatch.setattr(cpu_kernels, "softmax_loss_forward", None)
            monkeypatch.setattr(cpu_kernels, "softmax_loss_backward", None)
        run = LayerRun(snippet, [x, lab], dtype=np.float32, tops=2)
        loss, prob = run.forward()
        results.append((loss, prob, run.backward([np.array(1.5), np.zeros_like(prob)], [True, False])[0]))
    (loss, prob, grad), (loss_xp, prob_xp, grad_xp) = results
    np.testing.assert_allclose(loss, loss_xp, rtol=1e-6)
    np.testing.assert_allclose(prob, prob_xp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, grad_xp, rtol=1e-6, atol=1e-7)
    dx, scale = np.empty_like(prob), np.float32(1.5) / np.float32(16)  # 16 labels counted
    fused(prob, lab.astype(np.float32), np.array(1.5, np.float32), np.array(16, np.float32), dx, (6, 5, 3), 255)
    hot = (np.arange(5)[None, :, None] == lab[:, None, :]) & (lab[:, None, :] != 255)
    want = (prob - hot) * (lab[:, None, :] != 255)
    want *= scale
    assert want.dtype == np.float32 and np.array_equal(dx, want)


def test_softmax_with_loss_fused_on_the_cpu_only_while_small(softmax_loss_path, rng):
    """The CPU's fused kernels (scalar exp) for up to k.SOFTMAX_LOSS_MOST inputs; NumPy's above."""
    small = LayerRun('type: "SoftmaxWithLoss"', [rng.standard_normal((64, 10)), np.zeros(64)])
    large = LayerRun('type: "SoftmaxWithLoss"', [rng.standard_normal((2, 21, 400)), np.zeros((2, 400))])
    assert small.layer.fused == (softmax_loss_path == "fused") and not large.layer.fused


def test_softmax_with_loss_recording_a_bad_label_finishes_the_pass():
    """On a device (problems recorded, raised after), a label that is no class counts as
    ignored: the loss and every probability are those of the labels that are classes."""
    labels = np.arange(12.0).reshape(4, 3) % 5
    labels[0, 1] = 9
    net = _labelled_net("SoftmaxWithLoss spatial", labels, "device")
    layer = net.layer_dict["check"]
    layer.prob.data[...] = -1
    with pytest.raises(LabelError, match="label 9 at batch item 0, position 1"):
        net.forward()
    x = np.array(net.blobs["x"].data)
    assert_close(np.array(layer.prob.data), softmax_ref(x, 1), rtol=1e-5, atol=1e-7)  # (float32)
    want = softmax_loss_ref(x, np.where(labels == 9, 255, labels), 1, 255, "VALID")
    assert_close(np.array(net.blobs["out"].data), want, rtol=1e-5)


def analytic_grad(run, weight=None, down=None):
    """Bottom diffs after one forward/backward, leaving the top diff (loss weight) as set up."""
    run.forward()
    if weight is not None:
        run.top[0].diff[...] = weight
    down = down or [True] + [False] * (len(run.bottom) - 1)
    run.layer.backward(run.top, down, run.bottom)
    return [np.array(b.diff) for b in run.bottom]


LOSS_WEIGHT_CASES = [
    ("SoftmaxWithLoss", "", lambda r: [r.standard_normal((3, 4)), np.array([0, 3, 1.0])]),
    ("SigmoidCrossEntropyLoss", "", lambda r: [r.standard_normal((3, 4)), r.random((3, 4))]),
    ("EuclideanLoss", "", lambda r: [r.standard_normal((3, 4)), r.standard_normal((3, 4))]),
    ("HingeLoss", "", lambda r: [r.standard_normal((3, 4)) * 0.3, np.array([0, 3, 1.0])]),
    ("MultinomialLogisticLoss", "", lambda r: [r.random((3, 4)) + 0.1, np.array([0, 3, 1.0])]),
    ("InfogainLoss", "", lambda r: [r.standard_normal((3, 4)), np.array([0, 3, 1.0]), r.random((4, 4))]),
    ("ContrastiveLoss", "", lambda r: [r.standard_normal((3, 2, 1, 1)), r.standard_normal((3, 2, 1, 1)),
                                       np.array([1, 0, 0.0]).reshape(3, 1, 1, 1)]),
]


@pytest.mark.parametrize("type_,body,make", LOSS_WEIGHT_CASES)
def test_loss_weight_scales_gradient(type_, body, make, rng):
    bottoms = make(rng)
    plain = LayerRun(loss_snippet(type_, body), bottoms)
    weighted = LayerRun(loss_snippet(type_, body) + " loss_weight: 2", bottoms)
    assert plain.layer.loss_weights == [1.0] and weighted.layer.loss_weights == [2.0]
    assert float(weighted.top[0].diff) == 2.0  # Caffe keeps the weight in the loss top's diff
    assert_close(weighted.forward()[0], plain.forward()[0])  # the top holds the unweighted loss
    assert_close(analytic_grad(weighted)[0], 2 * analytic_grad(plain)[0])
    check_gradient(weighted, [0])  # and the weighted gradient is still the derivative


# *** EuclideanLoss ***
def euclidean_ref(a, b):
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    total = sum((a[n, i] - b[n, i]) ** 2 for n in range(a.shape[0]) for i in range(a.shape[1]))
    return total / a.shape[0] / 2


def test_euclidean_loss(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 2, 2))
    run = check_layer('type: "EuclideanLoss"', [a, b], top_shapes=[()],
                      reference=lambda bt, p: [np.array(euclidean_ref(bt[0], bt[1]))], reshape_batch=5)
    assert run.layer.allow_force_backward(1)
    run = LayerRun('type: "EuclideanLoss"', [a, b])
    da, db = analytic_grad(run, 1.0, [True, True])
    assert_close(da, (a - b.reshape(3, 4)) / 3)
    assert_close(db, -(a - b.reshape(3, 4)).reshape(3, 2, 2) / 3)  # with sign


def test_euclidean_loss_errors(rng):
    with pytest.raises(ShapeError):
        LayerRun('type: "EuclideanLoss"', [rng.standard_normal((3, 4)), rng.standard_normal((3, 5))])
    with pytest.raises(ShapeError, match="first dimension"):
        LayerRun('type: "EuclideanLoss"', [rng.standard_normal((3, 4)), rng.standard_normal((4, 3))])
    with pytest.raises(NetError, match="2 bottom"):
        LayerRun('type: "EuclideanLoss"', [rng.standard_normal((3, 4))])
    with pytest.raises(LayerParamError, match="ignore_label"):
        LayerRun('type: "EuclideanLoss" loss_param { ignore_label: 1 }', [np.zeros((2, 2))] * 2)


# *** SigmoidCrossEntropyLoss ***
def sigmoid_ce_ref(x, t, ignore=None, mode="BATCH_SIZE"):
    loss, valid = 0.0, 0
    for xi, ti in zip(x.ravel(), t.ravel(), strict=True):
        if ignore is not None and int(ti) == ignore:
            continue
        s = 1 / (1 + np.exp(-xi)) if xi >= 0 else np.exp(xi) / (1 + np.exp(xi))
        loss -= ti * np.log(s) + (1 - ti) * np.log1p(-s) if abs(xi) < 30 else (
            ti * min(xi, 0) - (1 - ti) * max(xi, 0) - np.log1p(np.exp(-abs(xi))))
        valid += 1
    return loss / normalizer_ref(mode, x.shape[0], x[0].size, valid)


@pytest.mark.parametrize("mode,ignore", [(None, None), ("VALID", -1), ("FULL", -1), ("NONE", None),
                                         ("BATCH_SIZE", -1)])
def test_sigmoid_cross_entropy_loss(mode, ignore, rng):
    x = rng.standard_normal((2, 3, 2)) * 2
    t = rng.random((2, 3, 2))
    t[0, 0, 0], t[1, 2, 1] = 1.0, 0.0
    if ignore is not None:
        t[0, 1, 1] = t[1, 0, 0] = ignore
    body = "loss_param { " + (f"normalization: {mode} " if mode else "") + (
        f"ignore_label: {ignore} " if ignore is not None else "") + "}"
    check_layer(loss_snippet("SigmoidCrossEntropyLoss", body), [x, t], top_shapes=[()], check_bottoms=[0],
                reference=lambda b, p: [np.array(sigmoid_ce_ref(b[0], b[1], ignore, mode or "BATCH_SIZE"))])


def test_sigmoid_cross_entropy_is_stable_and_honors_normalize():
    x, t = np.array([[60.0, -60.0, 800.0]]), np.array([[0.0, 1.0, 1.0]])
    (loss,) = LayerRun('type: "SigmoidCrossEntropyLoss"', [x, t]).forward()
    assert_close(loss, 120.0)
    x2, t2 = np.array([[0.5, -0.5], [1.0, 2.0]]), np.array([[1.0, -1.0], [-1.0, -1.0]])
    snippet = 'type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalize: true }'
    run = LayerRun(snippet, [x2, t2])
    assert_close(run.forward()[0], sigmoid_ce_ref(x2, t2, -1, "VALID"))
    with pytest.raises(ShapeError, match="same count"):
        LayerRun('type: "SigmoidCrossEntropyLoss"', [np.zeros((2, 3)), np.zeros((2, 2))])


# *** HingeLoss ***
def hinge_ref(x, label, norm):
    n, loss = x.shape[0], 0.0
    x = x.reshape(n, -1)
    for i in range(n):
        for j in range(x.shape[1]):
            y = 1 if j == int(label.ravel()[i]) else -1
            m = max(0.0, 1 - y * x[i, j])
            loss += m if norm == "L1" else m * m
    return loss / n


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm, rng):
    x = rng.choice([-1, 1], (3, 4, 1, 1)) * rng.uniform(0.1, 1.8, (3, 4, 1, 1))
    x[np.abs(np.abs(x) - 1) < 0.05] = 0.5  # away from the hinge at margin 0
    lab = np.array([2, 0, 3.0])
    check_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [x, lab], top_shapes=[()],
                reference=lambda b, p: [np.array(hinge_ref(b[0], b[1], norm))], check_bottoms=[0])


# *** MultinomialLogisticLoss ***
def multinomial_ref(p, label):
    n = p.shape[0]
    p = p.reshape(n, -1)
    return -sum(np.log(max(p[i, int(label.ravel()[i])], 1e-20)) for i in range(n)) / n


def test_multinomial_logistic_loss(rng):
    p = rng.uniform(0.05, 1, (3, 4))
    lab = np.array([1, 3, 0.0]).reshape(3, 1, 1, 1)
    check_layer('type: "MultinomialLogisticLoss"', [p, lab], top_shapes=[()], check_bottoms=[0],
                reference=lambda b, pr: [np.array(multinomial_ref(b[0], b[1]))])
    zero = np.array([[0.0, 1.0], [0.5, 0.5]])
    run = LayerRun('type: "MultinomialLogisticLoss"', [zero, [0, 1.0]])
    assert_close(run.forward()[0], (-np.log(1e-20) - np.log(0.5)) / 2)  # clamped at 1e-20
    with pytest.raises(ShapeError, match="labels"):
        LayerRun('type: "MultinomialLogisticLoss"', [p, np.zeros((3, 2))])


# *** InfogainLoss ***
INFOGAIN_CASES = [  # (shape, axis, normalization or None, ignore_label or None, ignored count)
    ((3, 4), 1, None, None, 0),
    ((2, 3, 2, 2), 1, "VALID", 255, 3),
    ((2, 3, 2, 2), 1, "FULL", 255, 2),
    ((2, 3, 2, 2), 1, "BATCH_SIZE", None, 0),
    ((2, 3, 2, 2), 1, "NONE", -1, 2),
    ((2, 2, 3, 2), 2, "VALID", None, 0),
]


@pytest.mark.parametrize("shape,axis,mode,ignore,n_ignored", INFOGAIN_CASES)
def test_infogain_loss(shape, axis, mode, ignore, n_ignored, rng):
    classes = shape[axis]
    x, H = rng.standard_normal(shape), rng.uniform(0, 2, (classes, classes))
    lab = labels_for(rng, shape[:axis] + shape[axis + 1:], classes, ignore, n_ignored)
    body = f"infogain_loss_param {{ axis: {axis} }} loss_param {{ "
    body += f"normalization: {mode} " if mode else ""
    body += f"ignore_label: {ignore} " if ignore is not None else ""
    ref = lambda b, p: [np.array(softmax_loss_ref(b[0], b[1], axis, ignore, mode or "VALID",
                                                         b[2].reshape(classes, classes)))]  # noqa: E731
    check_layer(loss_snippet("InfogainLoss", body + "}"), [x, lab, H.reshape(1, 1, classes, classes)],
                reference=ref, top_shapes=[()], check_bottoms=[0])


def test_infogain_identity_equals_softmax_with_loss(rng):
    x, lab = rng.standard_normal((3, 5)), np.array([4, 0, 2.0])
    info = LayerRun('type: "InfogainLoss"', [x, lab, np.eye(5)])
    soft = LayerRun('type: "SoftmaxWithLoss"', [x, lab])
    assert_close(info.forward()[0], soft.forward()[0])
    assert_close(analytic_grad(info)[0], analytic_grad(soft)[0])


def write_blobproto(path, array):
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=array.shape[0], width=array.shape[1])
    proto.data.extend(array.ravel().tolist())
    path.write_bytes(proto.SerializeToString())


def test_infogain_loss_from_source(tmp_path, rng):
    H = rng.uniform(0, 2, (4, 4)).astype(np.float32).astype(np.float64)
    write_blobproto(tmp_path / "H.binaryproto", H)
    x, lab = rng.standard_normal((3, 4)), np.array([3, 1, 0.0])
    snippet = f'type: "InfogainLoss" infogain_loss_param {{ source: "{tmp_path / "H.binaryproto"}" }}'
    run = LayerRun(snippet + " top: 'loss' top: 'prob' loss_weight: 1 loss_weight: 0", [x, lab])
    loss, prob = run.forward()
    assert_close(loss, softmax_loss_ref(x, lab, infogain=H))
    assert_close(prob, softmax_ref(x, 1))
    check_gradient(LayerRun(snippet, [x, lab]), [0])
    (tmp_path / "bad.binaryproto").write_bytes(caffe_pb2.BlobProto(num=1, channels=1, height=3,
                                                                   width=3).SerializeToString())
    with pytest.raises(ModelFileError):
        LayerRun(f'type: "InfogainLoss" infogain_loss_param {{ source: "{tmp_path / "bad.binaryproto"}" }}',
                 [x, lab])


def test_infogain_loss_errors(rng):
    x, lab = rng.standard_normal((3, 4)), np.array([3, 1, 0.0])
    with pytest.raises(LayerParamError, match="source"):
        LayerRun('type: "InfogainLoss"', [x, lab])
    with pytest.raises(ShapeError, match="4x4"):
        LayerRun('type: "InfogainLoss"', [x, lab, np.eye(3)])
    with pytest.raises(LayerParamError, match="normalize"):
        LayerRun('type: "InfogainLoss" loss_param { normalize: true }', [x, lab, np.eye(4)])
    run = LayerRun('type: "InfogainLoss"', [x, lab, np.eye(4)])
    run.forward()
    with pytest.raises(NetError, match="infogain"):
        run.layer.backward(run.top, [True, False, True], run.bottom)
    with pytest.raises(NetError, match="label"):
        run.layer.backward(run.top, [True, True, False], run.bottom)


INFOGAIN_NET = """
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "label" top: "H"
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } shape { dim: 3 dim: 3 } } }
layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "label" bottom: "H" top: "loss" }
"""


def test_infogain_with_h_bottom_and_force_backward_is_an_error():
    net = caffe.Net(parse_text(INFOGAIN_NET, caffe_pb2.NetParameter()), caffe.TRAIN)
    net.blobs["H"].data[...] = np.eye(3)
    net.forward()
    with pytest.raises(NetError, match="infogain"):
        net.backward()


# *** ContrastiveLoss ***
def contrastive_ref(a, b, y, margin, legacy):
    n, loss = a.shape[0], 0.0
    for i in range(n):
        d2 = sum((a[i].ravel()[c] - b[i].ravel()[c]) ** 2 for c in range(a[i].size))
        if int(y.ravel()[i]):
            loss += d2
        elif legacy:
            loss += max(margin - d2, 0.0)
        else:
            loss += max(margin - np.sqrt(d2), 0.0) ** 2
    return loss / n / 2


@pytest.mark.parametrize("legacy,margin", [(False, 1.0), (False, 2.0), (True, 1.0), (True, 3.0)])
def test_contrastive_loss(legacy, margin):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 3, 1, 1))
    b = a + rng.standard_normal((6, 3, 1, 1)) * 0.6
    y = np.array([1, 0, 0, 1, 0, 0.0]).reshape(6, 1, 1, 1)
    d = np.sqrt(((a - b) ** 2).sum(axis=(1, 2, 3)))
    assert (np.abs((d ** 2 if legacy else d) - margin) > 0.05).all()  # inputs away from the kink
    snippet = (f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: {margin} '
               f'legacy_version: {str(legacy).lower()} }}')
    run = check_layer(snippet, [a, b, y], top_shapes=[()], check_bottoms=[0, 1],
                      reference=lambda bt, p: [np.array(contrastive_ref(*bt, margin, legacy))])
    # Caffe's ContrastiveLossLayer::AllowForceBackward: a and b, never y (checked against real
    # Caffe in tests/test_caffe_reference.py, net "loss")
    assert run.layer.allow_force_backward(0) and run.layer.allow_force_backward(1)
    assert not run.layer.allow_force_backward(2)


def test_contrastive_loss_gradient_uses_caffe_eps():
    a, b, y = np.array([[[[0.3]], [[0.0]]]]), np.zeros((1, 2, 1, 1)), np.zeros((1, 1, 1, 1))
    run = LayerRun('type: "ContrastiveLoss"', [a, b, y])
    da = analytic_grad(run, 1.0)[0]
    assert_close(da.ravel(), [-(1 - 0.3) / (0.3 + 1e-4) * 0.3, 0.0])
    with pytest.raises(ShapeError):
        LayerRun('type: "ContrastiveLoss"', [np.zeros((2, 3, 1, 1)), np.zeros((2, 2, 1, 1)), np.zeros(2)])


# *** Accuracy ***
def accuracy_ref(x, label, top_k, axis=1, ignore=None):
    pos, classes, outer, inner = positions(x, axis)
    xs, lab = x.reshape(outer, classes, inner), label.reshape(outer, inner)
    hits, count = 0, 0
    seen, right = np.zeros(classes), np.zeros(classes)
    for o, i in pos:
        k = int(lab[o, i])
        if ignore is not None and k == ignore:
            continue
        rank = sum(1 for c in range(classes) if c != k and xs[o, c, i] >= xs[o, k, i])
        seen[k] += 1
        if rank < top_k:
            hits += 1
            right[k] += 1
        count += 1
    per_class = np.array([right[c] / seen[c] if seen[c] else 0.0 for c in range(classes)])
    return np.array(hits / count if count else 0.0), per_class


def distinct_scores(rng, shape, axis):
    """Scores with no ties along the class axis: shuffled 0..C-1 plus small noise."""
    x = np.moveaxis(rng.standard_normal(shape) * 0.01, axis, -1)
    for idx in np.ndindex(x.shape[:-1]):
        x[idx] += rng.permutation(x.shape[-1])
    return np.moveaxis(x, -1, axis)


@pytest.mark.parametrize("top_k,shape,axis,ignore", [
    (1, (8, 5), 1, None), (3, (8, 5), 1, None), (1, (2, 4, 3, 2), 1, 2), (3, (2, 4, 3, 2), 1, None),
    (2, (2, 3, 5), 2, 0), (1, (3, 4, 6), -1, None)])
def test_accuracy(top_k, shape, axis, ignore, rng):
    a = axis % len(shape)
    x = distinct_scores(rng, shape, a)
    lab = labels_for(rng, shape[:a] + shape[a + 1:], shape[a])
    best, worst = np.argmax(x, axis=a).ravel(), np.argmin(x, axis=a).ravel()
    lab.reshape(-1)[0::3], lab.reshape(-1)[1::3] = best[0::3], worst[1::3]  # some right, some wrong
    body = f"accuracy_param {{ top_k: {top_k} axis: {axis} "
    body += (f"ignore_label: {ignore} }}" if ignore is not None else "}")
    run = LayerRun(f'type: "Accuracy" {body}', [x, lab], tops=2)
    assert run.layer.loss_weights == [0.0, 0.0]  # not a loss layer
    acc, per_class = run.forward()
    want_acc, want_per_class = accuracy_ref(x, lab, top_k, a, ignore)
    assert acc.shape == () and per_class.shape == (shape[a],)
    assert_close(acc, want_acc)
    assert_close(per_class, want_per_class)
    assert 0 < want_acc < 1  # the data is not trivially all right or all wrong


def test_accuracy_values_by_hand():
    x = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    lab = np.array([1, 2, 1, 0.0])  # right, 3rd best, 2nd best, tied with class 1 (a tie counts against)
    assert_close(LayerRun('type: "Accuracy"', [x, lab]).forward()[0], 0.25)
    assert_close(LayerRun('type: "Accuracy" accuracy_param { top_k: 2 }', [x, lab]).forward()[0], 0.75)
    ignoring_1 = LayerRun('type: "Accuracy" accuracy_param { ignore_label: 1 }', [x, lab], tops=2)
    acc, per_class = ignoring_1.forward()
    assert_close(acc, 0.0)
    assert_close(per_class, [0.0, 0.0, 0.0])
    acc, per_class = LayerRun('type: "Accuracy" accuracy_param { top_k: 2 }', [x, lab], tops=2).forward()
    assert_close(per_class, [1.0, 1.0, 0.0])
    all_ignored = LayerRun('type: "Accuracy" accuracy_param { ignore_label: 5 }', [x, np.full(4, 5.0)])
    assert all_ignored.forward()[0] == 0


def test_accuracy_errors_and_no_backward(rng):
    x, lab = rng.standard_normal((4, 3)), np.array([0, 1, 2, 0.0])
    with pytest.raises(LayerParamError, match="top_k"):
        LayerRun('type: "Accuracy" accuracy_param { top_k: 4 }', [x, lab])
    with pytest.raises(ShapeError, match="labels"):
        LayerRun('type: "Accuracy"', [rng.standard_normal((4, 3, 2)), lab])
    with pytest.raises(NetError):
        LayerRun('type: "Accuracy"', [x])
    run = LayerRun('type: "Accuracy"', [x, lab])
    run.forward()
    with pytest.raises(NetError, match="backpropagate"):
        run.layer.backward(run.top, [True, False], run.bottom)


# *** shared loss-layer rules ***
LABEL_LOSSES = ["SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "MultinomialLogisticLoss"]


@pytest.mark.parametrize("type_", LABEL_LOSSES)
def test_label_bottom_gets_no_gradient(type_, rng):
    x, lab = rng.random((3, 4)) + 0.1, np.array([0, 3, 1.0])
    if type_ == "SigmoidCrossEntropyLoss":
        lab = rng.random((3, 4))
    run = LayerRun(f'type: "{type_}"', [x, lab])
    assert run.layer.allow_force_backward(0) and not run.layer.allow_force_backward(1)
    run.forward()
    with pytest.raises(NetError, match="label"):
        run.layer.backward(run.top, [True, True], run.bottom)
    with pytest.raises(NetError, match="bottom"):
        LayerRun(f'type: "{type_}"', [x, lab, lab])
    with pytest.raises(ShapeError):
        LayerRun(f'type: "{type_}"', [x, np.zeros(2)])


def test_softmax_with_loss_label_count_mismatch(rng):
    with pytest.raises(ShapeError, match="number of labels"):
        LayerRun('type: "SoftmaxWithLoss"', [rng.standard_normal((2, 3, 2)), np.zeros(2)])


def test_legacy_names():
    names = legacy_types()
    expected = {"SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "EUCLIDEAN_LOSS": "EuclideanLoss",
                "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "HINGE_LOSS": "HingeLoss",
                "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "INFOGAIN_LOSS": "InfogainLoss",
                "CONTRASTIVE_LOSS": "ContrastiveLoss", "ACCURACY": "Accuracy"}
    assert {k: names.get(k) for k in expected} == expected


# *** labels that are no class ***
LABELLED = {  # layer snippet, classes, label shape
    "SoftmaxWithLoss": ('type: "SoftmaxWithLoss"', 5, (4,)),
    "SoftmaxWithLoss spatial": ('type: "SoftmaxWithLoss"', 5, (4, 3)),
    "Accuracy": ('type: "Accuracy"', 5, (4,)),
    "InfogainLoss": ('type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "h"', 5, (4,)),
    "MultinomialLogisticLoss": ('type: "MultinomialLogisticLoss"', 5, (4,)),
    "HingeLoss": ('type: "HingeLoss"', 5, (4,)),
}


def _labelled_net(case, labels, device=None):
    snippet, classes, shape = LABELLED[case]
    x_shape = (4, classes) + shape[1:]
    extra = " bottom: \"x\" bottom: \"y\"" if "bottom" not in snippet else ""
    h = 'layer { name: "hin" type: "Input" top: "h" input_param { shape { dim: 5 dim: 5 } } }' \
        if "h" in snippet.split("bottom")[-1] else ""
    text = f"""layer {{ name: "in" type: "Input" top: "x" top: "y"
                input_param {{ shape {{ {' '.join(f'dim: {d}' for d in x_shape)} }}
                               shape {{ {' '.join(f'dim: {d}' for d in shape)} }} }} }}
            {h}
            layer {{ name: "check" {snippet}{extra} top: "out" }}"""
    backend = {"device": FakeDevice, "gpu": lambda: backends.get("cuda:0")}.get(device, lambda: None)()
    net = Net(parse_text(text, caffe_pb2.NetParameter()), phase=TRAIN if case != "Accuracy" else TEST, backend=backend)
    net.blobs["x"].data[...] = np.linspace(0.1, 0.9, net.blobs["x"].count).reshape(x_shape)
    if h:
        net.blobs["h"].data[...] = np.eye(5)
    net.blobs["y"].data[...] = labels.reshape(shape)
    return net


@pytest.mark.parametrize("device", ["host", "device", ON_GPU])  # device, gpu: recorded, raised with values read back
@pytest.mark.parametrize("case", LABELLED)
def test_a_label_that_is_no_class_is_refused_naming_where(case, device):
    shape = LABELLED[case][2]
    labels = np.zeros(shape)
    good = _labelled_net(case, labels, device)
    good.forward()
    labels.ravel()[5 if len(shape) > 1 else 2] = -1  # Caffe's release build read out of bounds here
    bad = _labelled_net(case, labels, device)
    at = "batch item 1, position 2" if len(shape) > 1 else "batch item 2"
    with pytest.raises(LabelError, match=rf"layer 'check' \({case.split()[0]}\): label -1 at {at} is not a class "
                                         r"in \[0, 5\)"):
        bad.forward()
    labels.ravel()[:] = 0
    labels.ravel()[-1] = 5
    with pytest.raises(LabelError, match="label 5 at batch item 3"):
        _labelled_net(case, labels, device).forward()


def test_an_ignored_label_outside_the_classes_is_fine():
    net = Net(parse_text("""layer { name: "in" type: "Input" top: "x" top: "y"
                                    input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
                            layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l"
                                    loss_param { ignore_label: -1 } }""", caffe_pb2.NetParameter()), phase=TRAIN)
    net.blobs["y"].data[...] = [-1, 2]
    assert np.isfinite(net.forward()["l"])
    net.blobs["y"].data[...] = [-2, 2]
    with pytest.raises(LabelError, match=r"label -2 at batch item 0 is not a class in \[0, 3\) \(nor its "
                                         r"ignore_label -1\)"):
        net.forward()
