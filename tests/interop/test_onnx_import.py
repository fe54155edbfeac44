"""ONNX import against ONNX Runtime: one small graph per op (written here with onnx.helper, over
the opsets whose forms differ), the models PyTorch's two exporters write (LeNet, an MLP,
torchvision's classifiers with random weights), and bad files refused with one clear error.
Outputs must match ONNX Runtime's within 1e-4 of the output's largest magnitude."""

import contextlib
import io
import sys
import types
import warnings

import numpy as np
import pytest

import espresso
from espresso.errors import EspressoError, ModelFileError, NetError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from espresso.interop.onnx_import import OnnxError, import_onnx, load_onnx  # noqa: E402

TOLERANCE = 1e-4


def assert_matches_runtime(model, inputs, batch=None):
    """Espresso's outputs for `inputs` equal ONNX Runtime's (model: ModelProto or path)."""
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    expected = session.run(None, inputs)
    param, weights = import_onnx(model, batch=batch or len(next(iter(inputs.values()))))
    net = espresso.Net(param, espresso.TEST)
    from espresso.interop.onnx_import import set_weights

    set_weights(net, weights)
    got = net.forward(**inputs)
    for output, want in zip(session.get_outputs(), expected, strict=True):
        have = got[output.name]
        assert have.shape == want.shape, (output.name, have.shape, want.shape)
        scale = max(float(np.abs(want).max()), 1e-30)
        assert float(np.abs(have - want).max()) <= TOLERANCE * scale, (output.name, np.abs(have - want).max(), scale)
    return net


def graph(nodes, inputs, outputs, initializers=(), opset=17):
    """A model of `nodes`; inputs/outputs as {name: shape} (None: a symbolic batch "N")."""
    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N" if d is None else d for d in shape])
    g = helper.make_graph(nodes, "test", [value(n, s) for n, s in inputs.items()],
                          [value(n, s) for n, s in outputs.items()],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in dict(initializers).items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_op(op, shape=(2, 3, 6, 7), opset=17, consts=(), out=None, inputs=None, **attrs):
    """One `op` node on input "x" (and constants `consts`), against ONNX Runtime."""
    consts = dict(consts)
    names = ["x"] + list(consts) if inputs is None else inputs
    node = helper.make_node(op, names, ["y"], **attrs)
    model = graph([node], {"x": (None,) + shape[1:]}, {"y": out or [None]}, consts, opset)
    return assert_matches_runtime(model, {"x": randn(*shape)})


# *** one op at a time ***
@pytest.mark.parametrize("op, attrs", [
    ("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("Exp", {}), ("Abs", {}), ("Neg", {}), ("Softplus", {}),
    ("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.7}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
    ("HardSwish", {}), ("Identity", {}), ("Dropout", {}), ("Softmax", {"axis": 1}), ("Softmax", {}),
    ("LogSoftmax", {"axis": -1}), ("GlobalAveragePool", {}), ("GlobalMaxPool", {}),
    ("Flatten", {"axis": 1}), ("Flatten", {"axis": 2}),
    ("LRN", {"size": 3, "alpha": 0.001, "beta": 0.75, "bias": 1.5}),
])
def test_elementwise_and_shape_ops(op, attrs):
    run_op(op, **attrs)


def test_positive_only_ops():
    for op in ("Log", "Sqrt", "Reciprocal"):
        node = helper.make_node(op, ["x"], ["y"])
        model = graph([node], {"x": (None, 3, 4)}, {"y": [None]})
        assert_matches_runtime(model, {"x": np.abs(randn(2, 3, 4)) + 0.5})


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_over_trailing_axes_in_old_opsets(opset):
    run_op("Softmax", opset=opset, axis=1)
    run_op("Softmax", opset=opset, axis=2)


@pytest.mark.parametrize("opset", [11, 20])
def test_clip(opset):
    low, high = np.array(-0.5, np.float32), np.array(0.8, np.float32)
    run_op("Clip", opset=opset, consts={"low": low, "high": high})
    run_op("Clip", opset=opset, inputs=["x", "", "high"], consts={"high": high})


@pytest.mark.parametrize("kernel, strides, pads, group, dilations", [
    ((3, 3), (1, 1), (1, 1, 1, 1), 1, (1, 1)),
    ((3, 2), (2, 1), (0, 1, 2, 1), 1, (1, 1)),  # asymmetric pads
    ((3, 3), (1, 1), (2, 2, 2, 2), 3, (2, 2)),  # grouped, dilated
    ((1, 1), (2, 2), (0, 0, 0, 0), 1, (1, 1)),
])
def test_conv(kernel, strides, pads, group, dilations):
    w = randn(6, 3 // group, *kernel, seed=1)
    b = randn(6, seed=2)
    run_op("Conv", consts={"w": w, "b": b}, kernel_shape=kernel, strides=strides, pads=pads, group=group,
           dilations=dilations)


def test_conv_auto_pad_and_no_bias():
    run_op("Conv", consts={"w": randn(4, 3, 3, 3, seed=1)}, kernel_shape=(3, 3), strides=(2, 2), auto_pad="SAME_UPPER")


def test_conv_transpose():
    run_op("ConvTranspose", consts={"w": randn(3, 4, 3, 3, seed=1), "b": randn(4, seed=2)}, kernel_shape=(3, 3),
           strides=(2, 2), pads=(1, 1, 1, 1))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("kernel, strides, pads, ceil", [
    ((2, 2), (2, 2), (0, 0, 0, 0), 0), ((3, 3), (2, 2), (0, 0, 0, 0), 1), ((3, 3), (2, 2), (1, 1, 1, 1), 0),
    ((3, 3), (2, 2), (1, 1, 1, 1), 1), ((2, 3), (1, 2), (0, 1, 1, 1), 0),
])
@pytest.mark.parametrize("include_pad", [0, 1])
def test_pooling_rounding_and_pads(op, kernel, strides, pads, ceil, include_pad):
    if op == "MaxPool" and include_pad:
        return
    extra = {"count_include_pad": include_pad} if op == "AveragePool" else {}
    run_op(op, kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=ceil, **extra)


def test_batch_norm_and_instance_norm():
    c = 3
    stats = {"s": randn(c, seed=1), "b": randn(c, seed=2), "m": randn(c, seed=3), "v": np.abs(randn(c, seed=4)) + 0.5}
    run_op("BatchNormalization", consts=stats, epsilon=1e-3)
    run_op("InstanceNormalization", consts={"s": randn(c, seed=1), "b": randn(c, seed=2)}, epsilon=1e-5)


def test_gemm_and_matmul_with_a_bias():
    run_op("Gemm", shape=(2, 5), consts={"w": randn(4, 5, seed=1), "c": randn(4, seed=2)}, transB=1, alpha=0.5,
           beta=2.0)
    run_op("Gemm", shape=(2, 5), consts={"w": randn(5, 4, seed=1)})
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    model = graph(nodes, {"x": (None, 3, 5)}, {"y": [None]}, {"w": randn(5, 4, seed=1), "b": randn(4, seed=2)})
    net = assert_matches_runtime(model, {"x": randn(2, 3, 5)})
    assert [layer.type for layer in net.layers] == ["Input", "InnerProduct"]  # the bias folded in


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("const_shape", [(), (3, 1, 1), (1, 3, 6, 7), (7,), (6, 1)])
def test_binary_ops_with_a_constant(op, const_shape):
    value = np.abs(randn(*const_shape, seed=3)) + 0.5
    run_op(op, consts={"c": value})
    if op != "Div":
        run_op(op, inputs=["c", "x"], consts={"c": value})


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Sum", "Max", "Min"])
def test_ops_on_two_blobs(op):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node(op, ["r", "s"], ["y"])]
    run_graph(nodes)


def run_graph(nodes, shape=(2, 3, 6, 7), opset=17, consts=()):
    model = graph(nodes, {"x": (None,) + shape[1:]}, {"y": [None]}, consts, opset)
    return assert_matches_runtime(model, {"x": randn(*shape)})


def test_broadcast_mul_of_blobs_as_in_squeeze_and_excite():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Sigmoid", ["g"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    run_graph(nodes)


def test_pow_concat_split_and_slice():
    run_op("Pow", consts={"p": np.array(2.0, np.float32)})
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["x", "r"], ["y"], axis=1)]
    run_graph(nodes)
    for opset, split in ((11, {"split": [1, 2]}), (13, None), (18, None)):
        consts = {"sizes": np.array([1, 2], np.int64)} if split is None and opset < 18 else {}
        attrs = split or ({"num_outputs": 2} if opset >= 18 else {})
        inputs = ["x"] + list(consts)
        nodes = [helper.make_node("Split", inputs, ["a", "b"], axis=1, **attrs),
                 helper.make_node("Mul", ["b", "b"], ["b2"]) if opset >= 18 else
                 helper.make_node("Relu", ["b"], ["b2"]),
                 helper.make_node("Concat", ["b2", "a"], ["y"], axis=1)]
        run_graph(nodes, shape=(2, 4, 3, 3) if opset >= 18 else (2, 3, 3, 3), opset=opset, consts=consts)
    starts, ends = np.array([1, 2], np.int64), np.array([3, 100], np.int64)
    run_op("Slice", consts={"s": starts, "e": ends, "a": np.array([1, 3], np.int64)})
    run_op("Slice", opset=9, starts=[1], ends=[-1], axes=[2])


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_reductions_squeeze_unsqueeze(opset):
    axes = np.array([2, 3], np.int64)
    for op in ("ReduceMean", "ReduceSum"):
        as_input = op == "ReduceSum" and opset >= 13 or opset >= 18
        consts = {"axes": axes} if as_input else {}
        run_op(op, opset=opset, consts=consts, keepdims=1, **({} if as_input else {"axes": [2, 3]}))
        run_op(op, opset=opset, consts=consts, keepdims=0, **({} if as_input else {"axes": [2, 3]}))
    squeeze_consts = {"axes": np.array([2], np.int64)} if opset >= 13 else {}
    squeeze_attrs = {} if opset >= 13 else {"axes": [2]}
    run_op("Squeeze", shape=(2, 3, 1, 4), opset=opset, consts=squeeze_consts, **squeeze_attrs)
    run_op("Unsqueeze", shape=(2, 3, 4), opset=opset, consts=squeeze_consts, **squeeze_attrs)


def test_transpose_pad_resize():
    run_op("Transpose", perm=[0, 2, 3, 1])
    for mode in ("constant", "reflect", "edge"):
        run_op("Pad", opset=11, consts={"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64),
                                         "v": np.array(0.5, np.float32)}, mode=mode)
    run_op("Pad", opset=10, pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-1.0)
    scales = np.array([1, 1, 2, 2], np.float32)
    run_op("Resize", consts={"roi": np.zeros(0, np.float32), "scales": scales}, mode="nearest",
           coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    for transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        run_op("Resize", consts={"roi": np.zeros(0, np.float32), "scales": scales}, mode="linear",
               coordinate_transformation_mode=transform)
    sizes = np.array([2, 3, 9, 10], np.int64)
    run_op("Resize", inputs=["x", "", "", "sizes"], consts={"sizes": sizes}, mode="linear")
    run_op("Upsample", opset=9, consts={"scales": scales})


def test_reshape_chains_keep_the_batch_symbolic():
    """Flatten as exporters write it: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))."""
    consts = {"zero": np.array(0, np.int64), "minus": np.array([-1], np.int64), "axes": np.array([0], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["n"]),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = graph(nodes, {"x": (None, 3, 4, 5)}, {"y": [None, 60]}, consts)
    net = assert_matches_runtime(model, {"x": randn(2, 3, 4, 5)})
    assert list(net.layers[1].lp.reshape_param.shape.dim) == [0, -1]
    net.blobs["x"].reshape(5, 3, 4, 5)  # another batch size runs
    net.reshape()
    assert net.blobs["y"].shape == (5, 60)


# *** models PyTorch exports ***
def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    return torch


def torchvision_models():
    """torchvision.models, whose PyPI wheel is built against a CUDA PyTorch: its compiled ops
    (nms, ...) do not load beside a CPU one.  The models are plain Python; only the registration
    of those ops' shapes is skipped."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    pytest.importorskip("torchvision")
    import torchvision.models

    return torchvision.models


def export(torch, module, shape, path, dynamo, opset):
    module.eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        kwargs = ({"dynamic_shapes": ({0: torch.export.Dim("N")},)} if dynamo
                  else {"dynamic_axes": {"data": {0: "N"}, "out": {0: "N"}}})
        torch.onnx.export(module, (x,), str(path), dynamo=dynamo, opset_version=opset, input_names=["data"],
                          output_names=["out"], **kwargs)
    return path


def lenet(torch):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10), nn.Softmax(dim=1))


def mlp(torch):
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.Tanh(), nn.Dropout(0.5), nn.Linear(300, 100),
                         nn.ReLU6(), nn.Linear(100, 10), nn.LogSoftmax(dim=1))


# the dynamo exporter writes opset 18 and up (it cannot convert its graphs down)
@pytest.mark.parametrize("dynamo, opset", [(False, 13), (False, 17), (False, 18), (False, 20), (True, 18), (True, 20)])
@pytest.mark.parametrize("make", [lenet, mlp])
def test_small_models_of_both_exporters(tmp_path, make, opset, dynamo):
    torch = _torch()
    torch.manual_seed(0)
    path = export(torch, make(torch), (1, 1, 28, 28), tmp_path / "m.onnx", dynamo, opset)
    assert_matches_runtime(path, {"data": randn(3, 1, 28, 28)})  # a batch other than the exported one


TORCHVISION = ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x1_0", "googlenet", "vgg11", "alexnet"]


def _torchvision_case(tmp_path, name, dynamo, opset):
    torch, models = _torch(), torchvision_models()
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    path = export(torch, getattr(models, name)(weights=None, **extra), (1, 3, 224, 224), tmp_path / "m.onnx",
                  dynamo, opset)
    assert_matches_runtime(path, {"data": randn(2, 3, 224, 224)})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_classifiers(tmp_path, name, dynamo):
    _torchvision_case(tmp_path, name, dynamo, 17)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo, opset", [(False, 13), (False, 18), (False, 20), (True, 20)])
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_classifiers_at_every_opset(tmp_path, name, dynamo, opset):
    _torchvision_case(tmp_path, name, dynamo, opset)


# *** refused, with one clear error ***
def test_an_unsupported_op_names_the_node_type_and_opset(tmp_path):
    model = graph([helper.make_node("Det", ["x"], ["y"], name="the_det")], {"x": (None, 3, 3)}, {"y": [None]})
    with pytest.raises(OnnxError, match=r"ONNX node 'the_det' \(Det, opset 17\): has no Espresso mapping"):
        import_onnx(model)


def test_damaged_files_are_model_file_errors(tmp_path):
    model = graph([helper.make_node("Relu", ["x"], ["y"])], {"x": (None, 3)}, {"y": [None]})
    data = model.SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    for name in ("cut.onnx", "junk.onnx", "missing.onnx"):
        with pytest.raises(ModelFileError):
            load_onnx(tmp_path / name)


def test_external_data_that_is_missing(tmp_path):
    w = randn(4, 3, seed=1)
    model = graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], {"x": (None, 3)}, {"y": [None]},
                  {"w": w})
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    np.testing.assert_array_equal(_first_param(load_onnx(tmp_path / "m.onnx")), w)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelFileError, match="m.onnx"):
        load_onnx(tmp_path / "m.onnx")


def _first_param(net):
    return next(iter(net.params.values()))[0].data


def test_a_shape_espresso_cannot_map_is_refused():
    model = graph([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])], {"x": (None, 3, 4)}, {"y": [None]})
    with pytest.raises(OnnxError, match="moves the batch axis"):
        import_onnx(model)
    model = graph([helper.make_node("Relu", ["x"], ["y"])], {"x": (None, "H", 4)}, {"y": [None]})
    with pytest.raises(NetError, match="only the first .batch. dimension may be symbolic"):
        import_onnx(model)


def test_convert_writes_a_caffe_net_and_weights_that_reproduce_the_model(tmp_path):
    from espresso import cli

    w = randn(6, 3, 3, 3, seed=1)
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], kernel_shape=(3, 3), pads=(1, 1, 1, 1)),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["prob"])]
    model = graph(nodes, {"data": (None, 3, 8, 8)}, {"prob": [None, 6, 1, 1]}, {"w": w})
    onnx.save(model, tmp_path / "m.onnx")
    assert cli.main(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "net.prototxt"),
                     "--weights", str(tmp_path / "net.caffemodel"), "--batch", "4"]) == 0
    net = espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST, weights=str(tmp_path / "net.caffemodel"))
    x = randn(4, 3, 8, 8)
    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"data": x})[0]
    np.testing.assert_allclose(net.forward(data=x)["prob"], want, rtol=1e-5, atol=1e-5)
    assert "state" not in (tmp_path / "net.prototxt").read_text()  # an ordinary Caffe net


def test_convert_writes_nothing_when_the_model_is_refused(tmp_path, capsys):
    from espresso import cli

    onnx.save(graph([helper.make_node("Det", ["x"], ["y"])], {"x": (None, 3, 3)}, {"y": [None]}), tmp_path / "m.onnx")
    assert cli.main(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "net.prototxt")]) == 1
    assert "(Det, opset 17): has no Espresso mapping" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# *** round trips: ONNX -> Espresso -> ONNX ***
def assert_round_trip(net, inputs):
    """The net exported again gives, in ONNX Runtime, the net's own outputs (at another batch too)."""
    from espresso.interop.onnx_export import to_onnx_model

    session = ort.InferenceSession(to_onnx_model(net).SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    for name, want in net.forward(**inputs).items():
        scale = max(float(np.abs(want).max()), 1e-30)
        assert float(np.abs(got[name] - want).max()) <= TOLERANCE * scale, name


def test_espressos_own_layers_go_back_to_onnx():
    scales = np.array([1, 1, 2, 1.5], np.float32)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             helper.make_node("Transpose", ["p"], ["t"], perm=[0, 1, 3, 2]),
             helper.make_node("Resize", ["t", "", "scales"], ["r"], mode="linear"),
             helper.make_node("Resize", ["r", "", "", "sizes"], ["y"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    consts = {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "scales": scales,
              "sizes": np.array([2, 3, 9, 7], np.int64)}
    net = run_graph(nodes, consts=consts)
    assert [layer.type for layer in net.layers[1:]] == ["Pad", "Permute", "Upsample", "Upsample"]
    assert_round_trip(net, {"x": randn(2, 3, 6, 7)})


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x1_0"])
def test_torchvision_models_go_back_to_onnx(tmp_path, name):
    torch, models = _torch(), torchvision_models()
    torch.manual_seed(0)
    path = export(torch, getattr(models, name)(weights=None), (1, 3, 224, 224), tmp_path / "m.onnx", False, 17)
    assert_round_trip(load_onnx(path, batch=2), {"data": randn(2, 3, 224, 224)})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_lstm_from_pytorch(tmp_path, dynamo):
    """nn.LSTM (sequence first) and a Linear on its outputs; the batch is fixed at conversion."""
    torch = _torch()
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.out = torch.nn.LSTM(5, 7), torch.nn.Linear(7, 3)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.out(y)

    x = torch.randn(6, 2, 5)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Tagger().eval(), (x,), str(tmp_path / "m.onnx"), dynamo=dynamo,
                          opset_version=18 if dynamo else 17, input_names=["data"], output_names=["out"])
    net = assert_matches_runtime(tmp_path / "m.onnx", {"data": randn(6, 2, 5)}, batch=6)
    assert "LSTM" in [layer.type for layer in net.layers]
    assert_matches_runtime(tmp_path / "m.onnx", {"data": randn(6, 2, 5, seed=3)}, batch=6)  # starts afresh


def test_mutated_onnx_files_are_read_or_refused_with_the_projects_errors(tmp_path):
    """The fuzz target of tests/test_fuzz.py for the ONNX reader: bytes flipped, cut, put in."""
    from test_fuzz import CASES, mutations

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=(3, 3), pads=(1, 1, 1, 1)),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    model = graph(nodes, {"x": (None, 2, 4, 4)}, {"y": [None, 3]},
                  {"w": randn(4, 2, 3, 3), "b": randn(4), "g": randn(3, 64)})
    refused = 0
    for data in mutations(model.SerializeToString(), seed=11, count=CASES * 2):
        (tmp_path / "m.onnx").write_bytes(data)
        try:
            import_onnx(tmp_path / "m.onnx")
        except EspressoError:
            refused += 1
    assert refused > 0
