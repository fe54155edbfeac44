"""espresso.testing's checkers catch wrong layers: each test breaks one rule of a correct layer
and expects the checker to fail naming it, beside a control run of the correct layer."""

import numpy as np
import pytest

from espresso.testing import LayerRun, check_accumulation, check_gradient

IP = 'type: "InnerProduct" inner_product_param { num_output: 3 weight_filler { type: "gaussian" } ' \
     'bias_filler { type: "gaussian" } }'


def _run(snippet, shape):
    return LayerRun(snippet, [np.random.default_rng(4).standard_normal(shape)])


def _patch_backward(monkeypatch, run, after):
    """Make the layer's backward run `after(top, bottom, layer)` once its own work is done."""
    right = run.layer.backward

    def backward(top, propagate_down, bottom):
        right(top, propagate_down, bottom)
        after(top, bottom, run.layer)

    monkeypatch.setattr(run.layer, "backward", backward)


@pytest.mark.parametrize("shape", [(2, 3), (4, 5, 6)])  # element by element; along random directions
def test_a_wrong_bottom_gradient_fails_the_check(monkeypatch, shape):
    check_gradient(_run('type: "TanH"', shape))  # the control
    run = _run('type: "TanH"', shape)
    _patch_backward(monkeypatch, run, lambda top, bottom, layer: bottom[0].diff.__imul__(1.1))
    with pytest.raises(AssertionError, match="TanH bottom 0: analytic"):
        check_gradient(run)


def test_a_wrong_param_gradient_fails_the_check(monkeypatch):
    check_gradient(_run(IP, (2, 4)))
    run = _run(IP, (2, 4))

    def swap_signs(top, bottom, layer):
        layer.blobs[1].diff[0] *= -1  # one bias element's gradient of the wrong sign

    _patch_backward(monkeypatch, run, swap_signs)
    with pytest.raises(AssertionError, match="InnerProduct param 1: analytic"):
        check_gradient(run)


def test_overwritten_param_diffs_fail_the_accumulation_check(monkeypatch):
    check_accumulation(_run(IP, (2, 4)), None)
    run = _run(IP, (2, 4))
    right = run.layer.backward

    def overwriting(top, propagate_down, bottom):  # Caffe's params accumulate; this one starts over
        run.zero_param_diffs()
        right(top, propagate_down, bottom)

    monkeypatch.setattr(run.layer, "backward", overwriting)
    with pytest.raises(AssertionError, match="param 0 diff after a second backward"):
        check_accumulation(run, None)


def test_accumulated_bottom_diffs_fail_the_overwrite_check(monkeypatch):
    run = _run('type: "TanH"', (2, 3))
    previous = {}

    def accumulate(top, bottom, layer):  # Caffe overwrites bottom diffs; this one adds to them
        bottom[0].diff[...] += previous.get("diff", 0)
        previous["diff"] = bottom[0].diff.copy()

    _patch_backward(monkeypatch, run, accumulate)
    with pytest.raises(AssertionError, match="bottom 0 diff after a second backward"):
        check_accumulation(run, None)
