"""ONNX export against ONNX Runtime: one small net per mapped layer and option (Pooling's ceil
rounding edge cases among them), every deploy net of Caffe's zoo with random weights, a batch
other than the exported one, and the refusals.  ONNX Runtime's outputs must match Espresso's
forward within 1e-4 of the output's largest magnitude."""

import re

import numpy as np
import pytest

import espresso as caffe
from espresso.errors import EspressoError, NetError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from espresso.interop.onnx_export import export_onnx, to_onnx_model  # noqa: E402

TOLERANCE = 1e-4


# *** helpers ***
def layer(type_, params="", bottoms=("data",), tops=("out",), name="l"):
    wiring = "".join(f'bottom: "{b}" ' for b in bottoms) + "".join(f'top: "{t}" ' for t in tops)
    return f'layer {{ name: "{name}" type: "{type_}" {wiring}{params} }}\n'


def build(layers, inputs):
    """A TEST net of Input layers of the given {name: shape} and then `layers`, its weights random."""
    text = "".join(layer("Input", "input_param { shape { %s } }" % " ".join(f"dim: {d}" for d in shape),
                         (), (name,), name) for name, shape in inputs.items())
    net = caffe.Net(parse_text(text + layers, caffe_pb2.NetParameter()), caffe.TEST)
    fill(net, np.random.default_rng(7))
    return net


def fill(net, rng):
    """Random weights, never zero, of a size that keeps activations near 1; BatchNorm's variances
    and scale factor positive."""
    for name, blobs in net.params.items():
        for k, blob in enumerate(blobs):
            shape = blob.data.shape
            fan_in = blob.data.size // shape[0] if len(shape) > 1 else 1
            values = rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape) / np.sqrt(fan_in)
            blob.data[...] = np.abs(values) if net.layer_dict[name].type == "BatchNorm" and k else values


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a small shared machine
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_feeds(net, rng, feeds):
    """A random array per net input; `feeds` (name -> function(rng, shape)) makes some otherwise."""
    made = {}
    for name in net.inputs:
        shape = net.blobs[name].data.shape
        make = feeds.get(name, lambda r, s: r.standard_normal(s))
        made[name] = np.asarray(make(rng, shape), np.float32)
    return made


def assert_matches(net, runner, rng, feeds=None):
    """ONNX Runtime's outputs equal Espresso's forward, by name, for random inputs."""
    inputs = random_feeds(net, rng, feeds or {})
    expected = {name: value.copy() for name, value in net.forward(**inputs).items()}
    got = dict(zip([o.name for o in runner.get_outputs()], runner.run(None, inputs), strict=True))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, (name, got[name].shape, want.shape)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=TOLERANCE * np.abs(want).max(), err_msg=name)


def set_batch(net, batch):
    for name in net.inputs:
        net.blobs[name].reshape((batch,) + net.blobs[name].shape[1:])
    net.reshape()


def labels(classes):
    return lambda rng, shape: rng.integers(0, classes, shape)


# *** one net per layer and option ***
IMAGE = {"data": (2, 3, 7, 7)}
TWO = {"data": (2, 3, 7, 7), "data2": (2, 3, 7, 7)}
THREE = {"data": (2, 3, 7, 7), "data2": (2, 3, 7, 7), "data3": (2, 3, 7, 7)}
B2 = ("data", "data2")
LOSS = {"data": (2, 5), "label": (2,)}
SPATIAL_LOSS = {"data": (2, 4, 3, 3), "label": (2, 3, 3)}
TIES = {"data": lambda rng, shape: rng.integers(0, 3, shape)}  # many equal scores


def conv(params, type_="Convolution"):
    return layer(type_, f"convolution_param {{ {params} }}")


CASES = {
    # vision
    "conv": (conv("num_output: 4 kernel_size: 3"), IMAGE),
    "conv_group_dilation_pad_stride": (conv("num_output: 6 kernel_size: 3 group: 3 dilation: 2 pad: 2 stride: 2"),
                                       IMAGE),
    "conv_hw_no_bias": (conv("num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 "
                             "bias_term: false"), IMAGE),
    "conv_two_bottoms": (layer("Convolution", "convolution_param { num_output: 2 kernel_size: 2 }", B2,
                               ("out", "out2")), TWO),
    "deconv": (conv("num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 3", "Deconvolution"), IMAGE),
    "deconv_hw_dilation_no_bias": (conv("num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 dilation: 2 "
                                        "bias_term: false", "Deconvolution"), IMAGE),
    "lrn_across": (layer("LRN", "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }"), {"data": (2, 7, 4, 4)}),
    "lrn_within": (layer("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
                   IMAGE),
    "crop": (layer("Crop", "crop_param { axis: 2 offset: 1 offset: 2 }", ("data", "ref")),
             {"data": (2, 3, 7, 7), "ref": (2, 3, 4, 5)}),
    "crop_one_offset": (layer("Crop", "crop_param { axis: 1 offset: 1 }", ("data", "ref")),
                        {"data": (2, 3, 7, 7), "ref": (2, 2, 5, 5)}),
    # neurons
    "relu": (layer("ReLU"), IMAGE),
    "relu_slope": (layer("ReLU", "relu_param { negative_slope: 0.1 }"), IMAGE),
    "prelu": (layer("PReLU"), IMAGE),
    "prelu_shared": (layer("PReLU", "prelu_param { channel_shared: true }"), IMAGE),
    "elu": (layer("ELU", "elu_param { alpha: 0.5 }"), IMAGE),
    "sigmoid": (layer("Sigmoid"), IMAGE),
    "tanh": (layer("TanH"), IMAGE),
    "absval": (layer("AbsVal"), IMAGE),
    "power": (layer("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"), IMAGE),
    "power_root": (layer("Power", "power_param { power: 0.5 scale: 0.5 shift: 4 }"), IMAGE),
    "power_affine": (layer("Power", "power_param { scale: 2 shift: -1 }"), IMAGE),
    "exp": (layer("Exp"), IMAGE),
    "exp_base_scale_shift": (layer("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }"), IMAGE),
    "log": (layer("Log", "log_param { shift: 5 }"), IMAGE),
    "log_base_scale_shift": (layer("Log", "log_param { base: 10 scale: 0.5 shift: 6 }"), IMAGE),
    "bnll_large": (layer("BNLL"), IMAGE, {"data": lambda rng, shape: 60 * rng.standard_normal(shape)}),
    "threshold": (layer("Threshold", "threshold_param { threshold: 0.3 }"), IMAGE),
    "clip": (layer("Clip", "clip_param { min: -0.5 max: 0.7 }"), IMAGE),
    "swish": (layer("Swish"), IMAGE),
    "swish_beta": (layer("Swish", "swish_param { beta: 1.5 }"), IMAGE),
    "dropout": (layer("Dropout", "dropout_param { dropout_ratio: 0.3 }"), IMAGE),
    "dropout_unscaled": (layer("Dropout", "dropout_param { dropout_ratio: 0.3 scale_train: false }"), IMAGE),
    # common
    "inner_product": (layer("InnerProduct", "inner_product_param { num_output: 5 }"), IMAGE),
    "inner_product_axis2": (layer("InnerProduct", "inner_product_param { num_output: 5 axis: 2 }"), IMAGE),
    "inner_product_transpose_no_bias": (layer("InnerProduct", "inner_product_param { num_output: 5 transpose: true "
                                              "bias_term: false }"), {"data": (2, 10)}),
    "softmax": (layer("Softmax"), IMAGE),
    "softmax_last_axis": (layer("Softmax", "softmax_param { axis: -1 }"), IMAGE),
    "eltwise_sum_coeff": (layer("Eltwise", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }", B2), TWO),
    "eltwise_sum": (layer("Eltwise", "", B2), TWO),
    "eltwise_prod": (layer("Eltwise", "eltwise_param { operation: PROD }", ("data", "data2", "data3")), THREE),
    "eltwise_max": (layer("Eltwise", "eltwise_param { operation: MAX }", ("data", "data2", "data3")), THREE),
    "argmax": (layer("ArgMax"), IMAGE, TIES),
    "argmax_top3_values": (layer("ArgMax", "argmax_param { top_k: 3 out_max_val: true }"), IMAGE, TIES),
    "argmax_axis": (layer("ArgMax", "argmax_param { axis: 1 top_k: 2 }"), IMAGE, TIES),
    "argmax_axis_values": (layer("ArgMax", "argmax_param { axis: 2 out_max_val: true }"), IMAGE, TIES),
    "reduction_sum_all": (layer("Reduction"), IMAGE),
    "reduction_asum": (layer("Reduction", "reduction_param { operation: ASUM axis: 1 }"), IMAGE),
    "reduction_sumsq": (layer("Reduction", "reduction_param { operation: SUMSQ axis: 2 coeff: 0.5 }"), IMAGE),
    "reduction_mean": (layer("Reduction", "reduction_param { operation: MEAN axis: -1 coeff: 2 }"), IMAGE),
    # utility
    "concat": (layer("Concat", "", B2), {"data": (2, 3, 7, 7), "data2": (2, 2, 7, 7)}),
    "concat_axis2": (layer("Concat", "concat_param { axis: 2 }", B2), {"data": (2, 3, 7, 7), "data2": (2, 3, 2, 7)}),
    "concat_one": (layer("Concat"), IMAGE),
    "slice_point": (layer("Slice", "slice_param { slice_point: 1 }", ("data",), ("a", "b")), IMAGE),
    "slice_equal": (layer("Slice", "slice_param { axis: 2 }", ("data",), ("a", "b", "c")), {"data": (2, 3, 6, 7)}),
    "slice_dim_points": (layer("Slice", "slice_param { slice_dim: 3 slice_point: 2 slice_point: 5 }", ("data",),
                               ("a", "b", "c")), IMAGE),
    "slice_one": (layer("Slice"), IMAGE),
    "split": (layer("ReLU", "", ("data",), ("r",), "r") + layer("Sigmoid", "", ("data",), ("s",), "s")
              + layer("Eltwise", "", ("r", "s")), IMAGE),
    "in_place": (layer("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }", tops=("c",))
                 + layer("ReLU", "", ("c",), ("c",), "relu") + layer("Dropout", "", ("c",), ("c",), "drop")
                 + layer("Sigmoid", "", ("c",), ("d",), "sig") + layer("TanH", "", ("d",), ("d",), "tanh"), IMAGE),
    "in_place_on_input": (layer("Power", "power_param { scale: 2 }", ("data",), ("data",), "double")
                          + layer("Sigmoid"), IMAGE),
    "flatten": (layer("Flatten"), IMAGE),
    "flatten_axis2": (layer("Flatten", "flatten_param { axis: 2 }"), IMAGE),
    "flatten_middle": (layer("Flatten", "flatten_param { axis: 1 end_axis: 2 }"), IMAGE),
    "reshape_copy_infer": (layer("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 7 } }"), IMAGE),
    "reshape_axis_num_axes": (layer("Reshape", "reshape_param { shape { dim: 3 dim: 1 } axis: 1 num_axes: 1 }"),
                              IMAGE),
    "reshape_all": (layer("Reshape", "reshape_param { shape { dim: -1 } }"), IMAGE),
    "tile": (layer("Tile", "tile_param { axis: 1 tiles: 3 }"), IMAGE),
    "silence": (layer("Silence", "", ("data2",), ()) + layer("ReLU"), TWO),
    # normalization
    "batch_norm": (layer("BatchNorm", "batch_norm_param { eps: 0.001 }"), IMAGE),
    "batch_norm_2d": (layer("BatchNorm"), {"data": (2, 5)}),
    "batch_norm_batch_statistics": (layer("BatchNorm", "batch_norm_param { use_global_stats: false }"), IMAGE),
    "scale": (layer("Scale", "scale_param { bias_term: true }"), IMAGE),
    "scale_two_axes": (layer("Scale", "scale_param { num_axes: 2 }"), IMAGE),
    "scale_scalar": (layer("Scale", "scale_param { num_axes: 0 bias_term: true }"), IMAGE),
    "scale_bottom": (layer("Scale", "scale_param { axis: 0 }", ("data", "s")), {"data": (2, 3, 7, 7), "s": (2, 3)}),
    "bias": (layer("Bias"), IMAGE),
    "bias_bottom": (layer("Bias", "bias_param { axis: 0 }", ("data", "s")), {"data": (2, 3, 7, 7), "s": (2, 3)}),
    # loss and accuracy
    "softmax_loss": (layer("SoftmaxWithLoss", "", ("data", "label")), LOSS, {"label": labels(5)}),
    "softmax_loss_ignore_prob": (layer("SoftmaxWithLoss", "loss_weight: 1 loss_weight: 0 "
                                       "loss_param { ignore_label: 2 }", ("data", "label"), ("loss", "prob")),
                                 {"data": (4, 5), "label": (4,)}, {"label": labels(5)}),
    "softmax_loss_spatial_full": (layer("SoftmaxWithLoss", "loss_param { normalization: FULL ignore_label: 1 }",
                                        ("data", "label")), SPATIAL_LOSS, {"label": labels(4)}),
    "softmax_loss_batch_size": (layer("SoftmaxWithLoss", "loss_param { normalization: BATCH_SIZE }",
                                      ("data", "label")), SPATIAL_LOSS, {"label": labels(4)}),
    "softmax_loss_none_axis": (layer("SoftmaxWithLoss", "loss_param { normalization: NONE } softmax_param { axis: 2 }",
                                     ("data", "label")), {"data": (2, 3, 4), "label": (2, 3)}, {"label": labels(4)}),
    "accuracy": (layer("Accuracy", "", ("data", "label")), LOSS, {"label": labels(5)}),
    "accuracy_top2_ties": (layer("Accuracy", "accuracy_param { top_k: 2 }", ("data", "label")), {
        "data": (6, 5), "label": (6,)}, {"label": labels(5), **TIES}),
    "accuracy_spatial_ignore": (layer("Accuracy", "accuracy_param { ignore_label: 0 }", ("data", "label")),
                                SPATIAL_LOSS, {"label": labels(4)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_onnx_runtime_at_the_exported_batch_and_another(case, rng):
    layers, inputs, *feeds = CASES[case]
    net = build(layers, inputs)
    runner = session(to_onnx_model(net))
    assert_matches(net, runner, rng, *feeds)
    set_batch(net, 3)
    assert_matches(net, runner, rng, *feeds)


# Pooling: (params, input H x W, Caffe's output H x W); comments give ONNX's floor output where it differs
POOLS = {
    "ceil": ("kernel_size: 3 stride: 2", (6, 6), (3, 3)),  # floor 2
    "ceil_pad": ("kernel_size: 3 stride: 2 pad: 1", (6, 6), (4, 4)),  # floor 3; the last window is clipped
    "ceil_pad_last_window_dropped": ("kernel_size: 2 stride: 2 pad: 1", (5, 5), (3, 3)),  # ceil 4 starts in the pad
    "ceil_equals_floor": ("kernel_size: 3 stride: 2 pad: 1", (7, 7), (4, 4)),
    "clipped_window_no_pad": ("kernel_size: 3 stride: 3", (7, 7), (3, 3)),  # floor 2; the last window has 1 cell
    "stride_1_pad": ("kernel_size: 2 stride: 1 pad: 1", (4, 4), (5, 5)),
    # pad_h alone makes Caffe check the unpadded w axis too: ceil 3 drops to 2 there
    "hw_pad_h_only": ("kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0", (6, 5), (4, 2)),
    "floor_round_mode": ("kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (6, 6), (3, 3)),
    "global": ("global_pooling: true", (6, 5), (1, 1)),
}


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("case", sorted(POOLS))
def test_pooling_matches_caffe_rounding_and_divisor(case, pool, rng):
    params, size, out = POOLS[case]
    net = build(layer("Pooling", f"pooling_param {{ pool: {pool} {params} }}"), {"data": (2, 3, *size)})
    assert net.blobs["out"].shape == (2, 3, *out)
    runner = session(to_onnx_model(net))
    assert_matches(net, runner, rng)
    set_batch(net, 1)
    assert_matches(net, runner, rng)


def test_batch_norm_with_a_zero_scale_factor_uses_zero_statistics(rng):
    net = build(layer("BatchNorm"), IMAGE)
    net.params["l"][2].data[...] = 0
    assert_matches(net, session(to_onnx_model(net)), rng)


MIXED = (layer("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }", tops=("c",), name="conv")
         + layer("BatchNorm", "batch_norm_param { use_global_stats: false }", ("c",), ("c",), "bn")
         + layer("Pooling", "pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }", ("c",), ("p",), "pool")
         + layer("Slice", "slice_param { slice_point: 1 }", ("p",), ("p1", "p2"), "slice")
         + layer("Concat", "", ("p2", "p1"), ("cat",), "cat")
         + layer("InnerProduct", "inner_product_param { num_output: 6 }", ("cat",), ("ip",), "ip")
         + layer("Softmax", "", ("ip",), ("prob",), "prob")
         + layer("ArgMax", "argmax_param { top_k: 2 }", ("ip",), ("top",), "top"))


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_opsets_whose_op_forms_differ(opset, rng):
    net = build(MIXED, IMAGE)
    assert_matches(net, session(to_onnx_model(net, opset)), rng)


# *** Caffe's zoo ***
DEPLOY = {  # deploy net -> batch (1 for the large ImageNet nets)
    "examples/mnist/lenet.prototxt": 2,
    "examples/cifar10/cifar10_quick.prototxt": 2,
    "examples/cifar10/cifar10_full.prototxt": 2,
    "examples/siamese/mnist_siamese.prototxt": 2,
    "examples/net_surgery/conv.prototxt": 2,
    "examples/net_surgery/bvlc_caffenet_full_conv.prototxt": 1,
    "fmnist/lenet_deploy_with_loss.prototxt": 2,
    "models/bvlc_googlenet/deploy.prototxt": 1,
    "models/bvlc_reference_caffenet/deploy.prototxt": 1,
    "models/bvlc_alexnet/deploy.prototxt": 1,
    "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt": 1,
    "models/finetune_flickr_style/deploy.prototxt": 1,
}
# the other AlexNet-shaped nets (about 5 s each here): CaffeNet's run stands for them outside -m slow
SLOW = {"examples/net_surgery/bvlc_caffenet_full_conv.prototxt", "models/bvlc_alexnet/deploy.prototxt",
        "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt", "models/finetune_flickr_style/deploy.prototxt"}


def test_every_deploy_net_of_the_zoo_is_exported_here(zoo):
    found = {str(path.relative_to(zoo)) for path in zoo.rglob("*.prototxt")
             if re.search(r'type:\s*"Input"', path.read_text())}
    assert found == set(DEPLOY)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DEPLOY])
def test_zoo_deploy_net_exports_and_matches_onnx_runtime(zoo, name, rng, tmp_path):
    net = caffe.Net(str(zoo / name), caffe.TEST)
    set_batch(net, DEPLOY[name])
    fill(net, rng)
    path = tmp_path / "net.onnx"
    export_onnx(net, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert_matches(net, session(path), rng, {"label": labels(10)})


# *** names, batch, refusals ***
def test_names_are_the_blobs_and_the_batch_is_symbolic():
    net = build(CASES["in_place"][0], IMAGE)
    model = to_onnx_model(net)
    graph = model.graph
    assert [i.name for i in graph.input] == ["data"] and [o.name for o in graph.output] == ["d"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert {i.name for i in graph.initializer} >= {"l.0", "l.1"}
    assert "c" in {name for node in graph.node for name in node.output}  # the last writer of c keeps its name


def test_an_unknown_layer_type_is_refused_and_nothing_is_written(tmp_path):
    net = build(layer("ReLU", tops=("r",), name="relu") + layer("MVN", "", ("r",), name="norm"), IMAGE)
    with pytest.raises(NetError, match=r"layer 'norm' \(MVN\): no ONNX export for layer type 'MVN'"):
        export_onnx(net, tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.onnx").write_bytes(b"earlier")  # a file already there stays as it was
    with pytest.raises(NetError):
        export_onnx(net, tmp_path / "old.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["old.onnx"] and (tmp_path / "old.onnx").read_bytes() == b"earlier"


@pytest.mark.parametrize("layers, inputs, match", [
    (layer("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }"), IMAGE, "STOCHASTIC"),
    (layer("Pooling", "pooling_param { pool: MAX kernel_size: 2 }", tops=("out", "mask")), IMAGE, "argmax mask"),
    (layer("Accuracy", "", ("data", "label"), ("acc", "per_class")), LOSS, "per-class"),
    (layer("Convolution", "convolution_param { num_output: 2 kernel_size: 2 axis: 2 }"), {"data": (2, 3, 4, 5, 5)},
     "axis 2"),
    (layer("Dropout", "phase: TRAIN"), IMAGE, "TRAIN phase"),
], ids=["stochastic_pooling", "pooling_mask", "per_class_accuracy", "convolution_axis", "train_phase_dropout"])
def test_options_onnx_cannot_express_are_refused(layers, inputs, match, tmp_path):
    net = build(layers, inputs)
    with pytest.raises(NetError, match=f"layer 'l' .*cannot be exported to ONNX: .*{match}"):
        export_onnx(net, tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def test_train_nets_and_unknown_opsets_are_refused():
    text = layer("Input", "input_param { shape { dim: 2 dim: 3 } }", (), ("data",), "data") + layer("ReLU")
    train = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN)
    with pytest.raises(NetError, match="TRAIN phase"):
        to_onnx_model(train)
    test = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)
    with pytest.raises(EspressoError, match="opset 12 is not supported"):
        to_onnx_model(test, 12)
