"""Solvers: update rules against hand-derived references, lr policies, regularization, clipping,
iter_size, snapshots and restore, test nets, the training loop and its log."""

import logging
import math
import os
import signal
import sys

import numpy as np
import pytest
from devices import FakeDevice, FakeGraphs

import espresso
import espresso.net.core
from espresso.errors import EspressoError, LabelError, ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_binary
from espresso.solver import (
    AdamSolver,
    SGDSolver,
    SignalHandler,
    Solver,
    SolverAction,
    get_solver,
    learning_rate,
)
from espresso.solver.lr_policy import learning_rates

# x (N,3), y (N,1) -> p = x W^T + b -> EuclideanLoss = sum (p - y)^2 / (2N)
LINEAR = """
layer {{ name: "in" type: "Input" top: "x" top: "y"
        input_param {{ shape {{ dim: {n} dim: 3 }} shape {{ dim: {n} dim: 1 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "p" {params}
        inner_product_param {{ num_output: 1 weight_filler {{ type: "constant" value: 0.5 }}
                              bias_filler {{ type: "constant" value: -0.25 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }}
"""
X = np.array([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [-2.0, 0.5, 1.0], [1.5, 1.0, 0.0]])
Y = np.array([[1.0], [-0.5], [2.0], [0.25]])
W0, B0 = np.array([[0.5, 0.5, 0.5]]), np.array([-0.25])


def make_solver(solver_text, n=4, params="", dtype=np.float64, cls=Solver, net_text=None):
    param = parse_text(solver_text, caffe_pb2.SolverParameter())
    net_param = parse_text(net_text or LINEAR.format(n=n, params=params), caffe_pb2.NetParameter())
    param.net_param.CopyFrom(net_param)
    solver = cls(param, dtype=dtype)
    if net_text is None:
        solver.net.blobs["x"].data[...] = X[:n]
        solver.net.blobs["y"].data[...] = Y[:n]
    return solver


def weights(solver):
    w, b = solver.net.params["ip"]
    return w.data.copy(), b.data.copy()


def linear_grads(w, b, x=X, y=Y):
    """Analytic gradient of the EuclideanLoss of a linear map, in float64."""
    dp = (x @ w.T + b - y) / len(x)
    return dp.T @ x, dp.sum(axis=0)


# *** update rules, step by step against references written element by element ***
def reference_update(rule, p, g, state, lr, t):
    """One element's update value for `rule`; `state` is that element's history (a dict)."""
    if rule == "SGD":
        state["h"] = lr * g + p["momentum"] * state.get("h", 0.0)
        return state["h"]
    if rule == "Nesterov":
        old = state.get("h", 0.0)
        state["h"] = p["momentum"] * old + lr * g
        return (1 + p["momentum"]) * state["h"] - p["momentum"] * old
    if rule == "AdaGrad":
        state["h"] = state.get("h", 0.0) + g * g
        return lr * g / (math.sqrt(state["h"]) + p["delta"])
    if rule == "RMSProp":
        state["h"] = p["rms_decay"] * state.get("h", 0.0) + (1 - p["rms_decay"]) * g * g
        return lr * g / (math.sqrt(state["h"]) + p["delta"])
    if rule == "AdaDelta":
        m, d = p["momentum"], p["delta"]
        state["h1"] = m * state.get("h1", 0.0) + (1 - m) * g * g
        step = g * math.sqrt((state.get("h2", 0.0) + d) / (state["h1"] + d))
        state["h2"] = m * state.get("h2", 0.0) + (1 - m) * step * step
        return lr * step
    b1, b2 = p["momentum"], p["momentum2"]  # Adam
    state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
    correction = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return lr * correction * state["m"] / (math.sqrt(state["v"]) + p["delta"])


RULES = {
    "SGD": {"momentum": 0.9},
    "Nesterov": {"momentum": 0.8},
    "AdaGrad": {"delta": 1e-3},
    "RMSProp": {"rms_decay": 0.9, "delta": 1e-4},
    "AdaDelta": {"momentum": 0.95, "delta": 1e-6},
    "Adam": {"momentum": 0.9, "momentum2": 0.999, "delta": 1e-8},
}


def _round32(value):
    return float(np.float32(value))  # the solver reads float fields of the proto


@pytest.mark.parametrize("rule", list(RULES))
def test_update_rule_matches_reference_for_three_steps(rule):
    settings = RULES[rule]
    fields = " ".join(f"{k}: {v}" for k, v in settings.items())
    text = f'type: "{rule}" base_lr: 0.05 lr_policy: "fixed" {fields}'
    # lr_mult 1 / 2 (a per-element rate vector), weight_decay 0.1 with decay_mult 1 / 0
    solver = make_solver(text + " weight_decay: 0.1",
                         params="param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }")
    p = {k: _round32(v) for k, v in settings.items()}
    lr, wd = _round32(0.05), _round32(0.1)
    w, b = W0.copy(), B0.copy()
    states = [{} for _ in range(4)]
    for it in range(3):
        gw, gb = linear_grads(w, b)
        grads = [gw[0, 0] + wd * w[0, 0], gw[0, 1] + wd * w[0, 1], gw[0, 2] + wd * w[0, 2], gb[0]]
        rates = [lr, lr, lr, 2 * lr]
        updates = [reference_update(rule, p, g, state, rate, it + 1)
                   for g, state, rate in zip(grads, states, rates, strict=True)]
        w, b = w - np.array([updates[:3]]), b - np.array(updates[3:])
        solver.step(1)
        got_w, got_b = weights(solver)
        np.testing.assert_allclose(got_w, w, rtol=1e-10, atol=1e-14, err_msg=f"{rule} step {it}")
        np.testing.assert_allclose(got_b, b, rtol=1e-10, atol=1e-14)
        # after a step the diff holds the applied update
        np.testing.assert_allclose(solver.net.arena_diff, updates, rtol=1e-10, atol=1e-14)
    assert solver.iter == 3


def test_sgd_momentum_by_hand():
    # 1-D: loss = w^2 / 2, so g = w.  lr 0.1, momentum 0.5:
    # h1 = 0.1 -> w1 = 0.9;  h2 = 0.09 + 0.05 = 0.14 -> w2 = 0.76;  h3 = 0.076 + 0.07 = 0.146 -> w3 = 0.614
    net = """layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 1 dim: 1 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p" inner_product_param { num_output: 1
            bias_term: false weight_filler { type: "constant" value: 1 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }"""
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed" momentum: 0.5', net_text=net)
    solver.net.blobs["x"].data[...] = 1
    solver.net.blobs["y"].data[...] = 0
    for expected in (0.9, 0.76, 0.614):
        solver.step(1)
        assert solver.net.params["ip"][0].data[0, 0] == pytest.approx(expected, rel=1e-7)


def test_adam_first_step_is_about_lr_times_sign_with_caffes_correction():
    solver = make_solver('type: "Adam" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 momentum2: 0.999')
    gw, gb = linear_grads(W0, B0)
    solver.step(1)
    w, b = weights(solver)
    # t = 1: m = 0.1 g, v = 0.001 g^2, correction sqrt(0.001)/0.1 -> update = lr * sign(g) (up to eps)
    np.testing.assert_allclose(w, W0 - 0.01 * np.sign(gw), rtol=1e-6)
    np.testing.assert_allclose(b, B0 - 0.01 * np.sign(gb), rtol=1e-6)


def test_float32_updates_stay_close_to_the_float64_reference():
    solver32 = make_solver('type: "Adam" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9', dtype=np.float32)
    solver64 = make_solver('type: "Adam" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9')
    solver32.step(3)
    solver64.step(3)
    assert solver32.net.arena_data.dtype == np.float32
    np.testing.assert_allclose(solver32.net.arena_data, solver64.net.arena_data, rtol=1e-5)


@pytest.mark.parametrize("text, message", [
    ('type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" momentum: 0.9', "momentum cannot be used with RMSProp"),
    ('type: "RMSProp" rms_decay: 1.0', "rms_decay"),
    ('type: "Adagrad"', "unknown solver type 'Adagrad'"),
    ('lr_policy: "cosine"', "unknown lr_policy 'cosine'"),
    ('lr_policy: "step" gamma: 0.1', "stepsize must be > 0"),
    ('weight_decay: 0.1 regularization_type: "L3"', "unknown regularization_type 'L3'"),
    ("average_loss: 0", "average_loss"),
])
def test_bad_solver_settings_fail_at_construction(text, message):
    base = 'base_lr: 0.1 lr_policy: "fixed" '
    with pytest.raises(EspressoError, match=message):
        make_solver(base + text if "lr_policy" not in text else "base_lr: 0.1 " + text)


# *** learning-rate policies ***
def _param(text):
    return parse_text("base_lr: 0.1 " + text, caffe_pb2.SolverParameter())


@pytest.mark.parametrize("text, expected", [
    ('lr_policy: "fixed"', lambda it: 0.1),
    ('lr_policy: "step" gamma: 0.5 stepsize: 3', lambda it: 0.1 * 0.5 ** (it // 3)),
    ('lr_policy: "exp" gamma: 0.9', lambda it: 0.1 * 0.9 ** it),
    ('lr_policy: "inv" gamma: 0.01 power: 0.75', lambda it: 0.1 * (1 + 0.01 * it) ** -0.75),
    ('lr_policy: "poly" power: 2 max_iter: 10', lambda it: 0.1 * (1 - it / 10) ** 2),
    ('lr_policy: "sigmoid" gamma: 0.5 stepsize: 4', lambda it: 0.1 / (1 + math.exp(-0.5 * (it - 4)))),
])
def test_lr_policy_values(text, expected):
    param = _param(text)
    for it in (0, 1, 2, 3, 4, 7, 9):
        rate, _ = learning_rate(param, it, 0)
        assert rate.dtype == np.float32
        assert float(rate) == pytest.approx(expected(it), rel=2e-6), (text, it)


@pytest.mark.parametrize("text", ['lr_policy: "fixed"', 'lr_policy: "step" gamma: 0.5 stepsize: 300',
                                  'lr_policy: "exp" gamma: 0.999', 'lr_policy: "inv" gamma: 0.0001 power: 0.75',
                                  'lr_policy: "poly" power: 2 max_iter: 5000',
                                  'lr_policy: "sigmoid" gamma: 0.01 stepsize: 900',
                                  'lr_policy: "multistep" gamma: 0.1 stepvalue: 20 stepvalue: 2500'])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_learning_rates_of_a_window_equal_the_one_by_one_rates_bit_for_bit(text, dtype):
    param, step, expected = _param(text), 1, []
    for it in range(1000, 3000):
        rate, step = learning_rate(param, it, step, dtype)
        expected.append((rate, step))
    window = learning_rates(param, 1000, 3000, 1, dtype)
    assert [(r.dtype, float(r), s) for r, s in window] == [(r.dtype, float(r), s) for r, s in expected]


def test_multistep_advances_one_step_per_call_as_caffe():
    param = _param('lr_policy: "multistep" gamma: 0.1 stepvalue: 2 stepvalue: 5')
    step, rates = 0, []
    for it in range(7):
        rate, step = learning_rate(param, it, step)
        rates.append(float(rate))
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    assert step == 2
    # jumping in past both step values still advances a single step per iteration
    assert learning_rate(param, 100, 0)[1] == 1


@pytest.mark.parametrize("text", ['lr_policy: "sigmoid" gamma: -0.5 stepsize: 4',
                                  'lr_policy: "exp" gamma: -0.5', 'lr_policy: "sigmoid" gamma: 0.5'])
def test_lr_policy_rejects_what_caffe_checks(text):
    with pytest.raises(EspressoError, match="lr_policy"):
        learning_rate(_param(text), 3, 0)


def test_solver_logs_multistep_and_uses_current_step(caplog):
    solver = make_solver('base_lr: 0.1 lr_policy: "multistep" gamma: 0.5 stepvalue: 1 display: 1')
    with caplog.at_level(logging.INFO, logger="espresso"):
        solver.step(2)
    assert solver.current_step == 1
    assert "MultiStep Status: Iteration 1, step = 1" in caplog.text
    assert "Iteration 1, lr = 0.05" in caplog.text


# *** regularization, lr_mult, clipping, iter_size ***
@pytest.mark.parametrize("kind", ["L2", "L1"])
def test_weight_decay_with_decay_mult(kind):
    solver = make_solver(f'base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.2 regularization_type: "{kind}"',
                         params="param { decay_mult: 3 } param { decay_mult: 0 }")
    w0 = np.array([[0.5, -1.5, 0.0]])
    solver.net.params["ip"][0].data[...] = w0
    gw, gb = linear_grads(w0, B0)
    solver.step(1)
    decay = _round32(0.2) * 3 * (w0 if kind == "L2" else np.sign(w0))
    w, b = weights(solver)
    np.testing.assert_allclose(w, w0 - _round32(0.1) * (gw + decay), rtol=1e-12)
    np.testing.assert_allclose(b, B0 - _round32(0.1) * gb, rtol=1e-12)  # decay_mult 0: no decay


@pytest.mark.parametrize("kind", ["L2", "L1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_sgd_kernel_equals_the_numpy_steps_bit_for_bit(kind, dtype, monkeypatch):
    """The CPU's fused SGD step (Numba) does the NumPy steps' float operations in their order."""
    from espresso.backend.cpu import kernels
    if kernels.sgd_update is None:
        pytest.skip("Numba is not installed (pip install espresso-nn[fast])")
    text = (f'base_lr: 0.1 lr_policy: "inv" gamma: 0.1 power: 0.75 momentum: 0.9 iter_size: 2 '
            f'weight_decay: 0.2 regularization_type: "{kind}"')
    params = "param { lr_mult: 1 decay_mult: 3 } param { lr_mult: 2 decay_mult: 0 }"
    fused = make_solver(text, params=params, dtype=dtype)
    monkeypatch.setattr(kernels, "sgd_update", None)
    steps = make_solver(text, params=params, dtype=dtype)
    assert fused.updater.fused is not None and steps.updater.fused is None
    for solver in (fused, steps):
        solver.net.params["ip"][0].data[...] = [[0.5, -1.5, 0.0]]  # sign(0) = 0 for L1
        solver.step(5)
    np.testing.assert_array_equal(fused.net.arena_data, steps.net.arena_data)
    np.testing.assert_array_equal(fused.net.arena_diff, steps.net.arena_diff)
    np.testing.assert_array_equal(fused.updater.rule.history[0], steps.updater.rule.history[0])


def test_lr_mult_zero_leaves_the_param_unchanged():
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.5',
                         params="param { lr_mult: 0 } param { lr_mult: 1 }")
    solver.step(3)
    w, b = weights(solver)
    np.testing.assert_array_equal(w, W0)
    assert not np.allclose(b, B0)


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_clip_gradients_scales_by_the_global_norm(clip):
    solver = make_solver(f'base_lr: 1 lr_policy: "fixed" clip_gradients: {clip}')
    gw, gb = linear_grads(W0, B0)
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    scale = _round32(clip) / norm if norm > clip else 1.0
    solver.step(1)
    w, b = weights(solver)
    np.testing.assert_allclose(w, W0 - gw * scale, rtol=1e-10)
    np.testing.assert_allclose(b, B0 - gb * scale, rtol=1e-10)


def test_clip_happens_before_iter_size_normalization():
    # two identical half batches: the summed gradient is 2g, clipped against its own norm 2|g|
    solver = make_solver('base_lr: 1 lr_policy: "fixed" iter_size: 2 clip_gradients: 0.1')
    gw, gb = linear_grads(W0, B0)
    norm = 2 * math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    solver.step(1)
    w, _ = weights(solver)
    np.testing.assert_allclose(w, W0 - 2 * gw * _round32(0.1) / norm / 2, rtol=1e-9)


def _feed_batches(net, batches):
    """Make each forward/backward of `net` read the next (x, y) batch."""
    original, feed = net.forward_backward, iter(batches)

    def forward_backward():
        x, y = next(feed)
        net.blobs["x"].data[...] = x
        net.blobs["y"].data[...] = y
        return original()

    net.forward_backward = forward_backward


def test_iter_size_accumulation_equals_a_double_batch():
    text = 'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01 type: "{}"'
    for rule in ("SGD", "Adam"):
        halves = make_solver(text.format(rule) + " iter_size: 2", n=2)
        _feed_batches(halves.net, [(X[:2], Y[:2]), (X[2:], Y[2:])] * 3)
        whole = make_solver(text.format(rule))
        halves.step(3)
        whole.step(3)
        np.testing.assert_allclose(halves.net.arena_data, whole.net.arena_data, rtol=1e-12)


# *** snapshots and restore ***
@pytest.mark.parametrize("rule", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_then_restore_continues_bit_identically(tmp_path, rule, fmt):
    if fmt == "HDF5":
        pytest.importorskip("h5py")
    momentum = 0 if rule in ("AdaGrad", "RMSProp") else 0.9  # those two refuse momentum, as in Caffe
    text = (f'type: "{rule}" base_lr: 0.05 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 5 '
            f'momentum: {momentum} weight_decay: 0.01 snapshot_format: {fmt} snapshot_prefix: "{tmp_path}/run"')
    params = "param { lr_mult: 1 } param { lr_mult: 2 }"
    straight = make_solver(text, params=params, dtype=np.float32)
    straight.step(6)
    first = make_solver(text, params=params, dtype=np.float32)
    first.step(3)
    model, state = first.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert (model, state) == (f"{tmp_path}/run_iter_3.caffemodel{suffix}", f"{tmp_path}/run_iter_3.solverstate{suffix}")
    resumed = make_solver(text, params=params, dtype=np.float32)
    resumed.restore(state)
    assert (resumed.iter, resumed.current_step) == (3, 1)
    resumed.step(3)
    np.testing.assert_array_equal(resumed.net.arena_data, straight.net.arena_data)
    for a, b in zip(resumed.updater.rule.history, straight.updater.rule.history, strict=True):
        np.testing.assert_array_equal(a, b)


def test_solverstate_has_caffes_layout(tmp_path):
    solver = make_solver(f'type: "AdaDelta" base_lr: 1 lr_policy: "fixed" momentum: 0.9 '
                         f'snapshot_prefix: "{tmp_path}/s"', dtype=np.float32)
    solver.step(2)
    solver.snapshot()
    state = read_binary(f"{tmp_path}/s_iter_2.solverstate", caffe_pb2.SolverState())
    assert state.iter == 2 and state.current_step == 0
    assert state.learned_net == f"{tmp_path}/s_iter_2.caffemodel"
    # AdaDelta: [h1(W), h1(b), h2(W), h2(b)], each shaped as its param, float32 in `data`
    assert [tuple(h.shape.dim) for h in state.history] == [(1, 3), (1,), (1, 3), (1,)]
    h1 = solver.updater.rule.history[0]
    np.testing.assert_array_equal(np.array(state.history[0].data, np.float32), h1[:3])
    np.testing.assert_array_equal(np.array(state.history[1].data, np.float32), h1[3:])
    # the weights file loads into a fresh net by layer name
    net = espresso.Net(parse_text(LINEAR.format(n=4, params=""), caffe_pb2.NetParameter()), espresso.TEST,
                       weights=f"{tmp_path}/s_iter_2.caffemodel")
    np.testing.assert_array_equal(net.params["ip"][0].data, solver.net.params["ip"][0].data)


def test_restore_finds_learned_net_beside_the_state_and_checks_history(tmp_path, monkeypatch):
    (tmp_path / "snaps").mkdir()
    monkeypatch.chdir(tmp_path)
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 snapshot_prefix: "snaps/m"')
    solver.step(2)
    solver.snapshot()
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # learned_net "snaps/m_iter_2.caffemodel" is relative to the old cwd
    resumed = make_solver('base_lr: 0.1 lr_policy: "fixed" momentum: 0.9')
    resumed.restore(tmp_path / "snaps" / "m_iter_2.solverstate")
    np.testing.assert_array_equal(resumed.net.arena_data, solver.net.arena_data)
    adam = make_solver('type: "Adam" base_lr: 0.1 lr_policy: "fixed"')
    with pytest.raises(ModelFileError, match="2 history blobs, but a Adam solver on this net keeps 4"):
        adam.restore(tmp_path / "snaps" / "m_iter_2.solverstate")


def test_snapshot_diff_and_legacy_history_shapes(tmp_path):
    solver = make_solver(f'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 snapshot_diff: true '
                         f'snapshot_prefix: "{tmp_path}/d"')
    solver.step(1)
    model, _ = solver.snapshot()
    saved = read_binary(model, caffe_pb2.NetParameter())
    ip = next(layer for layer in saved.layer if layer.name == "ip")
    np.testing.assert_array_equal(np.array(ip.blobs[0].double_diff), solver.net.params["ip"][0].diff.ravel())
    # an old Caffe state: history blobs with num/channels/height/width, no learned_net
    state = caffe_pb2.SolverState(iter=7, current_step=0)
    for values in ([1.0, 2.0, 3.0], [4.0]):
        state.history.add(num=1, channels=1, height=1, width=len(values), double_data=values)
    (tmp_path / "old.solverstate").write_bytes(state.SerializeToString())
    solver.restore(tmp_path / "old.solverstate")
    assert solver.iter == 7
    np.testing.assert_array_equal(solver.updater.rule.history[0], [1, 2, 3, 4])
    state.history[1].width, state.history[1].double_data[:] = 2, [4.0, 5.0]
    (tmp_path / "bad.solverstate").write_bytes(state.SerializeToString())
    with pytest.raises(ModelFileError, match=r"history 1 has shape \(1, 1, 1, 2\)"):
        solver.restore(tmp_path / "bad.solverstate")


def test_hdf5_solverstate_has_caffes_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    solver = make_solver(f'type: "AdaDelta" base_lr: 1 lr_policy: "fixed" momentum: 0.9 snapshot_diff: true '
                         f'snapshot_format: HDF5 snapshot_prefix: "{tmp_path}/s"', dtype=np.float32)
    solver.step(2)
    model, state = solver.snapshot()
    with h5py.File(state, "r") as f:
        # Caffe's datasets, and Espresso's data cursors and generators, which Caffe does not read
        assert set(f) == {"iter", "learned_net", "current_step", "history", "espresso_resume"}
        for name, value in (("iter", 2), ("current_step", 0)):  # H5LTmake_dataset_int: 1-D, one int
            assert (f[name].shape, f[name].dtype, f[name][0]) == ((1,), np.int32, value)
        kind = f["learned_net"].id.get_type()  # H5LTmake_dataset_string: scalar, null-terminated
        assert f["learned_net"].shape == () and kind.get_strpad() == h5py.h5t.STR_NULLTERM
        assert f["learned_net"][()] == model.encode() and kind.get_size() == len(model) + 1
        # AdaDelta: [h1(W), h1(b), h2(W), h2(b)], each shaped as its param, in the net's float type
        history = f["history"]
        assert [(k, history[k].shape, history[k].dtype) for k in sorted(history)] == [
            ("0", (1, 3), np.float32), ("1", (1,), np.float32), ("2", (1, 3), np.float32), ("3", (1,), np.float32)]
        np.testing.assert_array_equal(history["1"][()], solver.updater.rule.history[0][3:])
    with h5py.File(model, "r") as f:
        assert set(f) == {"data", "diff"} and f["data/ip/0"].shape == (1, 3)  # snapshot_diff: the diff too
    with h5py.File(state, "r+") as f:
        del f["learned_net"]  # optional, as in Caffe: then the weights stay as they are
    fresh = make_solver('type: "AdaDelta" base_lr: 1 lr_policy: "fixed" momentum: 0.9', dtype=np.float32)
    fresh.restore(state)
    assert fresh.iter == 2 and np.array_equal(fresh.updater.rule.history, solver.updater.rule.history)
    with h5py.File(state, "r+") as f:
        f["history/4"] = np.zeros(1, np.float32)
    with pytest.raises(ModelFileError, match="5 history blobs, but a AdaDelta solver on this net keeps 4"):
        fresh.restore(state)
    with h5py.File(state, "r+") as f:
        del f["history/4"]
        data = f["history/0"][()]
        del f["history/0"]
        f["history/0"] = data.reshape(3, 1)  # a proto would pass (the count matches); HDF5 wants the shape
    with pytest.raises(ModelFileError, match=r"history 0 has shape \(3, 1\), the net's param has \(1, 3\)"):
        fresh.restore(state)


def test_hdf5_snapshots_need_h5py_and_say_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now fails
    with pytest.raises(EspressoError, match=r"pip install 'espresso-nn\[hdf5\]'"):
        make_solver(f'base_lr: 0.1 lr_policy: "fixed" snapshot: 5 snapshot_format: HDF5 '
                    f'snapshot_prefix: "{tmp_path}/x"')


def test_hdf5_snapshots_refuse_a_layer_name_with_a_slash_at_construction(tmp_path):
    pytest.importorskip("h5py")
    with pytest.raises(ModelFileError, match=r"layer name 'ip/a' cannot key HDF5 weights"):
        make_solver(f'base_lr: 0.1 lr_policy: "fixed" snapshot: 5 snapshot_format: HDF5 '
                    f'snapshot_prefix: "{tmp_path}/x"', net_text=LINEAR.format(n=4, params="").replace(
                        'name: "ip"', 'name: "ip/a"'))


def test_unwritable_snapshot_prefix_fails_at_construction(tmp_path):
    with pytest.raises(EspressoError, match="cannot write to snapshot prefix"):
        make_solver(f'base_lr: 0.1 lr_policy: "fixed" snapshot: 5 snapshot_prefix: "{tmp_path}/missing/x"')


# *** test nets ***
TWO_PHASE = LINEAR.format(n=2, params="") + """
layer { name: "extra" type: "Power" bottom: "p" top: "p2" include { phase: TEST stage: "deep" } }
"""


def test_test_nets_from_net_share_weights_and_honor_states():
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed" test_iter: 3 test_iter: 1 test_interval: 10 '
                         'test_state { stage: "deep" } test_state { }', net_text=TWO_PHASE)
    assert solver.net.phase == espresso.TRAIN and len(solver.test_nets) == 2
    deep, plain = solver.test_nets
    assert "extra" in deep.layer_dict and "extra" not in plain.layer_dict
    assert all(net.phase == espresso.TEST for net in solver.test_nets)
    assert np.shares_memory(deep.params["ip"][0].data, solver.net.arena_data)


def test_test_averages_each_output_over_test_iter(caplog):
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed" test_iter: 2 test_interval: 10 '
                         'test_compute_loss: true', net_text=TWO_PHASE)
    net = solver.test_nets[0]
    batches = [(X[:2], Y[:2]), (X[2:], Y[2:])]
    original, feed = net.run_forward, iter(batches)

    def run_forward(sums):
        net.blobs["x"].data[...], net.blobs["y"].data[...] = next(feed)
        return original(sums=sums)

    net.run_forward = run_forward
    with caplog.at_level(logging.INFO, logger="espresso"):
        means = solver.test(0)
    losses = [((x @ W0.T + B0 - y) ** 2).sum() / 4 for x, y in batches]
    assert list(means) == ["loss"]
    assert means["loss"][0] == pytest.approx(np.mean(losses), rel=1e-12)
    mean = f"{np.mean(losses):g}"
    assert f"Test loss: {mean}" in caplog.messages
    assert f"    Test net output #0: loss = {mean} (* 1 = {mean} loss)" in caplog.messages


@pytest.mark.parametrize("text, message", [
    ('test_iter: 1', "test_interval > 0"),
    ('test_iter: 1 test_interval: 5 test_state { } test_state { }', "test_state must be unspecified"),
])
def test_test_net_configuration_errors(text, message):
    with pytest.raises(EspressoError, match=message):
        make_solver('base_lr: 0.1 lr_policy: "fixed" ' + text)


def test_train_net_must_be_given_exactly_once():
    with pytest.raises(EspressoError, match="exactly one of net, net_param"):
        Solver(parse_text('base_lr: 0.1 lr_policy: "fixed"', caffe_pb2.SolverParameter()))


# *** the loop ***
def test_display_log_lines_and_smoothed_loss(caplog):
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed" display: 2 average_loss: 2')
    losses = []
    solver.add_callback(lambda: None, lambda: losses.append(float(solver.net.blobs["loss"].data)))
    with caplog.at_level(logging.INFO, logger="espresso"):
        solver.step(4)
    assert solver.smoothed_loss == pytest.approx(np.mean(losses[2:]), rel=1e-12)
    lines = caplog.messages
    assert any(line.startswith("Iteration 0 (") and line.endswith(f"loss = {losses[0]:g}") for line in lines)
    assert f"    Train net output #0: loss = {losses[0]:g} (* 1 = {losses[0]:g} loss)" in lines
    assert "Iteration 2, lr = 0.1" in lines and "Iteration 1, lr = 0.1" not in lines


@pytest.mark.parametrize("initialization, tested_at", [(True, [0, 2, 4]), (False, [2, 4])])
def test_test_interval_and_test_initialization(initialization, tested_at, caplog):
    solver = make_solver(f'base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_interval: 2 '
                         f'test_initialization: {str(initialization).lower()}')
    with caplog.at_level(logging.INFO, logger="espresso"):
        solver.step(5)
    assert [m for m in caplog.messages if "Testing net" in m] == [
        f"Iteration {it}, Testing net (#0)" for it in tested_at]


def test_nan_loss_stops_with_the_iteration_and_keeps_the_weights():
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed"')
    solver.step(2)
    before = solver.net.arena_data.copy()
    solver.net.blobs["y"].data[0] = np.nan
    with pytest.raises(EspressoError, match="iteration 2: the loss is nan"):
        solver.step(1)
    np.testing.assert_array_equal(solver.net.arena_data, before)


MLP = """
layer { name: "in" type: "Input" top: "x" top: "label" input_param { shape { dim: 64 dim: 1 dim: 4 dim: 4 }
        shape { dim: 64 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 12 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "score"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy" include { phase: TEST } }
"""


def test_training_on_a_separable_problem_lowers_the_loss(tmp_path, caplog):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 64)
    x = rng.normal(0, 1, (64, 1, 4, 4)) + np.where(label == 1, 1.0, -1.0)[:, None, None, None] * 0.8
    solver = make_solver(f'base_lr: 0.05 lr_policy: "inv" gamma: 0.0001 power: 0.75 momentum: 0.9 '
                         f'weight_decay: 0.0005 max_iter: 40 display: 20 test_iter: 1 test_interval: 20 '
                         f'random_seed: 3 snapshot: 20 snapshot_prefix: "{tmp_path}/mlp"', net_text=MLP,
                         dtype=np.float32)
    for net in [solver.net, *solver.test_nets]:
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = label
    first = float(solver.net.run_forward())
    with caplog.at_level(logging.INFO, logger="espresso"):
        solver.solve()
    last = float(solver.net.run_forward())
    assert last < 0.3 * first
    assert solver.test_scores[0]["accuracy"][0] >= 0.95
    assert sorted(os.listdir(tmp_path)) == ["mlp_iter_20.caffemodel", "mlp_iter_20.solverstate",
                                            "mlp_iter_40.caffemodel", "mlp_iter_40.solverstate"]
    assert "Iteration 40, Testing net (#0)" in caplog.text and "Optimization Done." in caplog.text


def test_signals_snapshot_then_stop(tmp_path):
    solver = make_solver(f'base_lr: 0.1 lr_policy: "fixed" max_iter: 100 snapshot_prefix: "{tmp_path}/sig"')
    raise_at = {2: signal.SIGHUP, 4: signal.SIGINT}

    def send_signal():
        if solver.iter in raise_at:
            os.kill(os.getpid(), raise_at[solver.iter])

    solver.add_callback(lambda: None, send_signal)
    previous = signal.getsignal(signal.SIGINT)
    with SignalHandler() as handler:
        solver.set_action_function(handler.check)
        solver.solve()
    assert signal.getsignal(signal.SIGINT) is previous
    assert solver.iter == 5 and solver.requested_early_exit
    # SIGHUP: snapshot at iteration 3 and go on; SIGINT: stop after iteration 5, snapshot_after_train
    assert sorted(os.listdir(tmp_path)) == ["sig_iter_3.caffemodel", "sig_iter_3.solverstate",
                                            "sig_iter_5.caffemodel", "sig_iter_5.solverstate"]


def test_action_function_stop_and_bad_effects():
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed"')
    solver.set_action_function(lambda: SolverAction.STOP)
    solver.step(10)
    assert solver.iter == 1
    solver.set_action_function(None)
    solver.step(3)  # Caffe's Step: the stop asked in an earlier step() does not end this one
    assert solver.iter == 4
    with pytest.raises(EspressoError, match="sigint_effect"):
        SignalHandler(sigint_effect="explode")


# *** files, legacy types, pycaffe classes ***
def test_get_solver_from_file_with_legacy_type_and_default_prefix(tmp_path, monkeypatch):
    (tmp_path / "net.prototxt").write_text(LINEAR.format(n=4, params=""))
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                                              "solver_type: ADAM\n")
    monkeypatch.chdir(tmp_path.parent)  # the net path resolves beside the solver file
    solver = get_solver(str(tmp_path / "solver.prototxt"))
    assert isinstance(solver, AdamSolver) and solver.type == "Adam"
    assert solver.param.snapshot_prefix == str(tmp_path / "solver")
    assert SGDSolver(str(tmp_path / "solver.prototxt")).type == "SGD"
    (tmp_path / "both.prototxt").write_text('net: "net.prototxt"\ntype: "SGD"\nsolver_type: ADAM\n')
    with pytest.raises(EspressoError, match="solver_type"):
        get_solver(str(tmp_path / "both.prototxt"))


def test_random_seed_makes_fillers_repeatable():
    text = 'base_lr: 0.1 lr_policy: "fixed" random_seed: 7'
    a, b = (make_solver(text, net_text=MLP) for _ in range(2))
    np.testing.assert_array_equal(a.net.arena_data, b.net.arena_data)


def test_a_nan_loss_queued_on_the_device_is_caught_before_the_next_snapshot(tmp_path, monkeypatch):
    """On a device that queues iterations as graphs (here a fake one on the CPU), losses are read
    back in batches; a snapshot reads them first, so a NaN at iteration 3 stops training before
    _iter_4 is written with the weights it spoiled, and _iter_2 stays the last snapshot."""
    fake = FakeGraphs()
    monkeypatch.setattr(espresso.net.core, "current_backend", lambda: fake)
    solver = make_solver(f'base_lr: 0.01 lr_policy: "fixed" snapshot: 2 snapshot_prefix: "{tmp_path}/s"')
    solver.step(3)
    assert solver._loop is not None and fake.captures == 1 and fake.launches == 2  # graphed
    solver.net.blobs["x"].data[0, 0] = np.nan
    with pytest.raises(EspressoError, match="iteration 3: the loss is nan"):
        solver.step(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_iter_2.caffemodel", "s_iter_2.solverstate"]


def test_a_label_that_is_no_class_stops_graphed_training_when_the_losses_are_read(monkeypatch):
    """On a device that queues iterations as graphs (a fake one on the CPU), the label check
    is a flag on the device, read with the losses: no host sync per iteration."""
    class FakeGraphDevice(FakeGraphs, FakeDevice):
        pass

    fake = FakeGraphDevice()
    monkeypatch.setattr(espresso.net.core, "current_backend", lambda: fake)
    text = """layer { name: "in" type: "Input" top: "x" top: "y"
                      input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
              layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p" inner_product_param { num_output: 3 } }
              layer { name: "loss" type: "SoftmaxWithLoss" bottom: "p" bottom: "y" top: "loss" }"""
    solver = make_solver('base_lr: 0.01 lr_policy: "fixed" display: 0', net_text=text)
    solver.net.blobs["y"].data[...] = [0, 1, 2, 1]
    solver.step(3)
    assert fake.captures == 1 and fake.launches == 2
    solver.net.blobs["y"].data[...] = [0, 1, 3, 1]
    with pytest.raises(LabelError, match=r"layer 'loss' \(SoftmaxWithLoss\): label 3 at batch item 2 is not a class"):
        solver.step(3)
    assert fake.launches == 5  # the three iterations ran; the check came with the losses


TWO_LAYERS = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" %s
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "p" %s
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "p" bottom: "y" top: "loss" }
"""


def _record_iteration(loss, weight, rates, ring, slot, rate):
    """The CUDA kernel's contract in NumPy: ring[slot] = loss * weight, rate = rates[slot], slot += 1."""
    s = int(slot)
    ring[s] = loss.ravel()[0] * weight.ravel()[0]
    rate[...] = rates[s]
    slot[...] = s + 1


def test_graphed_update_starts_before_the_first_param_layers_backward_with_the_same_weights(monkeypatch):
    """A graphed iteration updates every param but the first layer's beside that layer's backward,
    then the first layer's: the weights equal those of one whole update, bit for bit."""
    from espresso.backend.cpu import kernels
    from espresso.solver import graphed
    if kernels.sgd_update is None:
        pytest.skip("Numba is not installed (pip install espresso-nn[fast])")
    monkeypatch.setattr(kernels, "record_iteration", _record_iteration)
    fake = FakeGraphs()
    monkeypatch.setattr(espresso.net.core, "current_backend", lambda: fake)
    text = 'base_lr: 0.1 lr_policy: "inv" gamma: 0.1 power: 0.75 momentum: 0.9 weight_decay: 0.01'
    split = make_solver(text, net_text=TWO_LAYERS % ("", "param { lr_mult: 2 } param { decay_mult: 0 }"))
    assert graphed.early_update(split) == (1, 2)  # ip1 (layer 1) owns the first two params
    calls = []
    monkeypatch.setattr(split.updater, "apply_params", lambda *a: calls.append(a[1:]) or
                        type(split.updater).apply_params(split.updater, *a))
    monkeypatch.setattr(graphed, "early_update", lambda solver: None if solver is not split else (1, 2))
    whole = make_solver(text, net_text=TWO_LAYERS % ("", "param { lr_mult: 2 } param { decay_mult: 0 }"))
    for solver in (split, whole):
        solver.net.arena_data[...] = np.linspace(-1, 1, solver.net.arena_data.size)
        solver.net.blobs["x"].data[...] = X
        solver.net.blobs["y"].data[...] = [0, 2, 1, 2]
        solver.step(4)
    assert fake.captures == 2 and calls[:2] == [(2, 4), (0, 2)]
    np.testing.assert_array_equal(split.net.arena_data, whole.net.arena_data)
    np.testing.assert_array_equal(split.updater.rule.history[0], whole.updater.rule.history[0])


def test_no_early_update_where_the_first_param_layer_shares_a_param():
    from espresso.solver import graphed
    solver = make_solver('base_lr: 0.1 lr_policy: "fixed"',
                         net_text=TWO_LAYERS.replace("num_output: 3", "num_output: 5") % (
                             'param { } param { name: "b" }', 'param { } param { name: "b" }'))  # the biases
    assert graphed.early_update(solver) is None
    first_layers = (TWO_LAYERS % ("", "")).split('layer { name: "relu"')[0]
    lone = make_solver('base_lr: 0.1 lr_policy: "fixed"', net_text=first_layers
                       + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "h" bottom: "y" top: "loss" }')
    assert graphed.early_update(lone) is None  # one param layer: nothing to start early
