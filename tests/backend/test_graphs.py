"""The GPU's own cuBLAS GEMM and CUDA graphs: graph replays give exactly the eager results.

Needs a CUDA GPU (skipped with the reason otherwise).  Eager and graphed runs launch the same
kernels in the same order, so they are compared bit for bit.
"""

import contextlib

import numpy as np
import pytest
from devices import needs_gpu

import espresso as caffe
from espresso import graphs
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

pytestmark = needs_gpu

LENET = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 1 dim: 28 dim: 28 } shape { dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" param { lr_mult: 1 } param { lr_mult: 2 }
        inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: DROP } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { lr_mult: 1 } param { lr_mult: 2 }
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
SOLVER = ('base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 power: 0.75 '
          'display: 0 max_iter: 100 random_seed: 7 type: "{}"')


@pytest.fixture
def gpu(monkeypatch):
    """The GPU backend in deterministic mode (bit-for-bit comparisons need it)."""
    from espresso import backend

    caffe.set_mode_gpu()
    gpu = backend.get("cuda:0")
    monkeypatch.setattr(gpu, "deterministic", True)
    yield gpu
    caffe.set_cuda_graphs(True)
    caffe.set_mode_cpu()


def _solver(drop=0.0, rule="SGD"):
    param = parse_text(SOLVER.format(rule), caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(parse_text(LENET.replace("DROP", str(drop)), caffe_pb2.NetParameter()))
    solver = caffe.get_solver(param)
    rng = np.random.default_rng(3)
    solver.net.blobs["data"].data[...] = rng.random((8, 1, 28, 28))
    solver.net.blobs["label"].data[...] = rng.integers(0, 10, 8)
    return solver


def _weights(solver):
    return solver.net.backend.to_host(solver.net.arena_data)


# *** GEMM through the backend's own cuBLAS handle ***
@pytest.mark.parametrize("case", ["nn", "tn", "nt", "tt", "batched", "broadcast_a", "groups", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_matches_numpy(gpu, case, dtype):
    rng, xp = np.random.default_rng(0), gpu.xp
    shapes = {"nn": ((5, 7), (7, 3)), "tn": ((7, 5), (7, 3)), "nt": ((5, 7), (3, 7)), "tt": ((7, 5), (3, 7)),
              "batched": ((4, 5, 7), (4, 7, 3)), "broadcast_a": ((5, 7), (4, 7, 3)),
              "groups": ((2, 5, 7), (6, 2, 7, 3)), "strided": ((5, 14), (7, 3))}[case]
    a, b = (rng.standard_normal(s).astype(dtype) for s in shapes)
    a = a.T if case[0] == "t" else a[:, ::2] if case == "strided" else a
    b = b.T if case in ("nt", "tt") else b
    da, db = xp.asarray(np.ascontiguousarray(a.T)).T if case[0] == "t" else xp.asarray(a), \
        (xp.asarray(np.ascontiguousarray(b.T)).T if case in ("nt", "tt") else xp.asarray(b))
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
    out = xp.empty(expected.shape, dtype)
    gpu.k.matmul(da, db, out)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(xp.asnumpy(out), expected, rtol=tol, atol=tol)


def test_tf32_switch_changes_float32_gemm_only_slightly(gpu):
    xp, rng = gpu.xp, np.random.default_rng(1)
    a, b = (xp.asarray(rng.standard_normal((256, 256)).astype(np.float32)) for _ in range(2))
    exact, fast = xp.empty((256, 256), np.float32), xp.empty((256, 256), np.float32)
    gpu.k.matmul(a, b, exact)
    gpu.set_tf32(True)
    try:
        gpu.k.matmul(a, b, fast)
    finally:
        gpu.set_tf32(False)
    diff = float(abs(fast - exact).max())
    assert 0 < diff < 0.1  # TF32 rounds the inputs to 10 mantissa bits: different, but close


# *** graphs ***
def _eager_and_graphed(steps=20):
    """Two solvers from the same weights, one eager and one replaying its graph, after `steps`."""
    caffe.set_cuda_graphs(False)
    eager = _solver()
    caffe.set_cuda_graphs(True)
    graphed = _solver()
    graphed.net.arena_data[...] = eager.net.arena_data
    eager.step(steps)
    graphed.step(steps)
    return eager, graphed


def test_graphed_training_equals_eager_bit_for_bit(gpu):
    eager, graphed = _eager_and_graphed()
    assert graphed._loop is not None and graphed._loop.graphs.graphs["iteration"][1] is not None
    np.testing.assert_array_equal(_weights(graphed), _weights(eager))
    assert graphed.smoothed_loss == pytest.approx(eager.smoothed_loss, rel=1e-6)
    history = [gpu.to_host(h) for h in graphed.updater.rule.history]
    np.testing.assert_array_equal(history[0], gpu.to_host(eager.updater.rule.history[0]))


def test_timed_convolutions_train_in_graphs(gpu, monkeypatch):
    """The default (not deterministic) mode: each convolution keeps the fastest of cuDNN's timed
    algorithms, im2col + GEMM and (forward) the direct kernel, and the graphed iteration trains
    like the eager one."""
    monkeypatch.setattr(gpu, "deterministic", False)
    eager, graphed = _eager_and_graphed()
    assert graphed._loop.graphs.graphs["iteration"][1] is not None
    convs = [layer for layer in graphed.net.layers if layer.type == "Convolution"]
    assert all(layer.engines[0] in {"cudnn", "gemm", "direct"} and layer.engines[1] in {"cudnn", "gemm", "direct"}
               for layer in convs)
    assert gpu.cudnn is None or all(layer.plan is not None for layer in convs)
    # not bit for bit: cuDNN's fastest kernels may sum with atomics, in a varying order, and 20
    # steps amplify the rounding (3.6e-4 of the largest weight seen on an H100)
    difference = np.abs(_weights(graphed) - _weights(eager)).max()
    assert difference < 2e-3 * np.abs(_weights(eager)).max()


def test_param_grads_aside_run_on_the_side_stream_with_one_streams_results(gpu, monkeypatch):
    """Inside Net's backward the four param layers put their gradients aside (a second stream,
    captured as graph branches); the weights trained so equal those of one stream bit for bit,
    given a side cuBLAS workspace as large as the main one (cuBLAS picks its kernels by the
    workspace, and the side's is smaller by default: then equal to rounding only)."""
    from espresso.backend.cuda import blas

    monkeypatch.setattr(blas, "SIDE_WORKSPACE_BYTES", blas.WORKSPACE_BYTES)
    monkeypatch.setattr(gpu, "_side_blas", None)  # made again, of that size
    forks, aside, overlapping = [], gpu.aside, gpu.overlapping

    @contextlib.contextmanager
    def counted(*args, **kwargs):
        with aside(*args, **kwargs) as went_aside:
            forks.append(went_aside)
            yield went_aside

    solver, one_stream = _solver(), _solver()
    one_stream.net.arena_data[...] = solver.net.arena_data
    monkeypatch.setattr(gpu, "aside", counted)
    solver.net.forward()
    solver.net.backward()
    # biases and weights of ip2, ip1 and conv2, conv1's bias; conv1's weights (it has no bottom
    # gradient) on the main stream meanwhile; joined at the end of the pass
    per_pass = [True] * 7 + [False]
    assert forks == per_pass and gpu._side_done is None
    monkeypatch.setattr(gpu, "overlapping", contextlib.nullcontext)
    one_stream.step(20)
    monkeypatch.setattr(gpu, "overlapping", overlapping)
    forks.clear()
    solver.step(20)
    # the diffs' zeroing and the bookkeeping aside, then the pass's, with the update of every param
    # but conv1's aside before conv1's backward (graphed.early_update)
    per_iteration = [True, True] + per_pass[:6] + [True] + per_pass[6:]
    assert forks and forks == per_iteration * (len(forks) // len(per_iteration))  # eager run and capture
    np.testing.assert_array_equal(_weights(solver), _weights(one_stream))


TIED = """
layer { name: "in" type: "Input" top: "x" top: "ids" input_param { shape { dim: 8 dim: 6 } shape { dim: 8 } } }
layer { name: "embed" type: "Embed" bottom: "ids" top: "e" param { name: "W" }
        embed_param { num_output: 6 input_dim: 6 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "tied" type: "InnerProduct" bottom: "x" top: "h" param { name: "W" }
        inner_product_param { num_output: 6 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "sum" type: "Eltwise" bottom: "e" bottom: "h" top: "s" }
layer { name: "ip" type: "InnerProduct" bottom: "s" top: "out"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "loss" type: "Reduction" bottom: "out" top: "loss" loss_weight: 1 reduction_param { operation: SUMSQ } }
"""


def test_layers_sharing_a_param_accumulate_its_gradient_on_one_stream(gpu, monkeypatch):
    """Embed and InnerProduct tied to one weight: neither puts its gradient aside (the Embed's
    scatter-add on the main stream would race the other's GEMM), and the sum is the CPU's."""
    forks, aside = [], gpu.aside

    @contextlib.contextmanager
    def counted(*args, **kwargs):
        with aside(*args, **kwargs) as went_aside:
            forks.append(went_aside)
            yield went_aside

    monkeypatch.setattr(gpu, "aside", counted)
    rng = np.random.default_rng(4)
    x, ids = rng.standard_normal((8, 6)), rng.integers(0, 6, 8)
    nets = {}
    for mode in ("cpu", "gpu"):
        getattr(caffe, f"set_mode_{mode}")()
        nets[mode] = caffe.Net(parse_text(TIED, caffe_pb2.NetParameter()), caffe.TRAIN, dtype=np.float64)
        if mode == "gpu":
            for name, blobs in nets["cpu"].params.items():
                for target, source in zip(nets["gpu"].params[name], blobs):
                    target.data[...] = source.data
        nets[mode].forward(x=x, ids=ids)
        nets[mode].backward()
    assert nets["gpu"]._shares_params == [False, True, True, False, False, False]
    assert forks == [True, True, False, False]  # ip's bias and weights aside; the tied layer's in line
    for name, blobs in nets["cpu"].params.items():
        for cpu, gpu_blob in zip(blobs, nets["gpu"].params[name]):
            np.testing.assert_allclose(gpu_blob.diff, cpu.diff, rtol=1e-12, atol=1e-12)


def test_graph_replays_draw_new_dropout_masks(gpu):
    solver = _solver(drop=0.5)
    solver.step(3)  # the graph is captured by now
    masks = []
    for _ in range(2):
        solver.step(1)
        masks.append(gpu.to_host(solver.net.layers[7].mask.data).copy())
    assert not np.array_equal(masks[0], masks[1])


def test_only_a_net_that_draws_makes_the_random_generator(gpu, monkeypatch):
    """The generator's states (megabytes) are made at the first Dropout draw, in the eager pass
    before a capture; a TEST net, graphed, never makes them."""
    monkeypatch.setattr(gpu, "_rng", None)
    net = caffe.Net(parse_text(LENET.replace("DROP", "0.5"), caffe_pb2.NetParameter()), caffe.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(2).random((8, 1, 28, 28))
    losses = [float(net.forward()["loss"]) for _ in range(3)]  # eager, captured, replayed
    assert gpu._rng is None and losses[0] == losses[2]
    solver = _solver(drop=0.5)
    assert gpu._rng is None  # (the solver's random_seed is kept for the first draw)
    solver.step(3)
    assert gpu._rng is not None


def test_same_seed_same_weights(gpu):
    runs = []
    for _ in range(2):
        caffe.set_random_seed(11)
        solver = _solver(drop=0.5)
        solver.step(15)
        runs.append(_weights(solver))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_forward_graph_follows_new_inputs_and_shapes(gpu):
    solver = _solver()
    net, rng = solver.net, np.random.default_rng(5)
    for batch, reshapes in ((8, False), (8, False), (8, False), (3, True), (3, False)):
        x = rng.random((batch, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        if net.blobs["data"].shape[0] != batch:
            net.blobs["data"].reshape(batch, 1, 28, 28)
            net.blobs["label"].reshape(batch)
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = y
        version = graphs.version(net.backend)
        graphed = net.forward()["loss"]
        caffe.set_cuda_graphs(False)
        eager = net.forward()["loss"]
        caffe.set_cuda_graphs(True)
        assert (graphs.version(net.backend) != version) == reshapes  # only a new batch size voids the graphs
        assert float(graphed) == float(eager)


def test_unsupported_solvers_train_eagerly(gpu):
    solver = _solver(rule="Adam")
    solver.step(2)
    assert solver._loop is None and solver.iter == 2


def test_time_command_reports_gpu_graph_times(gpu, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "lenet.prototxt"
    path.write_text(LENET.replace("DROP", "0.5"))
    result = subprocess.run([sys.executable, "-m", "espresso.cli", "time", "--model", str(path), "--gpu", "0",
                             "--iterations", "5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CUDA graph replays" in result.stderr
    times = [float(line.split(":")[-1].split()[0]) for line in result.stderr.splitlines() if "forward:" in line]
    assert len(times) == 10 and all(t > 0 for t in times[1:])


def test_split_weight_gradient_matches_the_cpu(gpu, monkeypatch):
    """A long batch-last weight-gradient GEMM runs as split partial products on the GPU (the
    im2col + GEMM path, taken without cuDNN)."""
    monkeypatch.setattr(gpu, "cudnn", None)
    text = """force_backward: true
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 128 dim: 4 dim: 12 dim: 12 } } }
    layer { name: "conv" type: "Convolution" bottom: "x" top: "y"
            convolution_param { num_output: 6 kernel_size: 3 group: 2 weight_filler { type: "gaussian" } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "y" top: "loss" loss_weight: 0 }"""
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((128, 4, 12, 12)), rng.standard_normal((128, 6, 10, 10))
    diffs = []
    for backend in (None, gpu):
        net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN, backend=backend)
        net.params["conv"][0].data[...] = rng.standard_normal((6, 2, 3, 3)) if not diffs else diffs[0][1]
        net.blobs["x"].data[...] = x
        net.forward()
        net.clear_param_diffs()
        net.blobs["y"].diff[...] = dy
        net.backward(start="conv")
        diffs.append((net.params["conv"][0].diff.copy(), net.params["conv"][0].data.copy()))
    assert net.layers[1].cores[0].batch_last and net.layers[1].cores[0]._parts(128 * 10 * 10) > 1
    np.testing.assert_allclose(diffs[1][0], diffs[0][0], rtol=2e-5, atol=2e-4)
