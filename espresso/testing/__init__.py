"""Test tools for layers, public so Python-layer authors can use them too.

`check_layer(snippet, bottoms, reference=...)` builds one layer from a prototxt snippet (so every
test also goes through the parser) and checks: top shapes, forward against a NumPy reference,
a float64 numerical gradient check (Caffe's centred differences, random upstream gradient),
param diffs accumulating and bottom diffs being overwritten, the in-place variant, and a
reshape to another batch size.
"""

import numpy as np

from espresso import backend as backends
from espresso.blob import Blob
from espresso.layer import layer_class
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


class LayerRun:
    """One layer built from a prototxt snippet, with bottom and top blobs of its own."""

    def __init__(self, snippet, bottoms, phase=TRAIN, device="cpu", dtype=np.float64, tops=None,
                 inplace=False, seed=1701):
        lp = parse_text(snippet, caffe_pb2.LayerParameter(), "<snippet>")
        lp.name = lp.name or "test"
        self.backend, self.dtype, self.seed = backends.get(device), np.dtype(dtype), seed
        if not lp.bottom:
            lp.bottom.extend(f"b{i}" for i in range(len(bottoms)))
        if not lp.top:
            n = tops if tops is not None else 1
            lp.top.extend(lp.bottom[i] if inplace and i < len(bottoms) else f"t{i}" for i in range(n))
        self.bottom = [self._blob(a) for a in bottoms]
        self.top = [self.bottom[i] if inplace and i < len(bottoms) else Blob((), dtype, self.backend)
                    for i in range(len(lp.top))]
        self.backend.seed(seed)
        self.layer = layer_class(lp.type)(lp, self.backend, phase, dtype)
        self.layer.setup_all(self.bottom, self.top)
        self.layer.param_propagate_down = [True] * len(self.layer.blobs)

    def _blob(self, array):
        blob = Blob(np.shape(array), self.dtype, self.backend)
        blob.data[...] = self.backend.to_device(np.asarray(array), self.dtype)
        return blob

    def set_bottoms(self, arrays):
        for blob, array in zip(self.bottom, arrays):
            blob.reshape(np.shape(array))
            blob.data[...] = self.backend.to_device(np.asarray(array), self.dtype)

    def forward(self):
        """Reshape (as Caffe's Layer::Forward does) and forward; the tops' data as NumPy arrays."""
        self.backend.seed(self.seed)  # the same dropout mask on every call
        self.layer.reshape(self.bottom, self.top)
        self.layer.forward(self.bottom, self.top)
        return [np.array(t.host_data()) for t in self.top]

    def backward(self, top_diffs, propagate_down=None):
        """Backward from the given top diffs; the bottoms' diffs as NumPy arrays."""
        for blob, diff in zip(self.top, top_diffs):
            blob.diff[...] = self.backend.to_device(diff, self.dtype)
        down = propagate_down if propagate_down is not None else [True] * len(self.bottom)
        self.layer.backward(self.top, down, self.bottom)
        return [np.array(b.host_diff()) for b in self.bottom]

    def param_diffs(self):
        return [np.array(b.host_diff()) for b in self.layer.blobs]

    def zero_param_diffs(self):
        for blob in self.layer.blobs:
            blob.diff[...] = 0


def _objective(run, weights):
    return sum(float((t * w).sum()) for t, w in zip(run.forward(), weights))


def _targets(run, check_bottoms, check_params):
    """(label, data array, analytic-gradient index) for everything to check numerically."""
    targets = [(f"bottom {i}", run.bottom[i].data, ("bottom", i)) for i in check_bottoms]
    if check_params:
        targets += [(f"param {i}", b.data, ("param", i)) for i, b in enumerate(run.layer.blobs)]
    return targets


def check_gradient(run, check_bottoms=None, check_params=True, eps=1e-3, tol=1e-3,
                   max_elements=60, seed=0):
    """Compare analytic gradients with centred differences of the objective sum(top * g).

    Arrays up to `max_elements` are checked element by element; larger ones along random
    directions.  The error is scaled by max(|analytic|, |numeric|, 1), as in Caffe.
    """
    rng = np.random.default_rng(seed)
    if check_bottoms is None:
        check_bottoms = range(len(run.bottom))
    check_bottoms = list(check_bottoms)
    tops = run.forward()
    weights = [rng.standard_normal(t.shape) for t in tops]
    run.zero_param_diffs()
    down = [i in check_bottoms for i in range(len(run.bottom))]
    analytic = {"bottom": run.backward(weights, down), "param": run.param_diffs()}
    for label, data, (kind, index) in _targets(run, check_bottoms, check_params):
        grad = analytic[kind][index]
        for direction in _directions(data.shape, max_elements, rng):
            numeric = _numeric(run, weights, data, direction, eps)
            exact = float((grad * direction).sum())
            scale = max(abs(exact), abs(numeric), 1.0)
            assert abs(exact - numeric) / scale < tol, (
                f"{run.layer.type} {label}: analytic {exact:.6g} vs numeric {numeric:.6g} "
                f"along {'element ' + str(np.argmax(direction)) if direction.sum() == 1 else 'a random direction'}")


def _directions(shape, max_elements, rng):
    size = int(np.prod(shape))
    if size <= max_elements:
        for i in range(size):
            d = np.zeros(size)
            d[i] = 1
            yield d.reshape(shape)
    else:
        for _ in range(max_elements // 4):
            yield rng.standard_normal(shape)


def _numeric(run, weights, data, direction, eps):
    saved = np.array(run.backend.to_host(data))
    step = run.backend.to_device(direction * eps, data.dtype)
    data += step
    plus = _objective(run, weights)
    data -= 2 * step
    minus = _objective(run, weights)
    data[...] = run.backend.to_device(saved, data.dtype)
    return (plus - minus) / (2 * eps)


def assert_close(actual, expected, rtol=1e-7, atol=1e-9, what="values"):
    """allclose with a short report: the first mismatches and the largest difference."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        where = np.argwhere(bad)[:5]
        pairs = ", ".join(f"{tuple(w)}: {actual[tuple(w)]:.8g} vs {expected[tuple(w)]:.8g}" for w in where)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} differ (maxdiff "
                             f"{np.abs(actual - expected).max():.3g}); {pairs}")


def check_layer(snippet, bottoms, reference=None, top_shapes=None, grad=True, check_bottoms=None,
                inplace=None, reshape_batch=None, phase=TRAIN, tops=None, rtol=1e-7, atol=1e-9,
                eps=1e-3, tol=1e-3):
    """Run the whole battery on one layer configuration; returns the LayerRun.

    reference(bottoms, params) -> list of expected top arrays (NumPy, float64).
    inplace: also run with top[0] is bottom[0] and expect identical results (default: the
    layer class's `inplace` flag).  reshape_batch: a new batch size to rebuild the bottoms with.
    """
    bottoms = [np.asarray(b, np.float64) for b in bottoms]
    run = LayerRun(snippet, bottoms, phase=phase, tops=tops)
    outputs = run.forward()
    if top_shapes is not None:
        assert [o.shape for o in outputs] == [tuple(s) for s in top_shapes], [o.shape for o in outputs]
    params = [np.array(b.data) for b in run.layer.blobs]
    if reference is not None:
        for k, (got, want) in enumerate(zip(outputs, reference(bottoms, params))):
            assert_close(got, want, rtol, atol, f"{run.layer.type} top {k}")
    if grad:
        check_gradient(run, check_bottoms, eps=eps, tol=tol)
        check_accumulation(run, check_bottoms)
    if inplace if inplace is not None else run.layer.inplace:
        _check_inplace(snippet, bottoms, run, phase)
    if reshape_batch is not None and reference is not None:
        _check_reshape(run, bottoms, reshape_batch, reference, params, rtol, atol)
    return run


def check_accumulation(run, check_bottoms):
    """Param diffs add up over two backward calls; bottom diffs are overwritten."""
    tops = run.forward()
    weights = [np.ones_like(t) for t in tops]
    run.zero_param_diffs()
    down = [check_bottoms is None or i in check_bottoms for i in range(len(run.bottom))]
    first = run.backward(weights, down)
    once = run.param_diffs()
    second = run.backward(weights, down)
    for k, (a, b) in enumerate(zip(first, second)):
        if down[k]:
            assert_close(b, a, what=f"bottom {k} diff after a second backward")
    for k, (a, b) in enumerate(zip(once, run.param_diffs())):
        assert_close(b, 2 * a, what=f"param {k} diff after a second backward")


def _check_inplace(snippet, bottoms, run, phase):
    other = LayerRun(snippet, bottoms, phase=phase, inplace=True, tops=len(run.top))
    for src, dst in zip(run.layer.blobs, other.layer.blobs):
        dst.data[...] = src.data
    expected_top = run.forward()
    got_top = other.forward()
    assert_close(got_top[0], expected_top[0], what="in-place top")
    diffs = [np.linspace(-1, 1, t.size).reshape(t.shape) for t in expected_top]
    expected = run.backward(diffs)
    got = other.backward(diffs)
    assert_close(got[0], expected[0], what="in-place bottom diff")


def _check_reshape(run, bottoms, batch, reference, params, rtol, atol):
    rng = np.random.default_rng(5)
    resized = [np.resize(b, (batch,) + b.shape[1:]) + 0.01 * rng.standard_normal((batch,) + b.shape[1:])
               if b.ndim else b for b in bottoms]
    run.set_bottoms(resized)
    for k, (got, want) in enumerate(zip(run.forward(), reference(resized, params))):
        assert_close(got, want, rtol, atol, f"{run.layer.type} top {k} after reshape to batch {batch}")
