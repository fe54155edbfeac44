"""Fixed-point training (Gupta et al. 2015): the rounding rules, what a solver keeps in fixed
point, dynamic fixed point, and `espresso train --fixed-point` end to end."""

import json

import numpy as np
import pytest
from example_nets import example_files

import espresso
from espresso import cli
from espresso.compress.fixed_point import FixedPoint, activations, on_grid, parse_format
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

NET = """
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 6 } shape { dim: 8 } } }
layer { name: "label_copy" type: "Split" bottom: "label" top: "l1" top: "l2" }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "l1" top: "acc" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "l2" top: "loss" }
"""


def _solver(lr=0.1):
    p = caffe_pb2.SolverParameter(base_lr=lr, momentum=0.9, lr_policy="fixed", max_iter=100, display=0,
                                  snapshot_after_train=False, random_seed=3)
    p.net_param.CopyFrom(parse_text(NET, caffe_pb2.NetParameter()))
    return espresso.SGDSolver(p)


def _feed(net, rng):
    net.blobs["data"].data[...] = rng.standard_normal((8, 6))
    net.blobs["label"].data[...] = rng.integers(0, 3, 8)


def test_rounding_is_nearest_half_up_or_stochastic_and_unbiased_and_saturates(rng):
    net = _solver().net
    x = np.array([0.1, 0.125, 0.3, -0.3, -0.1875, 5.0, -5.0], np.float32)
    nearest = x.copy()
    FixedPoint(net, 2, 3, "nearest").round(nearest, "x")  # eps = 1/8, range [-2, 2 - 1/8]
    np.testing.assert_array_equal(nearest, [0.125, 0.125, 0.25, -0.25, -0.125, 1.875, -2.0])
    halves = np.array([0.49999997, -0.50000006, 0.5, -0.5, 1.5], np.float32)  # in steps of 1 (FL 0)
    FixedPoint(net, 4, 0, "nearest").round(halves, "h")
    np.testing.assert_array_equal(halves, [0, -1, 1, 0, 2])  # half up, and no double rounding
    values = rng.uniform(-1.5, 1.5, 64).astype(np.float32)
    draws = np.repeat(values[None], 4000, 0)
    FixedPoint(net, 2, 3, "stochastic").round(draws, "x")
    assert on_grid(draws, 3, 5)
    assert set(np.unique(draws[:, 0])) <= {np.floor(values[0] * 8) / 8, np.ceil(values[0] * 8) / 8}
    np.testing.assert_allclose(draws.mean(0), values, atol=0.02)  # exact in expectation (std of a mean: 0.001)


def test_a_solver_trains_in_fixed_point_and_labels_stay_as_read(rng):
    solver = _solver()
    rounded = dict(zip(solver.net.layer_dict, activations(solver.net)))
    assert rounded == {"data": False, "label_copy": False, "ip1": True, "relu": True, "ip2": True,
                       "ip2_ip2_0_split": True, "acc": False, "loss": False}
    fixed = FixedPoint(solver.net, 3, 6, "stochastic").attach(solver)
    net = solver.net
    seen = {}
    net.after_backward(lambda i: seen.update({i: [np.array(b.diff) for b in net.bottom_vecs[i]]}))
    before = [np.array(b.data) for b in net.learnable_params]
    _feed(net, rng)
    solver.step(1)
    assert all(on_grid(b.data, 6, 9) for b in net.learnable_params)
    assert not all(np.array_equal(a, b.data) for a, b in zip(before, net.learnable_params))
    for name in ("ip1", "ip2"):
        assert on_grid(net.blobs[name].data, 6, 9)
    assert on_grid(seen[list(net.layer_dict).index("ip2")][0], 6, 9)  # the error reaching ip1
    assert not on_grid(net.blobs["data"].data, 6, 9)  # the input is not an activation
    np.testing.assert_array_equal(net.blobs["l1"].data, net.blobs["label"].data)
    assert len(fixed.formats()) > 0


def test_nearest_rounding_loses_small_updates_and_stochastic_keeps_them(rng):
    moved = {}
    for rounding in ("nearest", "stochastic"):
        solver = _solver(lr=1e-3)
        FixedPoint(solver.net, 4, 4, rounding).attach(solver)
        start = np.array(solver.net.params["ip1"][0].data)
        for _ in range(20):
            _feed(solver.net, rng)
            solver.step(1)
        moved[rounding] = np.abs(solver.net.params["ip1"][0].data - start).sum()
    assert moved["nearest"] == 0 and moved["stochastic"] > 0


def test_dynamic_fixed_point_widens_a_range_that_overflows_and_narrows_an_idle_one():
    net = _solver().net
    fixed = FixedPoint(net, 2, 8, "nearest", dynamic=True, interval=1)
    big, small = np.full(100, 3.0, np.float32), np.full(100, 0.01, np.float32)
    for _ in range(3):
        fixed.round(big.copy(), "big")
        fixed.round(small.copy(), "small")
    assert fixed.formats() == {"big": 7, "small": 11}  # 3.0 needs IL 3 (word 10); 0.01 fits ever finer
    fixed.round(np.full(10, 100.0, np.float32), "wide")  # first values: the range fits them at once
    fixed.round(np.full(10, 0.5, np.float32), "jump")
    jump = np.full(10, 100.0, np.float32)
    fixed.round(jump, "jump")  # an overflow: the range widens at once, as far as the peak needs
    assert fixed.formats()["wide"] == fixed.formats()["jump"] == 2 and np.all(jump == 100)  # 100 < 2**(9 - 2)
    for _ in range(300):  # an all-zero tensor (a gradient that is always zero) says nothing of its range
        fixed.round(np.zeros(10, np.float32), "zeros")
    assert fixed.formats()["zeros"] == 8


def test_bad_formats_are_refused():
    assert parse_format("2,14") == (2, 14)
    for text in ("2", "a,b", "0,8", "2,-1", "16,16"):
        with pytest.raises(EspressoError, match="fixed point|--fixed-point"):
            parse_format(text)
    with pytest.raises(EspressoError, match="--rounding"):
        FixedPoint(_solver().net, 2, 8, "up")


def test_espresso_train_fixed_point_on_lenet(tmp_path):
    example_files(tmp_path, "lenet", "lenet", max_iter=30)
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--fixed-point", "4,12",
                     "--rounding", "stochastic"]) == 0
    weights = str(tmp_path / "lenet_iter_30.caffemodel")
    trained = espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST, weights=weights)
    assert all(on_grid(blob.data, 12, 16) for blobs in trained.params.values() for blob in blobs)
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--fixed-point", "1,40"]) == 1
    # as a compression stage: fine-tuned in <3,5>, written as 8-bit integers
    report = tmp_path / "fp.json"
    assert cli.main(["compress", "--model", str(tmp_path / "net.prototxt"), "--weights", weights, "--solver",
                     str(tmp_path / "solver.prototxt"), "--fixed-point", "3,5", "--rounding", "nearest",
                     "--retrain-iters", "5", "--output", str(tmp_path / "fp.espz"), "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert 3.9 < result["ratio"] < 4 and set(result["accuracy"]) == {"original", "rounded", "trained"}
    loaded = espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST, weights=str(tmp_path / "fp.espz"))
    assert all(on_grid(blob.data, 5, 8) for blobs in loaded.params.values() for blob in blobs)


def test_parameters_the_solver_does_not_train_keep_their_values():
    """lr_mult 0 parameters, such as BatchNorm's running statistics, are not rounded."""
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=10, display=0, snapshot_after_train=False)
    p.net_param.CopyFrom(parse_text(NET.replace('layer { name: "relu"', 'layer { name: "bn" type: "BatchNorm" '
                                                'bottom: "ip1" top: "ip1" } layer { name: "relu"'),
                                    caffe_pb2.NetParameter()))
    solver = espresso.SGDSolver(p)
    fixed = FixedPoint(solver.net, 2, 3, "nearest").attach(solver)
    solver.net.blobs["data"].data[...] = np.random.default_rng(1).standard_normal((8, 6)) * 5
    solver.net.blobs["label"].data[...] = np.arange(8) % 3
    solver.step(1)
    statistics = [blob for blob in solver.net.params["bn"]]
    assert [k for k, _ in fixed.trained()] == [0, 1, 5, 6]  # ip1's, ip2's; not bn's three
    assert not on_grid(statistics[0].data, 3, 5) and statistics[2].data[0] == 1  # the mean, its scale factor


def test_a_snapshot_keeps_the_dynamic_formats_and_the_resumed_run_is_the_straight_one(tmp_path):
    _, solver_path = example_files(tmp_path, "lenet", "lenet", max_iter=12)
    text = (tmp_path / "solver.prototxt").read_text()
    (tmp_path / "solver.prototxt").write_text(text.replace("snapshot: 5000", "snapshot: 6") + "random_seed: 5\n")
    runs = []
    for resume in (None, str(tmp_path / "lenet_iter_6.solverstate")):
        solver = espresso.get_solver(solver_path)
        fixed = FixedPoint(solver.net, 4, 12, "nearest", dynamic=True, interval=2).attach(solver)
        solver.solve(resume)
        runs.append((fixed.formats(), np.array(solver.net.arena_data)))
    (straight, weights), (resumed, again) = runs
    assert straight == resumed and len(set(straight.values())) > 1  # the formats moved, and came back
    np.testing.assert_array_equal(again, weights)
