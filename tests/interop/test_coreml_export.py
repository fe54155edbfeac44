"""Core ML export, checked on Linux, where Core ML itself cannot run a model.

The numbers: a converted ML Program is evaluated op by op (evaluate below), each op rebuilt on
constant inputs so that coremltools computes it with its own value inference (its NumPy
definition of the op); the ops coremltools has no such definition for (conv, conv_transpose,
max_pool, avg_pool, local_response_norm and the resizes) by REFERENCES, written here from the MIL
op documentation with torch.  One net per mapped layer and option, Pooling's ceil-rounding cases,
and the deploy nets of Caffe's zoo must match Espresso's forward within 1e-4 of the output's
largest magnitude (1e-2 in float16).  What Core ML computes on a device is checked only on a Mac:
tools/check_coreml_on_mac.py.

The files: saved .mlpackage directories load back (skip_model_load) with the expected ops, input
and output features, weights equal to Caffe's bit for bit (float32) or after float16 rounding,
image preprocessing and class labels; updatable models have the layers, loss and optimizer
Core ML's validator asks for.  Refusals name the layer and write nothing.
"""

import collections
import contextlib
import gc
import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import espresso as caffe
from espresso.errors import EspressoError, NetError
from espresso.interop import coreml_export
from espresso.interop.coreml_export import export_coreml, to_coreml_model
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as load_mil  # noqa: E402
from coremltools.converters.mil.mil import Function  # noqa: E402

F = torch.nn.functional
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def _old_objects_set_aside():
    """ct.convert ends in gc.collect(), which costs more the more objects the process holds (torch's
    among them): those already there are set aside (gc.freeze) for this module's hundred conversions."""
    gc.freeze()
    yield
    gc.unfreeze()


# *** building nets ***
def layer(type_, params="", bottoms=("data",), tops=("out",), name="l"):
    wiring = "".join(f'bottom: "{b}" ' for b in bottoms) + "".join(f'top: "{t}" ' for t in tops)
    return f'layer {{ name: "{name}" type: "{type_}" {wiring}{params} }}\n'


def net_text(layers, inputs):
    """Input layers of the given {name: shape}, then `layers`."""
    return "".join(layer("Input", "input_param { shape { %s } }" % " ".join(f"dim: {d}" for d in shape),
                         (), (name,), name) for name, shape in inputs.items()) + layers


def build(layers, inputs):
    """The net of net_text(layers, inputs), its weights random."""
    net = caffe.Net(parse_text(net_text(layers, inputs), caffe_pb2.NetParameter()), caffe.TEST)
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


def set_batch(net, batch):
    for name in net.inputs:
        net.blobs[name].reshape((batch,) + net.blobs[name].shape[1:])
    net.reshape()


# *** evaluating a MIL program ***
def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))


def _back(y, like):
    return y.numpy().astype(np.asarray(like).dtype)  # float16 programs stay float16


def _torch_pad(pad):
    """MIL's (begin, end) per axis from the first spatial axis, as torch's from the last."""
    return [int(q) for begin, end in reversed(list(zip(pad[0::2], pad[1::2], strict=True))) for q in (begin, end)]


def _conv(x, weight, strides, dilations, groups, pad=None, bias=None, pad_type="valid"):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.ndim - 2]
    xt = _t(x) if pad is None else F.pad(_t(x), _torch_pad(pad))
    bias = None if bias is None else _t(bias)
    return _back(conv(xt, _t(weight), bias, tuple(strides), 0, tuple(dilations), int(groups)), x)


def _conv_transpose(x, weight, strides, dilations, groups, pad, bias=None, pad_type="custom", output_shape=None):
    assert list(pad[0::2]) == list(pad[1::2]), "Caffe pads both ends alike"
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.ndim - 2]
    bias = None if bias is None else _t(bias)
    return _back(conv(_t(x), _t(weight), bias, tuple(strides), tuple(pad[0::2]), 0, int(groups), tuple(dilations)), x)


def _max_pool(x, kernel_sizes, strides, pad, pad_type, ceil_mode):
    assert not ceil_mode
    return _back(F.max_pool2d(F.pad(_t(x), _torch_pad(pad), value=-np.inf), tuple(kernel_sizes), tuple(strides)), x)


def _avg_pool(x, kernel_sizes, strides, pad, pad_type, ceil_mode, exclude_padding_from_average):
    """Sums over windows of x padded with zeros, over the window's size or its cells inside x."""
    assert not ceil_mode
    window = math.prod(kernel_sizes)

    def sums(a):
        return F.avg_pool2d(F.pad(a, _torch_pad(pad)), tuple(kernel_sizes), tuple(strides)) * window

    xt = _t(x)
    count = sums(torch.ones_like(xt)) if exclude_padding_from_average else window
    return _back(sums(xt) / count, x)


def _lrn(x, size, alpha, beta, k):
    return _back(F.local_response_norm(_t(x), int(size), float(alpha), float(beta), float(k)), x)


def _upsample_nearest(x, scale_factor_height, scale_factor_width):
    return np.repeat(np.repeat(x, int(scale_factor_height), -2), int(scale_factor_width), -1)


def _resize_bilinear(x, target_size_height, target_size_width, sampling_mode):
    """MIL's grid points: STRICT_ALIGN_CORNERS i (in - 1) / (out - 1); UNALIGN_CORNERS (i + 0.5) in / out
    - 0.5; clipped to [0, in - 1], then linear between the two neighbours."""
    y = np.asarray(x, np.float64)
    for axis, size in ((-2, int(target_size_height)), (-1, int(target_size_width))):
        n, i = y.shape[axis], np.arange(size, dtype=np.float64)
        if sampling_mode == "STRICT_ALIGN_CORNERS":
            src = i * ((n - 1) / (size - 1)) if size > 1 else np.zeros(size)
        else:
            assert sampling_mode == "UNALIGN_CORNERS"
            src = (i + 0.5) * (n / size) - 0.5
        src = np.clip(src, 0, n - 1)
        low = np.floor(src).astype(np.int64)
        frac = (src - low).reshape((-1,) + (1,) * (-axis - 1))
        y = np.take(y, low, axis) * (1 - frac) + np.take(y, np.minimum(low + 1, n - 1), axis) * frac
    return y.astype(np.asarray(x).dtype)


def _silu(x):  # coremltools fuses x * sigmoid(x) into it
    return x / (1 + np.exp(-x))


REFERENCES = {"conv": _conv, "conv_transpose": _conv_transpose, "max_pool": _max_pool, "avg_pool": _avg_pool,
              "local_response_norm": _lrn, "upsample_nearest_neighbor": _upsample_nearest,
              "resize_bilinear": _resize_bilinear, "silu": _silu}


def evaluate(program, feeds):
    """Every value of the program's main function (by name) for `feeds` (input name -> array)."""
    main = program.functions["main"]
    values = {name: np.asarray(value) for name, value in feeds.items()}
    with Function({}, opset_version=main.opset_version):  # a scratch function for the rebuilt ops
        for op in main.operations:
            if op.op_type == "const":
                values[op.outputs[0].name] = op.outputs[0].val
                continue
            if op.op_type == "classify":  # the probabilities are its input
                continue
            args = {key: [values[v.name] for v in var] if isinstance(var, (list, tuple)) else values[var.name]
                    for key, var in op.inputs.items()}
            if op.op_type in REFERENCES:
                results = [REFERENCES[op.op_type](**args)]
            else:
                made = getattr(mb, op.op_type)(**args)
                results = [var.val for var in (made if isinstance(made, (list, tuple)) else [made])]
                assert all(result is not None for result in results), f"no value inference for {op.op_type}"
            values.update((var.name, result) for var, result in zip(op.outputs, results, strict=True))
    return values


def random_feeds(net, rng, feeds=None):
    feeds = feeds or {}
    return {name: np.asarray(feeds.get(name, lambda r, s: r.standard_normal(s))(rng, net.blobs[name].shape),
                             np.float32) for name in net.inputs}


def assert_close(got, want, tolerance, name):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tolerance * np.abs(want).max(),
                               err_msg=name)


def feature(name):
    """A blob's name as Core ML names its feature."""
    return re.sub(r"\W", "_", name)


def assert_matches(net, program, rng, feeds=None, precision="float32"):
    """The program's outputs (by the net's output names) equal Espresso's forward for random inputs."""
    inputs = random_feeds(net, rng, feeds)
    expected = {name: value.copy() for name, value in net.forward(**inputs).items()}
    values = evaluate(program, {feature(name): value for name, value in inputs.items()})
    for name, want in expected.items():
        assert_close(values[feature(name)], want, TOLERANCE[precision], name)


def saved_program(path):
    """The MIL program of a saved .mlpackage, its weights read from the package."""
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return load_mil(spec, spec.specificationVersion, model.weights_dir), spec


def op_counts(program, skip=("const",)):
    return collections.Counter(op.op_type for op in program.functions["main"].operations if op.op_type not in skip)


# *** one net per layer and option ***
IMAGE = {"data": (2, 3, 7, 7)}
TWO = {"data": (2, 3, 7, 7), "data2": (2, 3, 7, 7)}
THREE = {"data": (2, 3, 7, 7), "data2": (2, 3, 7, 7), "data3": (2, 3, 7, 7)}
B2 = ("data", "data2")


def conv(params, type_="Convolution"):
    return layer(type_, f"convolution_param {{ {params} }}")


CASES = {
    # vision
    "conv": (conv("num_output: 4 kernel_size: 3"), IMAGE),
    "conv_group_dilation_pad_stride": (conv("num_output: 6 kernel_size: 3 group: 3 dilation: 2 pad: 2 stride: 2"),
                                       IMAGE),
    "conv_hw_no_bias": (conv("num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 "
                             "bias_term: false"), IMAGE),
    "conv_1d": (conv("num_output: 4 kernel_size: 3 pad: 1"), {"data": (2, 3, 9)}),
    "conv_3d": (conv("num_output: 2 kernel_size: 2 stride: 2"), {"data": (1, 2, 4, 4, 4)}),
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
    "prelu_2d": (layer("PReLU"), {"data": (2, 5)}),
    "elu": (layer("ELU", "elu_param { alpha: 0.5 }"), IMAGE),
    "sigmoid": (layer("Sigmoid"), IMAGE),
    "tanh": (layer("TanH"), IMAGE),
    "absval": (layer("AbsVal"), IMAGE),
    "power": (layer("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"), IMAGE),
    "power_root": (layer("Power", "power_param { power: 0.5 scale: 0.5 shift: 4 }"), IMAGE),
    "power_cube": (layer("Power", "power_param { power: 3 shift: -0.5 }"), IMAGE),
    "power_affine": (layer("Power", "power_param { scale: 2 shift: -1 }"), IMAGE),
    "exp": (layer("Exp"), IMAGE),
    "exp_base_scale_shift": (layer("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }"), IMAGE),
    "log": (layer("Log", "log_param { shift: 5 }"), IMAGE),
    "log_base_scale_shift": (layer("Log", "log_param { base: 10 scale: 0.5 shift: 6 }"), IMAGE),
    "bnll_large": (layer("BNLL"), IMAGE, {"data": lambda rng, shape: 60 * rng.standard_normal(shape)}),
    "threshold": (layer("Threshold", "threshold_param { threshold: 0.3 }"), IMAGE),
    "clip": (layer("Clip", "clip_param { min: -0.5 max: 0.7 }"), IMAGE),
    "clip_min_above_max": (layer("Clip", "clip_param { min: 0.5 max: -0.5 }"), IMAGE),
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
    # Espresso's own
    "permute": (layer("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }"), IMAGE),
    "pad_constant": (layer("Pad", "pad_param { pad: [0, 1, 2, 0, 0, 0, 1, 3] value: 1.5 }"), IMAGE),
    "pad_reflect": (layer("Pad", 'pad_param { pad: [0, 0, 2, 1, 0, 0, 1, 3] mode: "reflect" }'), IMAGE),
    "pad_edge": (layer("Pad", 'pad_param { pad: [0, 0, 3, 0, 0, 0, 1, 2] mode: "edge" }'), IMAGE),
    "upsample_nearest": (layer("Upsample", "upsample_param { height: 14 width: 21 }"), IMAGE),
    "upsample_linear_half_pixel": (layer("Upsample", 'upsample_param { height: 10 width: 4 mode: "linear" }'), IMAGE),
    "upsample_linear_align_corners": (layer("Upsample", 'upsample_param { height: 12 width: 1 mode: "linear" '
                                                        "align_corners: true scale_h: 1.7 }"), IMAGE),
}


@pytest.mark.parametrize("precision", ["float32", pytest.param("float16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_espresso(case, precision, rng):
    layers, inputs, *feeds = CASES[case]
    net = build(layers, inputs)
    assert_matches(net, to_coreml_model(net, precision)._mil_program, rng, *feeds, precision=precision)


# Pooling: (params, input H x W, Caffe's output H x W); comments give MIL's floor output where it differs
POOLS = {
    "ceil": ("kernel_size: 3 stride: 2", (6, 6), (3, 3)),  # floor 2
    "ceil_pad": ("kernel_size: 3 stride: 2 pad: 1", (6, 6), (4, 4)),  # floor 3; the last window is clipped
    "ceil_pad_last_window_dropped": ("kernel_size: 2 stride: 2 pad: 1", (5, 5), (3, 3)),  # ceil 4 starts in the pad
    "ceil_equals_floor": ("kernel_size: 3 stride: 2 pad: 1", (7, 7), (4, 4)),
    "clipped_window_no_pad": ("kernel_size: 3 stride: 3", (7, 7), (3, 3)),  # floor 2; the last window has 1 cell
    "stride_1_pad": ("kernel_size: 2 stride: 1 pad: 1", (4, 4), (5, 5)),
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
    assert_matches(net, to_coreml_model(net)._mil_program, rng)


MIXED = (layer("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }", tops=("c",), name="conv")
         + layer("BatchNorm", "", ("c",), ("c",), "bn")
         + layer("Scale", "scale_param { bias_term: true }", ("c",), ("c",), "scale")
         + layer("ReLU", "", ("c",), ("c",), "relu")
         + layer("Pooling", "pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }", ("c",), ("p",), "pool")
         + layer("LRN", "lrn_param { local_size: 3 }", ("p",), ("n",), "norm")
         + layer("InnerProduct", "inner_product_param { num_output: 6 }", ("n",), ("ip",), "ip")
         + layer("Softmax", "", ("ip",), ("prob",), "prob"))


def test_float16_computes_within_float16_precision(rng, tmp_path):
    net = build(MIXED, IMAGE)
    export_coreml(net, tmp_path / "net.mlpackage", precision="float16")
    program, _ = saved_program(tmp_path / "net.mlpackage")
    assert op_counts(program)["cast"] == 2  # the float32 input in, the float32 output out
    assert_matches(net, program, rng, precision="float16")


def test_the_folding_passes_are_left_out_so_the_model_computes_as_caffe(rng):
    program = to_coreml_model(build(MIXED, IMAGE))._mil_program
    assert op_counts(program) == {"conv": 1, "sub": 1, "real_div": 1, "mul": 1, "add": 1, "relu": 1, "avg_pool": 1,
                                  "local_response_norm": 1, "reshape": 1, "linear": 1, "softmax": 1}


# *** Caffe's zoo ***
DEPLOY = {  # deploy net -> the layer refusing it, for the one Core ML cannot take
    "examples/mnist/lenet.prototxt": None,
    "examples/cifar10/cifar10_quick.prototxt": None,
    "examples/cifar10/cifar10_full.prototxt": None,
    "examples/siamese/mnist_siamese.prototxt": None,
    "examples/net_surgery/conv.prototxt": None,
    "examples/net_surgery/bvlc_caffenet_full_conv.prototxt": None,
    "fmnist/lenet_deploy_with_loss.prototxt": "layer 'accuracy' (Accuracy)",
    "models/bvlc_googlenet/deploy.prototxt": None,
    "models/bvlc_reference_caffenet/deploy.prototxt": None,
    "models/bvlc_alexnet/deploy.prototxt": None,
    "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt": None,
    "models/finetune_flickr_style/deploy.prototxt": None,
}
# the AlexNet-shaped nets (60 million weights): outside -m slow, GoogLeNet stands for the large ones
SLOW = {"examples/net_surgery/bvlc_caffenet_full_conv.prototxt", "models/bvlc_alexnet/deploy.prototxt",
        "models/bvlc_reference_caffenet/deploy.prototxt", "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt",
        "models/finetune_flickr_style/deploy.prototxt"}


# one op per layer of these types
ZOO_OPS = {"Convolution": "conv", "ReLU": "relu", "Pooling": "pool", "LRN": "local_response_norm", "Concat": "concat",
           "InnerProduct": "linear", "Softmax": "softmax", "Eltwise": "add"}


def test_every_deploy_net_of_the_zoo_is_tried_here(zoo):
    found = {str(path.relative_to(zoo)) for path in zoo.rglob("*.prototxt")
             if re.search(r'type:\s*"Input"', path.read_text())}
    assert found == set(DEPLOY)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DEPLOY])
def test_zoo_deploy_net_exports_and_matches_espresso(zoo, name, rng, tmp_path):
    net = caffe.Net(str(zoo / name), caffe.TEST)
    set_batch(net, 1)
    path = tmp_path / "net.mlpackage"
    if DEPLOY[name]:
        with pytest.raises(NetError, match=re.escape(DEPLOY[name])):
            export_coreml(net, path)
        assert not path.exists()
        return
    fill(net, rng)
    renamed = [name for name in net.outputs if re.search(r"\W", name)]  # R-CNN's fc-rcnn: Core ML says so
    with pytest.warns(UserWarning, match="has been renamed") if renamed else contextlib.nullcontext():
        export_coreml(net, path)
    program, spec = saved_program(path)
    assert [i.name for i in spec.description.input] == net.inputs
    assert [o.name for o in spec.description.output] == [feature(name) for name in net.outputs]
    want = collections.Counter("pool" if layer.type == "LRN" and not layer.across else ZOO_OPS[layer.type]
                               for layer in net.layers if layer.type in ZOO_OPS)  # LRN within channels pools
    got = op_counts(program)
    got["pool"] = got["max_pool"] + got["avg_pool"]
    assert {op: got[op] for op in want} == want
    assert_matches(net, program, rng)


# *** the saved package ***
LENET_OPS = {"conv": 2, "max_pool": 2, "reshape": 1, "linear": 2, "relu": 1, "softmax": 1}


@pytest.fixture
def lenet(zoo):
    net = caffe.Net(str(zoo / "examples/mnist/lenet.prototxt"), caffe.TEST)
    set_batch(net, 1)
    fill(net, np.random.default_rng(3))
    return net


def consts(program):
    main = program.functions["main"]
    return [op.outputs[0].val for op in main.operations
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.size > 1]


def holds(arrays, want):
    """Some array in `arrays` equals `want` bit for bit (shape, dtype and every bit)."""
    bits = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    return any(a.shape == want.shape and a.dtype == want.dtype and np.array_equal(a.view(bits), want.view(bits))
               for a in arrays)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_lenet_package_has_its_ops_features_and_caffes_weights(lenet, precision, tmp_path, rng):
    path = tmp_path / "lenet.mlpackage"
    export_coreml(lenet, path, precision=precision)
    program, spec = saved_program(path)
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion == 6  # iOS 15
    main = spec.mlProgram.functions["main"]
    ops = collections.Counter(op.type for op in main.block_specializations[main.opset].operations)
    assert {op: n for op, n in ops.items() if op not in ("const", "cast")} == LENET_OPS
    assert op_counts(program, ("const", "cast")) == LENET_OPS
    (data,), (prob,) = spec.description.input, spec.description.output
    assert (data.name, list(data.type.multiArrayType.shape)) == ("data", [1, 1, 28, 28])
    assert (prob.name, list(prob.type.multiArrayType.shape)) == ("prob", [1, 10])
    assert prob.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    dtype = np.float32 if precision == "float32" else np.float16
    held = consts(program)
    for name, blobs in lenet.params.items():  # Convolution's and InnerProduct's layouts are Caffe's
        for k, blob in enumerate(blobs):
            assert holds(held, blob.data.astype(dtype)), (name, k)
    assert_matches(lenet, program, rng, precision=precision)


def test_weights_of_every_kind_are_caffes(tmp_path):
    net = build(layer("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }", tops=("c",), name="conv")
                + layer("PReLU", "", ("c",), ("c",), "prelu")
                + layer("Deconvolution", "convolution_param { num_output: 2 kernel_size: 2 }", ("c",), ("d",), "deconv")
                + layer("Scale", "scale_param { bias_term: true }", ("d",), ("d",), "scale")
                + layer("BatchNorm", "", ("d",), ("d",), "bn")
                + layer("InnerProduct", "inner_product_param { num_output: 3 transpose: true }", ("d",), ("ip",),
                        "ip"), IMAGE)
    export_coreml(net, tmp_path / "net.mlpackage")
    held = consts(saved_program(tmp_path / "net.mlpackage")[0])
    p = {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}
    mean, var, factor = p["bn"][0], p["bn"][1], np.float32(1) / p["bn"][2][0]
    expected = [*p["conv"], p["prelu"][0], *p["deconv"], p["scale"][0].reshape(2, 1, 1), p["scale"][1].reshape(2, 1, 1),
                (mean * factor).reshape(2, 1, 1), np.sqrt(var * factor + np.float32(1e-5)).reshape(2, 1, 1),
                np.ascontiguousarray(p["ip"][0].T), p["ip"][1]]
    for k, want in enumerate(expected):
        assert holds(held, want), k


def test_an_existing_package_is_replaced_and_no_temporary_is_left(lenet, tmp_path):
    path = tmp_path / "lenet.mlpackage"
    path.mkdir()
    (path / "old").write_text("earlier")
    export_coreml(lenet, path)
    assert not (path / "old").exists() and (path / "Manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lenet.mlpackage"]


def test_progress_bars_stay_out_of_stderr(lenet, capfd):
    to_coreml_model(lenet)
    assert "Running MIL" not in capfd.readouterr().err


def test_importing_coremltools_prints_nothing():
    code = "from espresso.interop.coreml_export import _coremltools; _coremltools()"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert done.stderr == "" and done.stdout == ""


def test_a_missing_coremltools_says_how_to_install_it(monkeypatch, lenet):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    hint = "pip install coremltools (or pip install 'espresso-nn[coreml]')"
    with pytest.raises(EspressoError, match=re.escape(hint)):
        to_coreml_model(lenet)


# *** image input and classifier ***
def preprocessing(model, name="data"):
    """(scale, bias per channel) of the ops coremltools puts after image input `name` (none for 1 and 0)."""
    ops = {op.outputs[0].name: op for op in model._mil_program.functions["main"].operations}
    scale, bias = ops.get(f"{name}__scaled__"), ops.get(f"{name}__biased__")
    return (scale.y.val if scale else 1.0), (bias.y.val.ravel().tolist() if bias else [0.0])


def test_image_input_subtracts_caffes_mean_then_scales(rng):
    net = build(conv("num_output: 4 kernel_size: 3"), {"data": (1, 3, 7, 7)})
    mean, scale = [104.0, 117.0, 123.0], 0.5
    model = to_coreml_model(net, image_input={"mean": mean, "scale": scale})
    (data,) = model.get_spec().description.input
    assert data.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.BGR
    assert (data.type.imageType.height, data.type.imageType.width) == (7, 7)
    assert preprocessing(model) == (scale, [-52.0, -58.5, -61.5])
    pixels = rng.integers(0, 256, (1, 3, 7, 7)).astype(np.float32)
    want = net.forward(data=(pixels - np.reshape(mean, (3, 1, 1))) * scale)["out"].copy()
    assert_close(evaluate(model._mil_program, {"data": pixels})["out"], want, 1e-4, "out")


@pytest.mark.parametrize("image_input, color_space, scale, bias", [
    ({"scale": 2 / 255, "bias": [-1, -1, -1], "channel_order": "RGB"}, "RGB", 2 / 255, [-1, -1, -1]),
    ({"bias": -0.5}, "BGR", 1.0, [-0.5] * 3),
], ids=["pycaffe_bias_rgb", "one_bias"])
def test_image_input_takes_core_mls_scale_and_bias(image_input, color_space, scale, bias):
    net = build(conv("num_output: 4 kernel_size: 3"), {"data": (1, 3, 7, 7)})
    model = to_coreml_model(net, image_input=image_input)
    assert model.get_spec().description.input[0].type.imageType.colorSpace == getattr(
        ct.proto.FeatureTypes_pb2.ImageFeatureType, color_space)
    assert preprocessing(model) == (np.float32(scale), list(np.float32(bias)))


def test_a_grey_image_input_and_tensor_inputs_beside_it():
    net = build(conv("num_output: 2 kernel_size: 3") + layer("Bias", "", ("out", "b"), ("biased",), "add"),
                {"data": (1, 1, 7, 7), "b": (2,)})
    spec = to_coreml_model(net, image_input={"input": "data", "scale": 1 / 255}).get_spec()
    data, b = spec.description.input
    assert data.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.GRAYSCALE
    assert (b.name, list(b.type.multiArrayType.shape)) == ("b", [2])


@pytest.mark.parametrize("image_input, match", [
    ({"mean": [1, 2, 3], "bias": [1, 2, 3]}, "not both"),
    ({"mean": np.zeros((3, 7, 7))}, "one value per channel"),
    ({"scale": 1, "gain": 2}, r"unknown keys \['gain'\]"),
    ({"channel_order": "BRG"}, "channel_order 'BRG'"),
    ({"input": "label"}, "'label' is not an input"),
])
def test_bad_image_inputs_are_refused(image_input, match):
    net = build(conv("num_output: 2 kernel_size: 3"), {"data": (1, 3, 7, 7)})
    with pytest.raises(EspressoError, match=match):
        to_coreml_model(net, image_input=image_input)


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 4, 7, 7), (1, 3, 7)])
def test_an_image_is_one_picture_of_1_or_3_channels(shape):
    net = build(layer("ReLU"), {"data": shape})
    with pytest.raises(EspressoError, match=r"an image is \(1, 3 or 1, H, W\)"):
        to_coreml_model(net, image_input={})


def test_class_labels_make_a_classifier_of_the_last_output(lenet, tmp_path):
    labels = [f"digit {k}" for k in range(10)]
    export_coreml(lenet, tmp_path / "lenet.mlpackage", class_labels=labels)
    program, spec = saved_program(tmp_path / "lenet.mlpackage")
    assert (spec.description.predictedFeatureName, spec.description.predictedProbabilitiesName) == (
        "classLabel", "classLabel_probs")
    assert [o.type.WhichOneof("Type") for o in spec.description.output] == ["stringType", "dictionaryType"]
    (classify,) = [op for op in program.functions["main"].operations if op.op_type == "classify"]
    assert list(classify.classes.val) == labels and classify.probabilities.name == "prob"


def test_class_labels_must_match_the_output():
    net = build(layer("Softmax"), {"data": (1, 5)})
    with pytest.raises(EspressoError, match=r"3 labels for output 'out' of shape \(1, 5\)"):
        to_coreml_model(net, class_labels=["a", "b", "c"])


# *** updatable ***
SOLVER = "base_lr: 0.05 momentum: 0.8 lr_policy: 'fixed' type: '{}'"
def mlp(relu="", last="Softmax", softmax=""):
    """conv, then ip1, ReLU, Dropout, ip2 and the last layer: the two InnerProduct layers are trained."""
    return (layer("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }", tops=("c",), name="conv")
            + layer("InnerProduct", "inner_product_param { num_output: 6 }", ("c",), ("ip1",), "ip1")
            + layer("ReLU", relu, ("ip1",), ("ip1",), "relu")
            + layer("Dropout", "", ("ip1",), ("ip1",), "drop")
            + layer("InnerProduct", "inner_product_param { num_output: 4 }", ("ip1",), ("ip2",), "ip2")
            + layer(last, softmax, ("ip2",), ("prob",), "prob"))


MLP = mlp()


def solver(type_="SGD", extra=""):
    return parse_text(SOLVER.format(type_) + extra, caffe_pb2.SolverParameter())


def network(spec):
    return getattr(spec, spec.WhichOneof("Type"))


@pytest.mark.parametrize("suffix", [".mlmodel", ".mlpackage"])
def test_updatable_trains_the_last_inner_products_with_the_solvers_sgd(suffix, tmp_path):
    net = build(MLP, {"data": (8, 3, 5, 5)})
    path = tmp_path / f"mlp{suffix}"
    export_coreml(net, path, updatable=True, solver=solver(), epochs=3)
    assert net.blobs["data"].shape == (8, 3, 5, 5)  # the net is back at its batch
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    nn = network(spec)
    assert spec.isUpdatable and spec.WhichOneof("Type") == "neuralNetwork"
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 3, 5, 5]  # one example per input
    layers = {layer.name: layer for layer in nn.layers}
    trained = [layer for layer in nn.layers if layer.isUpdatable]
    assert [layer.WhichOneof("layer") for layer in trained] == ["convolution", "convolution"]
    assert all(layer.convolution.weights.isUpdatable and layer.convolution.bias.isUpdatable for layer in trained)
    for layer_, caffe_name in zip(trained, ["ip1", "ip2"], strict=True):  # the weights are Caffe's, bit for bit
        w, b = (blob.data for blob in net.params[caffe_name])
        np.testing.assert_array_equal(np.array(layer_.convolution.weights.floatValue, np.float32), w.ravel())
        np.testing.assert_array_equal(np.array(layer_.convolution.bias.floatValue, np.float32), b)
    (loss,) = nn.updateParams.lossLayers
    loss_input, target = loss.categoricalCrossEntropyLossLayer.input, loss.categoricalCrossEntropyLossLayer.target
    softmax = layers[loss_input]
    assert softmax.WhichOneof("layer") == "softmax" and list(softmax.output) == [loss_input]
    assert target in [t.name for t in spec.description.trainingInput]
    sgd = nn.updateParams.optimizer.sgdOptimizer
    assert (sgd.learningRate.defaultValue, sgd.momentum.defaultValue, sgd.miniBatchSize.defaultValue) == (0.05, 0.8, 8)
    assert nn.updateParams.epochs.defaultValue == 3


def test_the_trainable_tail_computes_as_caffe(rng):
    """The NeuralNetwork's MIL program (before coremltools makes it layers), from the exporter's own step."""
    net = build(MLP, {"data": (1, 3, 5, 5)})
    model, g = coreml_export._convert(ct, net, "float32", None, None, coreml_export._trainable_tail(net)[0])
    assert op_counts(model._mil_program) == {"conv": 3, "reshape": 2, "relu": 1, "softmax": 1}
    assert_matches(net, model._mil_program, rng)


def test_updatable_takes_adam_from_a_solver_file_and_makes_a_classifier(tmp_path):
    (tmp_path / "solver.prototxt").write_text(SOLVER.format("Adam") + " momentum2: 0.99 delta: 1e-6")
    net = build(MLP, {"data": (4, 3, 5, 5)})
    spec = to_coreml_model(net, updatable=True, solver=tmp_path / "solver.prototxt",
                           class_labels=["a", "b", "c", "d"]).get_spec()
    assert spec.WhichOneof("Type") == "neuralNetworkClassifier"
    adam = spec.neuralNetworkClassifier.updateParams.optimizer.adamOptimizer
    assert (adam.learningRate.defaultValue, adam.beta1.defaultValue, adam.beta2.defaultValue, adam.eps.defaultValue,
            adam.miniBatchSize.defaultValue) == (0.05, 0.8, 0.99, 1e-6, 4)


def test_what_core_ml_training_leaves_out_is_named_in_a_warning(lenet, zoo):
    lenet_solver = zoo / "examples/mnist/lenet_solver.prototxt"
    with pytest.warns(UserWarning, match=r"lr_policy 'inv' \(Core ML keeps base_lr\), weight_decay 0.0005, "
                      r"lr_mult or decay_mult of the trained layers$"):
        spec = to_coreml_model(lenet, updatable=True, solver=lenet_solver).get_spec()
    assert [layer.name for layer in spec.neuralNetwork.layers if layer.isUpdatable] == ["ip1/conv", "ip2"]


@pytest.mark.parametrize("layers, match", [
    (mlp(last="Sigmoid"), r"layer 'prob' \(Sigmoid\): updatable: the net must end in a Softmax"),
    (mlp(softmax="softmax_param { axis: 0 }"), "Softmax over axis 1"),
    (mlp(relu="relu_param { negative_slope: 0.1 }"), r"layer 'relu' \(ReLU\): updatable: Core ML does not train"),
    (layer("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }", tops=("c",), name="conv")
     + layer("Softmax", "", ("c",), ("prob",), "prob"), "no InnerProduct layer after"),
], ids=["ends_in_sigmoid", "softmax_axis_0", "leaky_relu_between", "no_inner_product"])
def test_nets_core_ml_cannot_train_are_refused(layers, match):
    net = build(layers, {"data": (2, 3, 5, 5)})
    with pytest.raises(NetError, match=match):
        to_coreml_model(net, updatable=True, solver=solver())


@pytest.mark.parametrize("options, match", [
    ({"updatable": True}, "needs the solver"),
    ({"updatable": True, "solver": solver("RMSProp")}, "solver type 'RMSProp': Core ML trains with SGD or Adam only"),
    ({"updatable": True, "solver": solver(), "precision": "float16"}, "keeps float32 weights"),
    ({"updatable": True, "solver": solver(), "epochs": 0}, "epochs must be a positive integer"),
    ({"solver": solver()}, "only with updatable=True"),
    ({"precision": "bfloat16"}, "precision 'bfloat16'"),
])
def test_bad_update_options_are_refused(options, match):
    with pytest.raises(EspressoError, match=match):
        to_coreml_model(build(MLP, {"data": (2, 3, 5, 5)}), **options)


def test_what_the_neural_network_format_cannot_hold_is_refused_by_name():
    net = build(layer("Upsample", 'upsample_param { height: 10 width: 10 mode: "linear" }', tops=("u",), name="up")
                + mlp().replace('bottom: "data"', 'bottom: "u"', 1), {"data": (2, 3, 5, 5)})
    with pytest.raises(EspressoError, match="coremltools refused it: Unsupported 'sampling_mode'"):
        to_coreml_model(net, updatable=True, solver=solver())


# *** refusals ***
def test_an_unknown_layer_type_is_refused_and_nothing_is_written(tmp_path):
    net = build(layer("ReLU", tops=("r",), name="relu") + layer("ArgMax", "", ("r",), name="top"), IMAGE)
    with pytest.raises(NetError, match=r"layer 'top' \(ArgMax\): no Core ML export for layer type 'ArgMax'"):
        export_coreml(net, tmp_path / "net.mlpackage")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.mlpackage").mkdir()  # a package already there stays as it was
    (tmp_path / "old.mlpackage" / "marker").write_text("earlier")
    with pytest.raises(NetError):
        export_coreml(net, tmp_path / "old.mlpackage")
    assert [p.name for p in tmp_path.iterdir()] == ["old.mlpackage"]
    assert (tmp_path / "old.mlpackage" / "marker").read_text() == "earlier"


@pytest.mark.parametrize("layers, inputs, match", [
    (layer("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }"), IMAGE, "STOCHASTIC"),
    (layer("Pooling", "pooling_param { pool: MAX kernel_size: 2 }", tops=("out", "mask")), IMAGE, "argmax mask"),
    (layer("Convolution", "convolution_param { num_output: 2 kernel_size: 2 axis: 2 }"), {"data": (2, 3, 4, 5, 5)},
     "axis 2"),
    (layer("Dropout", "phase: TRAIN"), IMAGE, "TRAIN phase"),
    (layer("Upsample", "upsample_param { height: 10 width: 14 }"), IMAGE, "whole factors"),
    (layer("Upsample", "upsample_param { height: 14 width: 14 scale_h: 2.5 }"), IMAGE, "whole factors"),
    (layer("Upsample", 'upsample_param { height: 10 width: 7 mode: "linear" scale_h: 1.5 }'), IMAGE,
     "scale other than output / input"),
    (layer("Upsample", "upsample_param { height: 4 width: 6 }"), {"data": (2, 3)}, "rank-2 bottom"),
    (layer("Pad", 'pad_param { pad: [0, 1, 1, 1, 0, 1, 1, 1] mode: "reflect" }'), IMAGE, "reflect padding of other"),
], ids=["stochastic_pooling", "pooling_mask", "convolution_axis", "train_phase_dropout", "nearest_fraction",
        "nearest_given_scale", "half_pixel_scale", "upsample_rank_2", "reflect_three_axes"])
def test_options_core_ml_cannot_express_are_refused(layers, inputs, match, tmp_path):
    net = build(layers, inputs)
    with pytest.raises(NetError, match=f"layer 'l' .*cannot be exported to Core ML: .*{match}"):
        export_coreml(net, tmp_path / "net.mlpackage")
    assert list(tmp_path.iterdir()) == []


def test_train_nets_and_other_file_names_are_refused(tmp_path):
    text = layer("Input", "input_param { shape { dim: 2 dim: 3 } }", (), ("data",), "data") + layer("ReLU")
    train = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN)
    with pytest.raises(NetError, match="TRAIN phase"):
        to_coreml_model(train)
    test = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)
    with pytest.raises(EspressoError, match=r"must end in \.mlpackage$"):
        export_coreml(test, tmp_path / "net.mlmodel")
    assert not os.listdir(tmp_path)


# *** tools/check_coreml_on_mac.py, Core ML's predict played by evaluate ***
def mac_check_script():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "check_coreml_on_mac.py")
    spec = importlib.util.spec_from_file_location("check_coreml_on_mac", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_predict(model, feeds):
    """What Core ML would return, from evaluate: images arrive as the model's color layout."""
    inputs = {}
    for description in model.get_spec().description.input:
        value = feeds[description.name]
        if description.type.WhichOneof("Type") == "imageType":
            value = np.asarray(value, np.float32).reshape(value.height, value.width, -1).transpose(2, 0, 1)
            bgr = description.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.BGR
            value = (value[::-1] if bgr else value)[None]
        inputs[description.name] = value
    program = saved_program(model.package_path)[0]
    values = evaluate(program, inputs)
    classify = [op for op in program.functions["main"].operations if op.op_type == "classify"]
    if not classify:
        return {o.name: values[o.name] for o in model.get_spec().description.output}
    probabilities = values[classify[0].probabilities.name].ravel()
    return {"classLabel_probs": dict(zip(classify[0].classes.val, probabilities, strict=True))}


@pytest.mark.parametrize("options, weights_changed, status", [
    ({"image_input": {"mean": [100, 110, 120], "scale": 0.5}, "class_labels": list("abcdef")}, False, 0),
    ({"precision": "float16"}, False, 0),
    ({}, True, 1),
], ids=["image_classifier", "float16", "other_weights"])
def test_the_mac_check_script_compares_what_core_ml_predicts(options, weights_changed, status, monkeypatch, tmp_path,
                                                            capsys):
    net = build(MIXED, {"data": (1, 3, 7, 7)})
    net.save(str(tmp_path / "net.caffemodel"))
    (tmp_path / "net.prototxt").write_text(net_text(MIXED, {"data": (1, 3, 7, 7)}))
    export_coreml(net, tmp_path / "net.mlpackage", **options)
    if weights_changed:
        net.params["ip"][0].data[...] *= 1.5
        net.save(str(tmp_path / "net.caffemodel"))
    monkeypatch.setattr(ct.models.MLModel, "predict", fake_predict)
    args = [str(tmp_path / name) for name in ("net.mlpackage", "net.prototxt", "net.caffemodel")]
    assert mac_check_script().main(args + (["--float16"] if "precision" in options else [])) == status
    assert ("TOO LARGE" in capsys.readouterr().out) == bool(status)
