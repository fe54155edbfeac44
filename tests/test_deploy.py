"""espresso.deploy: each optimization keeps a TEST net's outputs (within float32 rounding) and its
input and output names, and the optimized prototxt and .caffemodel load back as they were."""

import numpy as np
import pytest

import espresso as caffe
from espresso import deploy
from espresso.errors import EspressoError, NetError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_net_text, to_text


def data(*dims):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {shape} }} }} }}\n'


def conv(name, bottom, top, n=4, extra=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" '
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 {extra} }} }}\n')


def ip(name, bottom, top, n=5, extra=""):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" '
            f'inner_product_param {{ num_output: {n} {extra} }} }}\n')


def layer(kind, name, bottom, top, extra=""):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" {extra} }}\n'


def bn(name, bottom, top, extra=""):
    return layer("BatchNorm", name, bottom, top, extra)


def scale(name, bottom, top, bias=True):
    return layer("Scale", name, bottom, top, "scale_param { bias_term: true }" if bias else "")


def relu(name, bottom, top):
    return layer("ReLU", name, bottom, top)


def build(text, rng, factor=0.999, phase=caffe.TEST):
    """The net with random weights (of variance 1 / fan-in, so activations stay near 1) and
    BatchNorm statistics: non-zero means, variances far from 1, all kept as sums weighted by the
    scale factor `factor` (Caffe's blob / s)."""
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), phase)
    for lay in net.layers:
        blobs = lay.blobs
        if lay.type == "BatchNorm":
            c = blobs[0].count
            blobs[0].data[...] = rng.normal(0.5, 1.0, c) * (factor or 1)  # ignored where s == 0
            blobs[1].data[...] = rng.uniform(0.05, 4.0, c) * (factor or 1)
            blobs[2].data[...] = factor
        else:
            for blob in blobs:
                blob.data[...] = rng.normal(0.0, (blob.count / blob.shape[0]) ** -0.5, blob.shape)
    return net


def outputs(net, feeds):
    out = net.forward(**feeds)
    return {name: np.array(value) for name, value in out.items()}


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        scale_ = np.abs(value).max()
        np.testing.assert_allclose(got[name], value, rtol=0, atol=2e-6 * scale_, err_msg=name)


def check(net, rng, feeds=None):
    """optimize(net), its outputs checked against the net's on the same inputs."""
    result = deploy.optimize(net)
    assert result.net.inputs == net.inputs and result.net.outputs == net.outputs
    feeds = feeds or {name: rng.standard_normal(net.blobs[name].data.shape) for name in net.inputs}
    assert_same(outputs(result.net, feeds), outputs(net, feeds))
    return result


def types(param):
    return [lp.type for lp in param.layer]


# *** folding ***
@pytest.mark.parametrize("factor", [0.999, 7.0, 1.0, 0.0])
def test_conv_batchnorm_scale_relu_in_place_fold_into_the_conv(rng, factor):
    text = (data(2, 3, 6, 6) + conv("conv1", "data", "conv1", extra="bias_term: false")
            + bn("bn1", "conv1", "conv1") + scale("scale1", "conv1", "conv1") + relu("relu1", "conv1", "conv1"))
    result = check(build(text, rng, factor), rng)
    assert types(result.param) == ["Input", "Convolution", "ReLU"]
    assert result.report["folded"] == {"conv1": ["bn1", "scale1"]}
    assert result.param.layer[1].convolution_param.bias_term
    assert [b.shape for b in result.net.params["conv1"]] == [(4, 3, 3, 3), (4,)]
    assert result.report["layers"] == [5, 3]
    assert result.report["params"] == [4 * 27 + 4 + 4 + 1 + 4 + 4, 4 * 27 + 4]


@pytest.mark.parametrize("bias", [True, False])
def test_inner_product_batchnorm_scale_fold_keeping_the_output_name(rng, bias):
    text = data(3, 6) + ip("fc", "data", "fc", extra="bias_term: false") + bn("bn", "fc", "fc_bn")
    text += scale("sc", "fc_bn", "out", bias)
    result = check(build(text, rng), rng)
    assert types(result.param) == ["Input", "InnerProduct"]
    assert list(result.param.layer[1].top) == ["out"]


def test_transposed_inner_product_on_4d_input(rng):
    text = data(2, 3, 2, 2) + ip("fc", "data", "fc", extra="transpose: true") + bn("bn", "fc", "fc")
    result = check(build(text, rng), rng)
    assert result.report["folded"] == {"fc": ["bn"]}


@pytest.mark.parametrize("bias", [True, False])
def test_lone_scale_folds(rng, bias):
    text = data(2, 3, 5, 5) + conv("c", "data", "c") + scale("s", "c", "s", bias) + relu("r", "s", "r")
    result = check(build(text, rng), rng)
    assert result.report["folded"] == {"c": ["s"]}
    assert types(result.param) == ["Input", "Convolution", "ReLU"]


def test_grouped_convolution_folds(rng):
    text = data(2, 4, 5, 5) + conv("c", "data", "c", n=6, extra="group: 2") + bn("b", "c", "c")
    assert check(build(text, rng), rng).report["folded"] == {"c": ["b"]}


def test_nothing_folds_where_the_conv_output_has_two_readers(rng):
    text = (data(2, 3, 5, 5) + conv("c", "data", "c") + bn("b", "c", "b") + relu("r", "c", "r")
            + layer("Eltwise", "sum", "b", "sum", 'bottom: "r"'))
    result = check(build(text, rng), rng)
    assert result.report["folded"] == {}
    assert types(result.param) == ["Input", "Convolution", "BatchNorm", "ReLU", "Eltwise"]


@pytest.mark.parametrize("text", [
    # batch statistics even at TEST
    data(2, 3, 5, 5) + conv("c", "data", "c") + bn("b", "c", "c", "batch_norm_param { use_global_stats: false }"),
    # a pooling between
    data(2, 3, 6, 6) + conv("c", "data", "c") + layer("Pooling", "p", "c", "p", "pooling_param { kernel_size: 2 }")
    + bn("b", "p", "b"),
    # the InnerProduct's outputs on axis 2, BatchNorm's channels on axis 1
    data(2, 3, 4) + ip("fc", "data", "fc", extra="axis: 2") + bn("b", "fc", "b"),
    # a scale over two axes
    data(2, 3, 4, 4) + conv("c", "data", "c") + layer("Scale", "s", "c", "s", "scale_param { num_axes: 2 }"),
    # weights shared with another layer
    data(2, 3, 4, 4) + bn("b", "c", "b").join(
        f'layer {{ name: "{c}" type: "Convolution" bottom: "data" top: "{c}" param {{ name: "w" }} '
        'convolution_param { num_output: 4 kernel_size: 1 } }\n' for c in ("c", "c2")),
])
def test_what_is_not_folded(rng, text):
    result = check(build(text, rng), rng)
    assert result.report["folded"] == {}


def test_only_test_nets_are_optimized(rng):
    net = build(data(2, 3) + ip("fc", "data", "fc"), rng, phase=caffe.TRAIN)
    with pytest.raises(EspressoError, match="only a TEST-phase net"):
        deploy.optimize(net)


def test_layer_names_must_be_unique(rng):
    net = build(data(2, 3) + relu("r", "data", "a") + relu("r", "a", "b"), rng)
    with pytest.raises(NetError, match=r"\['r'\] are used more than once"):
        deploy.optimize(net)


# *** Dropout ***
def test_dropout_is_removed_and_its_readers_rewired(rng):
    text = (data(3, 6) + ip("fc1", "data", "fc1") + relu("relu1", "fc1", "fc1")
            + layer("Dropout", "drop1", "fc1", "fc1") + ip("fc2", "fc1", "fc2")
            + layer("Dropout", "drop2", "fc2", "d2") + ip("fc3", "d2", "fc3")
            + layer("Dropout", "drop3", "fc3", "out"))
    result = check(build(text, rng), rng)
    assert result.report["removed"] == ["drop1", "drop2", "drop3"]
    assert types(result.param) == ["Input", "InnerProduct", "ReLU", "InnerProduct", "InnerProduct"]
    assert list(result.param.layer[-1].top) == ["out"]  # the output's name stays


def test_dropout_kept_where_it_is_no_identity_or_names_would_change(rng):
    text = (data(3, 6) + layer("Dropout", "scaled", "data", "a", "dropout_param { scale_train: false }")
            + layer("Dropout", "on_input", "data", "out1") + ip("fc", "data", "fc")
            + layer("Dropout", "read_twice", "fc", "out2") + relu("r", "fc", "out3"))
    result = check(build(text, rng), rng)
    assert result.report["removed"] == []


def test_dropout_removed_before_folding(rng):
    text = data(2, 3, 4, 4) + conv("c", "data", "c") + layer("Dropout", "d", "c", "d") + bn("b", "d", "b")
    result = check(build(text, rng), rng)
    assert result.report == {"removed": ["d"], "folded": {"c": ["b"]}, "in_place": [], "layers": [4, 2],
                             "params": [4 * 27 + 4 + 9, 4 * 27 + 4]}
    assert list(result.param.layer[1].top) == ["b"]


# *** in-place planning ***
def test_element_wise_layers_run_in_place_where_nothing_else_reads_their_bottom(rng):
    text = (data(2, 5) + ip("fc1", "data", "fc1") + relu("relu1", "fc1", "r1")  # -> in place
            + layer("Sigmoid", "sig", "r1", "s1")  # -> in place
            + ip("fc2", "s1", "fc2") + relu("relu2", "fc2", "r2") + ip("fc3", "fc2", "fc3")  # fc2 read twice
            + relu("relu_in", "data", "rd")  # the net's input
            + layer("Eltwise", "sum", "r2", "sum", 'bottom: "fc3" bottom: "rd"') + relu("relu_out", "sum", "prob"))
    result = check(build(text, rng), rng)
    assert result.report["in_place"] == ["relu1", "sig"]
    tops = {lp.name: (list(lp.bottom), list(lp.top)) for lp in result.param.layer}
    assert tops["relu1"] == (["fc1"], ["fc1"]) and tops["sig"] == (["fc1"], ["fc1"]) and tops["fc2"][0] == ["fc1"]
    assert tops["relu2"] == (["fc2"], ["r2"]) and tops["relu_in"] == (["data"], ["rd"])
    assert tops["relu_out"] == (["sum"], ["prob"])  # the output keeps its name


def test_layers_of_several_bottoms_are_left(rng):
    """Espresso's Eltwise SUM is safe in place; Caffe's zeroes its top before reading bottom 0."""
    text = data(2, 5) + ip("fc1", "data", "fc1") + ip("fc2", "data", "fc2")
    text += layer("Eltwise", "sum", "fc1", "sum", 'bottom: "fc2"') + relu("r", "sum", "r")
    assert check(build(text, rng), rng).report["in_place"] == []


def test_layers_that_copy_their_bottom_in_place_are_left(rng):
    """A leaky ReLU saves its bottom in every forward; a Scale copies it only for a backward,
    which the deploy net does not run, so it goes in place."""
    leaky = layer("ReLU", "leaky", "fc", "l", "relu_param { negative_slope: -0.5 }")  # keeps a copy of "fc"
    text = (data(2, 6) + ip("fc", "data", "fc") + leaky
            + layer("TanH", "tanh", "l", "t") + scale("s", "t", "s") + relu("r", "s", "r"))
    result = check(build(text, rng), rng)
    assert result.report["in_place"] == ["tanh", "s"]
    assert result.net.layer_dict["s"].temp.count == 1  # (shape (): never sized)


# *** files ***
def test_optimized_files_load_back_with_the_same_outputs(rng, tmp_path):
    text = (data(2, 3, 6, 6) + conv("conv1", "data", "conv1", extra="bias_term: false") + bn("bn1", "conv1", "conv1")
            + scale("scale1", "conv1", "conv1") + relu("relu1", "conv1", "conv1")
            + layer("Dropout", "drop", "conv1", "conv1") + ip("fc", "conv1", "fc")
            + layer("Softmax", "prob", "fc", "prob"))
    net = build(text, rng)
    result = check(net, rng)
    prototxt, weights = tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel"
    prototxt.write_text(to_text(result.param))
    result.net.save(str(weights))
    loaded = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    feeds = {"data": rng.standard_normal((2, 3, 6, 6))}
    assert_same(outputs(loaded, feeds), outputs(net, feeds))
    assert types(read_net_text(str(prototxt))[0]) == ["Input", "Convolution", "ReLU", "InnerProduct", "Softmax"]


def resnet_block(n=8):
    """A ResNet basic block with a projection shortcut, every BatchNorm/Scale/ReLU in place,
    as Caffe's ResNet prototxts write it, then pooling, a classifier and softmax."""
    text = data(2, 4, 12, 12) + conv("conv1", "data", "conv1", n, "bias_term: false")
    text += bn("bn1", "conv1", "conv1") + scale("scale1", "conv1", "conv1") + relu("relu1", "conv1", "conv1")
    for branch, bottom in (("2a", "conv1"), ("2b", "res2a")):
        text += conv(f"res{branch}", bottom, f"res{branch}", n, "bias_term: false")
        text += bn(f"bn{branch}", f"res{branch}", f"res{branch}") + scale(f"sc{branch}", f"res{branch}", f"res{branch}")
        if branch == "2a":
            text += relu("relu2a", "res2a", "res2a")
    text += conv("proj", "conv1", "proj", n, "bias_term: false")
    text += bn("bnp", "proj", "proj") + scale("scp", "proj", "proj")
    text += layer("Eltwise", "res2", "res2b", "res2", 'bottom: "proj"') + relu("relu2", "res2", "res2")
    text += layer("Pooling", "pool", "res2", "pool", "pooling_param { pool: AVE global_pooling: true }")
    return text + ip("fc", "pool", "fc", 10) + layer("Softmax", "prob", "fc", "prob")


def test_resnet_block(rng):
    net = build(resnet_block(), rng)
    result = check(net, rng)
    assert result.report["folded"] == {"conv1": ["bn1", "scale1"], "res2a": ["bn2a", "sc2a"],
                                       "res2b": ["bn2b", "sc2b"], "proj": ["bnp", "scp"]}
    assert types(result.param).count("BatchNorm") == types(result.param).count("Scale") == 0
    timing = deploy.measure(net, result.net, runs=3, warmup=1)
    assert timing["max_error"] < 2e-6 and timing["before_ms"] > 0 and timing["after_ms"] > 0


def test_zoo_cifar10_batchnorm_net(zoo, rng):
    """Caffe's only zoo net with BatchNorm: conv1 -> pool1 -> bn1 keeps bn1; conv2/conv3 fold."""
    param, _ = read_net_text(str(zoo / "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt"))
    for lp in param.layer:
        if lp.type == "Data":  # the LMDB data in, as inputs
            lp.type, lp.top[:] = "Input", ["data", "label"]
            lp.ClearField("data_param")
            lp.ClearField("transform_param")
            lp.input_param.shape.add().dim.extend([5, 3, 32, 32])
            lp.input_param.shape.add().dim.extend([5])
    net = build(to_text(param), rng)
    feeds = {"data": rng.standard_normal((5, 3, 32, 32)), "label": rng.integers(0, 10, 5).astype(float)}
    result = check(net, rng, feeds)
    expected = net.blobs["ip1"].data
    np.testing.assert_allclose(result.net.blobs["ip1"].data, expected, atol=2e-6 * np.abs(expected).max())
    assert result.report["folded"] == {"conv2": ["bn2"], "conv3": ["bn3"]}
    assert types(result.param).count("BatchNorm") == 1
    assert result.report["in_place"] == ["bn1", "Sigmoid1", "Sigmoid2", "Sigmoid3"]



def test_espresso_optimize_writes_the_folded_net_and_its_weights(rng, tmp_path, capsys):
    from espresso import cli

    text = (data(2, 3, 6, 6) + conv("conv1", "data", "conv1", extra="bias_term: false")
            + bn("bn1", "conv1", "conv1") + scale("scale1", "conv1", "conv1") + relu("relu1", "conv1", "conv1"))
    (tmp_path / "net.prototxt").write_text(text)
    net = build(text, rng)
    net.save(str(tmp_path / "w.caffemodel"))
    args = ["optimize", "--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
            "-o", str(tmp_path / "opt.prototxt"), "--output-weights", str(tmp_path / "opt.caffemodel"), "--time", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "layers 5 -> 3" in out and "folded: bn1, scale1 into conv1" in out and "ms (" in out
    optimized = caffe.Net(str(tmp_path / "opt.prototxt"), caffe.TEST, weights=str(tmp_path / "opt.caffemodel"))
    feeds = {"data": rng.standard_normal((2, 3, 6, 6))}
    assert_same(outputs(optimized, feeds), outputs(net, feeds))
