"""espresso compare: two models on one input, tensor by tensor, naming the first that differs."""

import numpy as np
import pytest

import espresso
from espresso import cli
from espresso.errors import EspressoError
from espresso.interop.compare import compare, model_tensors

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def small_onnx(path):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv"], kernel_shape=(3, 3), name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=(2, 2), strides=(2, 2), name="pool")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["N", 4, 3, 3])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_onnx_runtime_and_espresso_agree_tensor_by_tensor(tmp_path, capsys):
    model = small_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rows, diverged = compare(model_tensors(model, x), model_tensors(f"espresso:{model}", x))
    assert diverged is None and [r[0] for r in rows] == ["data", "conv", "relu", "pool"]
    assert cli.main(["compare", model, f"espresso:{model}", "--input", str(tmp_path / "x.npy")]) == 0
    assert "4 tensors agree within 0.0001" in capsys.readouterr().out


def test_the_first_tensor_that_differs_is_named(tmp_path, capsys):
    """Two weight files of one net, one with a changed convolution: the conv's top diverges first."""
    model = small_onnx(tmp_path / "m.onnx")
    net_file, weights = str(tmp_path / "net.prototxt"), str(tmp_path / "a.caffemodel")
    assert cli.main(["convert", model, "-o", net_file, "--weights", weights]) == 0
    net = espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST, weights=str(tmp_path / "a.caffemodel"))
    net.params["conv"][0].data[0, 0, 0, 0] += 0.5
    net.save(str(tmp_path / "b.caffemodel"))
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32))
    args = ["compare", str(tmp_path / "a.caffemodel"), str(tmp_path / "b.caffemodel"), "--model",
            str(tmp_path / "net.prototxt"), "--input", str(tmp_path / "x.npy")]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "diverges at 'conv'" in out and "pool" not in out  # the table stops at the first divergence
    same = [f"{tmp_path / 'net.prototxt'}:{tmp_path / 'a.caffemodel'}", str(tmp_path / "a.caffemodel")]
    assert cli.main(["compare", *same, "--model", net_file, "--input", str(tmp_path / "x.npy")]) == 0


def test_inputs_and_models_that_cannot_be_compared(tmp_path, capsys):
    model = small_onnx(tmp_path / "m.onnx")
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    assert cli.main(["compare", model, f"espresso:{model}", "--input", str(tmp_path / "x.npy")]) == 1
    assert "not a .npy or .npz file" in capsys.readouterr().err
    with pytest.raises(EspressoError, match="give the net too"):
        model_tensors(str(tmp_path / "a.caffemodel"), np.zeros((1, 3, 8, 8), np.float32))
