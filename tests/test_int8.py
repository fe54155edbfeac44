"""Post-training int8: the GEMM kernels exact against integer arithmetic, the int8 layers
exact against float arithmetic on the same quantized values, calibration, and `espresso
compress --int8` (alone, with Deep Compression, and its refusals) end to end."""

import functools
import json

import numpy as np
import pytest
from devices import gpu_test
from example_nets import ROOT, example_files

import espresso
from espresso import cli
from espresso.compress import int8_kernels as kernels
from espresso.compress.int8 import Int8Layer, calibrate, input_format, int8_layers, int8_records, quantize_weights
from espresso.compress.model_file import ScaledIntegers, read_model, write_model
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

pytest.importorskip("numba")
GEMMS = [pytest.param(kernels.plain_gemm, kernels.plain_pack, id="plain"),
         pytest.param(getattr(kernels, "vnni_gemm", None), kernels.vnni_pack, id="vnni",
                      marks=pytest.mark.skipif(not kernels.VNNI, reason="this CPU has no AVX-512 VNNI"))]


@pytest.mark.parametrize("gemm, pack", GEMMS)
@pytest.mark.parametrize("m, k, n", [(20, 25, 37), (50, 500, 64), (500, 800, 1), (17, 3, 8), (16, 4, 9)])
def test_the_int8_gemm_is_exact(gemm, pack, m, k, n, rng):
    w = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w[0] = -127  # the largest sums too
    packed = pack(w)
    x = rng.integers(0, 256, (n, kernels.padded_k(packed))).astype(np.uint8)
    x[0] = 255
    acc = np.full((n, kernels.acc_columns(m)), 7, np.int32)
    gemm(packed, x, acc)
    np.testing.assert_array_equal(acc[:, :m], x[:, :k].astype(np.int64) @ w.T.astype(np.int64))


NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 9 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 18 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2
                            weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


def _net(channels=2, group=1):
    text = NET.replace("dim: 3 dim: 2", f"dim: 3 dim: {channels}")
    text = text.replace("num_output: 18", f"num_output: 18 group: {group}")
    return espresso.Net(parse_text(text, caffe_pb2.NetParameter()), espresso.TEST)


# patches copied byte by byte, or as 32-bit words; a grouped convolution
@pytest.mark.parametrize("channels, group", [(2, 1), (4, 1), (4, 2)])
def test_int8_layers_compute_the_quantized_values_exactly(tmp_path, rng, channels, group):
    """Signed input (zero point 128, padded with the quantized 0) into a strided, dilated,
    padded convolution, then a ReLU'd (uint8) input into an inner product: each equals the float
    layer run on the dequantized input and weights."""
    _net = functools.partial(globals()["_net"], channels, group)  # noqa: F811
    net = _net()
    samples = rng.standard_normal((6, channels, 9, 8)).astype(np.float32)
    names = int8_layers(net)
    ranges = calibrate(net, names, inputs=samples)
    assert ranges["conv"][0] < 0 < ranges["conv"][1] and ranges["ip"][0] == 0
    write_model(tmp_path / "q.espz", int8_records(net, ranges))
    quantized = _net()
    quantized.copy_from(str(tmp_path / "q.espz"))
    assert [type(layer) for layer in quantized.engine_layers].count(Int8Layer) == 2
    x = samples[:3]
    quantized.blobs["data"].data[...] = x
    quantized.forward()
    for name, bottom, end in (("conv", "data", "relu"), ("ip", "conv", "ip")):
        scale, zero = input_format(*ranges[name])
        source = np.array(quantized.blobs[bottom].data)
        levels = np.clip(np.rint(source / scale) + zero, 0, 255)
        reference = _net()
        values, scales = quantize_weights(net.params[name][0].data)
        reference.params[name][0].data[...] = values * scales.reshape((-1,) + (1,) * (values.ndim - 1))
        reference.params[name][1].data[...] = net.params[name][1].data
        reference.blobs[bottom].data[...] = (levels - zero) * scale
        reference.forward(start=name, end=end)
        np.testing.assert_allclose(quantized.blobs[name].data, reference.blobs[name].data, rtol=1e-5, atol=1e-5)
    net.blobs["data"].data[...] = x
    net.forward()
    error = np.abs(quantized.blobs["ip"].data - net.blobs["ip"].data).max()
    assert 0 < error < 0.05 * np.abs(net.blobs["ip"].data).max()  # int8 is close to float, not equal


def test_calibration_and_int8_options_are_checked():
    net = _net()
    with pytest.raises(EspressoError, match=r"do not fit the net's input 'data' \(3, 2, 9, 8\): give \(n, 2, 9, 8\)"):
        calibrate(net, ["conv"], inputs=np.zeros((4, 2, 8, 9)))
    with pytest.raises(EspressoError, match="needs data"):
        calibrate(net, ["conv"])
    assert int8_layers(net, ["first"]) == ["ip"] and int8_layers(net, ["last"]) == ["conv"]
    with pytest.raises(EspressoError, match="--keep-float: no layer int8 can run is named relu"):
        int8_layers(net, ["relu"])
    values, scales = quantize_weights(np.array([[0.5, -1.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(values, [[64, -127], [0, 0]])
    assert scales[1] == 1.0 and input_format(0.0, 2.55) == pytest.approx((0.01, 0))


def _example(tmp_path, folder, name):
    net, solver_path = example_files(tmp_path, folder, name, test_iter=4)
    solver = espresso.SGDSolver(solver_path)
    solver.step(60)  # a little trained, so that accuracy means something
    solver.net.save(str(tmp_path / "w.caffemodel"))
    return ["compress", "--model", net, "--weights", str(tmp_path / "w.caffemodel"), "--solver", solver_path,
            "--report", str(tmp_path / "r.json")]


def test_compress_int8_on_lenet_runs_int8_and_keeps_the_accuracy(tmp_path):
    common = _example(tmp_path, "lenet", "lenet")
    out = str(tmp_path / "q.espz")
    assert cli.main(common + ["--int8", "--calibration-iters", "2", "--output", out]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"ratio", "accuracy_before", "accuracy_after", "original_bytes", "compressed_bytes"} <= set(report)
    assert 3.5 < report["ratio"] < 4 and abs(report["accuracy_after"] - report["accuracy_before"]) <= 0.02
    assert [row["layer"] for row in report["stages"]] == ["conv1", "conv2", "ip1", "ip2"]
    layers = {name: blobs[0] for name, _, blobs in read_model(out)}
    assert all(isinstance(w, ScaledIntegers) and w.values.dtype == np.int8 for w in layers.values())
    assert layers["conv1"].input_zero == 0 and layers["ip2"].input_zero == 0  # pixels, ReLU'd
    net = espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST, weights=out)
    assert [type(layer).__name__ for layer in net.engine_layers].count("Int8Layer") == 4
    assert cli.main(common + ["--int8", "--keep-float", "first,last", "--output", out]) == 0
    kept = {name: type(blobs[0]).__name__ for name, _, blobs in read_model(out)}
    assert kept == {"conv1": "ndarray", "conv2": "ScaledIntegers", "ip1": "ScaledIntegers", "ip2": "ndarray"}


def test_compress_prune_quantize_int8_on_lenet_300_100_and_bad_input(tmp_path, capsys):
    common = _example(tmp_path, "lenet_300_100", "lenet_300_100")
    out = str(tmp_path / "q.espz")
    assert cli.main(common + ["--prune", "*=0.9", "--bits", "*=5", "--prune-steps", "1", "--retrain-iters", "10",
                              "--quant-iters", "10", "--int8", "--calibration-iters", "2", "--output", out]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    accuracy = report["accuracy"]
    assert report["ratio"] > 20 and abs(accuracy["deployed"] - accuracy["quantized_finetuned"]) < 0.03
    assert all(blobs[0].input_scale > 0 for _, _, blobs in read_model(out))
    net = espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST, weights=out)
    assert [type(layer).__name__ for layer in net.engine_layers].count("Int8Layer") == 3
    np.save(tmp_path / "bad.npy", np.zeros((5, 1, 28, 27), np.float32))
    deploy = tmp_path / "deploy.prototxt"
    layers = (ROOT / "examples/lenet_300_100/lenet_300_100_train_test.prototxt").read_text().split("layer {")
    deploy.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 28 '
                      'dim: 28 } } }\n' + "".join("layer {" + text for text in layers[3:] if '"InnerProduct"' in text
                                                   or '"ReLU"' in text))
    bad = ["--model", str(deploy), "--int8", "--calibration", str(tmp_path / "bad.npy"), "--output", out]
    capsys.readouterr()
    assert cli.main(common + bad) == 1
    assert "do not fit the net's input 'data' (1, 1, 28, 28): give (n, 1, 28, 28)" in capsys.readouterr().err
    assert cli.main(common + ["--keep-float", "first", "--output", out]) == 1
    assert "--calibration and --keep-float go with --int8" in capsys.readouterr().err
    assert cli.main(common + ["--int8", "--fp16", "--output", out]) == 1
    assert "--fp16/--bf16 and --int8 do not combine in one run" in capsys.readouterr().err


def test_an_int8_net_exports_to_onnx_in_qdq_form_and_onnx_runtime_agrees(tmp_path, rng):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from espresso.interop.onnx_export import export_onnx

    net = _net()
    samples = rng.standard_normal((6, 2, 9, 8)).astype(np.float32)
    write_model(tmp_path / "q.espz", int8_records(net, calibrate(net, int8_layers(net), inputs=samples)))
    quantized = espresso.Net(parse_text(NET, caffe_pb2.NetParameter()), espresso.TEST, weights=str(tmp_path / "q.espz"))
    export_onnx(quantized, tmp_path / "q.onnx")
    model = onnx.load(tmp_path / "q.onnx")
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert sorted(tuple(t.dims) for t in int8) == [(5, 288), (18, 2, 3, 2)]  # conv: 18 x 4 x 4 out
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    quantized.blobs["data"].data[...] = samples[:3]
    expected = quantized.forward()["ip"]
    (got,) = session.run(None, {"data": samples[:3]})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


CHAIN = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 12 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 6 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 40 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


def test_a_chain_of_int8_inner_products_runs_fused_as_layer_by_layer(tmp_path, rng):
    param = parse_text(CHAIN, caffe_pb2.NetParameter())
    net = espresso.Net(param, espresso.TEST)
    samples = rng.standard_normal((8, 12)).astype(np.float32)
    write_model(tmp_path / "q.espz", int8_records(net, calibrate(net, int8_layers(net), inputs=samples)))
    fused = espresso.Net(param, espresso.TEST, weights=str(tmp_path / "q.espz"))
    assert all(layer.run is not None for layer in fused.engine_layers[1:])  # one FusedRun
    fused.blobs["data"].data[...] = samples[:2]
    out = np.array(fused.forward()["ip3"])
    for i, layer in enumerate(fused.engine_layers[1:], 1):  # each layer on its own, outside the run
        layer.compute(fused.bottom_vecs[i], fused.top_vecs[i])
    np.testing.assert_array_equal(fused.blobs["ip3"].data, out)
    fused.blobs["ip1"].data[...] = -1.0  # a pass starting inside the run computes from there
    restarted = np.array(fused.forward(start="relu1")["ip3"])
    fused.blobs["ip1"].data[...] = -1.0
    for i in range(2, len(fused.engine_layers)):
        fused.engine_layers[i].compute(fused.bottom_vecs[i], fused.top_vecs[i])
    np.testing.assert_array_equal(fused.blobs["ip3"].data, restarted)
    assert not np.array_equal(restarted, out)


def test_one_scale_for_all_channels_and_what_int8_refuses(tmp_path, rng):
    """A file's int8 weights with one scale (the format allows it) run as one per channel; a
    convolution of two bottoms stays float (its second top would go uncomputed)."""
    param = parse_text(CHAIN, caffe_pb2.NetParameter())
    net = espresso.Net(param, espresso.TEST)
    one_scale = np.array([0.5], np.float32)
    records = [(name, layer.type, [ScaledIntegers(np.full(layer.blobs[0].shape, 3, np.int8), one_scale, 0.25, 128)]
                + [np.array(b.data) for b in layer.blobs[1:]]) for name, layer in net.layer_dict.items() if layer.blobs]
    write_model(tmp_path / "one.espz", records)
    quantized = espresso.Net(param, espresso.TEST, weights=str(tmp_path / "one.espz"))
    x = np.ones((2, 12), np.float32)  # 1.0 = 4 steps of 0.25: exact
    quantized.forward(data=x)
    np.testing.assert_allclose(quantized.blobs["ip1"].data, np.full((2, 6), 12 * 1.5))  # each weight 3 x 0.5
    two_bottoms = NET.replace('bottom: "data" top: "conv"', 'bottom: "data" bottom: "data2" top: "conv" top: "conv2"')
    two = parse_text(two_bottoms.replace('top: "data" input_param { shape { dim: 3 dim: 2 dim: 9 dim: 8 } }',
                                         'top: "data" top: "data2" input_param { shape { dim: 3 dim: 2 dim: 9 dim: 8 } '
                                         'shape { dim: 3 dim: 2 dim: 9 dim: 8 } }'), caffe_pb2.NetParameter())
    assert int8_layers(espresso.Net(two, espresso.TEST)) == ["ip"]


@gpu_test
@pytest.mark.parametrize("group", [1, 2])
def test_int8_layers_on_the_gpu_compute_the_cpus_integers_and_outputs(tmp_path, rng, group):
    """The same int8 file on the GPU (quantized patches, cuBLAS's int8 GEMM, int8.cu's
    dequantizing) gives the CPU kernels' outputs: a signed input with padding into a grouped or
    plain convolution, a uint8 one into an inner product, 3 images (rows padded for cuBLAS)."""
    net = _net(4, group)
    samples = rng.standard_normal((6, 4, 9, 8)).astype(np.float32)
    write_model(tmp_path / "q.espz", int8_records(net, calibrate(net, int8_layers(net), inputs=samples)))
    cpu = _net(4, group)
    cpu.copy_from(str(tmp_path / "q.espz"))
    cpu.forward(data=samples[:3])
    espresso.set_mode_gpu()
    try:
        gpu = _net(4, group)
        gpu.copy_from(str(tmp_path / "q.espz"))
        assert [type(layer).__name__ for layer in gpu.engine_layers].count("Int8GpuLayer") == 2
        gpu.forward(data=samples[:3])
        got = {name: np.array(gpu.blobs[name].data) for name in ("conv", "ip")}
    finally:
        espresso.set_mode_cpu()
    for name, values in got.items():
        assert np.abs(values).max() > 0
        np.testing.assert_array_equal(values, cpu.blobs[name].data)  # the same integers, the same float steps
