"""Upgrading old net and solver formats (Caffe's upgrade_proto.cpp rules), field by field."""

import numpy as np
import pytest

import espresso
from espresso.errors import EspressoError, NetError
from espresso.layer import legacy_types
from espresso.proto import caffe_pb2
from espresso.proto.text import block_lines, parse_text, read_net_text
from espresso.proto.upgrade import V0_TYPES, V1_TYPES, upgrade_net, upgrade_solver, v1_type_names

V1 = caffe_pb2.V1LayerParameter

# LeNet as Caffe's examples wrote it in the V1 era (the first data layer in the even older style,
# with its transformation inside data_param).
LENET_V1 = """name: "LeNet"
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 scale: 0.00390625 mirror: false }
  include: { phase: TRAIN }
}
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 }
  transform_param { scale: 0.00390625 }
  include: { phase: TEST }
}
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  convolution_param {
    num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" }
    bias_filler { type: "constant" }
  }
}
layers {
  name: "pool1"
  type: POOLING
  bottom: "conv1"
  top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layers {
  name: "ip1"
  type: INNER_PRODUCT
  bottom: "pool1"
  top: "ip1"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers {
  name: "ip2"
  type: INNER_PRODUCT
  bottom: "ip1"
  top: "ip2"
  param: "ip2_w"
  param: "ip2_b"
  blob_share_mode: PERMISSIVE
  inner_product_param { num_output: 10 }
}
layers {
  name: "accuracy"
  type: ACCURACY
  bottom: "ip2"
  bottom: "label"
  top: "accuracy"
  include: { phase: TEST }
}
layers {
  name: "loss"
  type: SOFTMAX_LOSS
  bottom: "ip2"
  bottom: "label"
  top: "loss"
  loss_weight: 2
  loss_param { ignore_label: 3 normalize: false }
  exclude: { stage: "deploy" }
}
"""

# The same net as written by hand in today's format: what the upgrade must produce.
LENET_V2 = """name: "LeNet"
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.00390625 mirror: false }
  data_param { source: "mnist_train_lmdb" batch_size: 64 backend: LMDB }
}
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "mnist_test_lmdb" batch_size: 100 backend: LMDB }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param {
    num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" }
  }
}
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layer {
  name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer {
  name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { name: "ip2_w" share_mode: PERMISSIVE } param { name: "ip2_b" }
  inner_product_param { num_output: 10 }
}
layer {
  name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST }
}
layer {
  name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss"
  loss_weight: 2
  exclude { stage: "deploy" }
  loss_param { ignore_label: 3 normalize: false }
}
"""


def net(text):
    return parse_text(text, caffe_pb2.NetParameter())


def upgraded(text, lines=None):
    return upgrade_net(net(text), lines)


# *** V1 -> V2 ***
def test_v1_lenet_matches_the_hand_written_current_net():
    param = upgraded(LENET_V1)
    assert not param.layers
    assert param == net(LENET_V2)


def test_v1_lenet_field_by_field():
    param = upgraded(LENET_V1)
    names = [layer.name for layer in param.layer]
    assert names == ["mnist", "mnist", "conv1", "pool1", "ip1", "relu1", "ip2", "accuracy", "loss"]
    types = [layer.type for layer in param.layer]
    assert types == ["Data", "Data", "Convolution", "Pooling", "InnerProduct", "ReLU", "InnerProduct",
                     "Accuracy", "SoftmaxWithLoss"]
    train, test, conv, pool, ip1, relu, ip2, accuracy, loss = param.layer
    # data transformation moved out of data_param (Caffe's UpgradeNetDataTransformation)
    assert train.transform_param.scale == np.float32(0.00390625)
    assert train.transform_param.HasField("mirror") and not train.transform_param.mirror
    assert not train.data_param.HasField("scale") and not train.data_param.HasField("mirror")
    assert train.data_param.batch_size == 64 and train.data_param.backend == caffe_pb2.DataParameter.LMDB
    assert [r.phase for r in train.include] == [caffe_pb2.TRAIN]
    assert [r.phase for r in test.include] == [caffe_pb2.TEST]
    assert test.transform_param.scale == np.float32(0.00390625)
    assert test.data_param.source == "mnist_test_lmdb"
    assert list(train.top) == ["data", "label"] and list(conv.bottom) == ["data"]
    # blobs_lr -> lr_mult, weight_decay -> decay_mult, unset halves stay unset
    assert [s.lr_mult for s in conv.param] == [1, 2]
    assert not any(s.HasField("decay_mult") or s.HasField("name") for s in conv.param)
    assert [(s.lr_mult, s.decay_mult) for s in ip1.param] == [(1, 1), (2, 0)]
    # param names and share modes
    assert [s.name for s in ip2.param] == ["ip2_w", "ip2_b"]
    assert ip2.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert not ip2.param[1].HasField("share_mode") and not ip2.param[0].HasField("lr_mult")
    # every sub-message copied whole
    assert conv.convolution_param.num_output == 20 and list(conv.convolution_param.kernel_size) == [5]
    assert conv.convolution_param.weight_filler.type == "xavier"
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.MAX and pool.pooling_param.stride == 2
    assert ip1.inner_product_param.num_output == 500 and ip2.inner_product_param.num_output == 10
    assert list(relu.bottom) == list(relu.top) == ["ip1"]
    assert list(accuracy.bottom) == ["ip2", "label"]
    assert list(loss.loss_weight) == [2.0] and loss.loss_param.ignore_label == 3
    assert not loss.loss_param.normalize and [list(r.stage) for r in loss.exclude] == [["deploy"]]
    assert not any(layer.HasField("phase") or layer.propagate_down for layer in param.layer)


def test_v1_blobs_and_odd_length_lists():
    """Caffe extends the ParamSpec list to the longest of the four V1 lists."""
    param = net('layers { name: "a" type: INNER_PRODUCT param: "w" blobs_lr: 1 blobs_lr: 2 blobs_lr: 3 '
                'weight_decay: 5 blob_share_mode: STRICT blob_share_mode: PERMISSIVE '
                'blobs { data: 1 data: 2 shape { dim: 2 } } }')
    layer = upgrade_net(param).layer[0]
    assert len(layer.param) == 3
    assert [s.name for s in layer.param] == ["w", "", ""]
    assert [s.lr_mult for s in layer.param] == [1, 2, 3]
    assert [s.HasField("decay_mult") for s in layer.param] == [True, False, False]
    assert layer.param[0].share_mode == caffe_pb2.ParamSpec.STRICT and layer.param[0].HasField("share_mode")
    assert layer.param[1].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert list(layer.blobs[0].data) == [1, 2] and list(layer.blobs[0].shape.dim) == [2]


def test_v1_type_none_and_missing_type():
    param = upgraded('layers { name: "a" type: NONE } layers { name: "b" }')
    assert [layer.type for layer in param.layer] == ["", ""]
    assert param.layer[0].HasField("type") and not param.layer[1].HasField("type")


def test_v1_every_sub_message_is_copied():
    """Every message field of V1LayerParameter named *_param lands in the same-named field."""
    v1 = V1(name="x", type=V1.CONVOLUTION)
    for field in V1.DESCRIPTOR.fields:
        if field.name.endswith("_param"):
            getattr(v1, field.name).SetInParent()
    param = caffe_pb2.NetParameter()
    param.layers.append(v1)
    layer = upgrade_net(param).layer[0]
    copied = {f.name for f, _ in layer.ListFields() if f.name.endswith("_param")}
    assert copied == {f.name for f in V1.DESCRIPTOR.fields if f.name.endswith("_param")}
    assert "transform_param" in copied and "loss_param" in copied


def test_v1_type_table_is_complete_and_agrees_with_layer_classes():
    enum_names = {v.name for v in V1.DESCRIPTOR.enum_types_by_name["LayerType"].values}
    assert set(V1_TYPES) == enum_names
    for enum_name, type_name in legacy_types().items():
        assert V1_TYPES[enum_name] == type_name, enum_name
    assert v1_type_names()["SOFTMAX_LOSS"] == "SoftmaxWithLoss"
    assert set(V0_TYPES.values()) <= enum_names


def test_v1_every_enum_upgrades():
    param = caffe_pb2.NetParameter()
    values = V1.DESCRIPTOR.enum_types_by_name["LayerType"].values
    for v in values:
        param.layers.add(name=v.name, type=v.number)
    got = {layer.name: layer.type for layer in upgrade_net(param).layer}
    assert got == V1_TYPES


def test_layer_and_layers_together_is_an_error():
    with pytest.raises(NetError, match="'layer' and the old 'layers'"):
        upgraded('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')


def test_current_net_is_left_alone():
    text = 'name: "n" layer { name: "a" type: "ReLU" bottom: "x" top: "x" param { lr_mult: 3 } }'
    assert upgraded(text) == net(text)


def test_v1_lines_follow_the_layers(tmp_path):
    path = tmp_path / "lenet.prototxt"
    path.write_text(LENET_V1)
    param, lines = read_net_text(path)
    expected = [i + 1 for i, row in enumerate(LENET_V1.splitlines()) if row.startswith("layers")]
    assert lines == expected
    upgrade_net(param, lines)
    assert lines == expected and len(lines) == len(param.layer)


def test_lines_none_or_misaligned_become_none():
    param = net(LENET_V1)
    lines = [1, 2]  # does not match: the caller's guess is dropped rather than misattributed
    upgrade_net(param, lines)
    assert lines == [None] * 9
    assert len(upgrade_net(net(LENET_V1)).layer) == 9


def test_v1_error_names_layer_and_field():
    param = caffe_pb2.NetParameter()
    param.layers.add(name="odd").MergeFromString(bytes([5 << 3, 99]))  # type = 99: not in the enum
    with pytest.raises(NetError, match=r"layers 0 \('odd'\): field 'type': unknown value 99"):
        upgrade_net(param)
    param = caffe_pb2.NetParameter()
    param.layers.add(name="odd").MergeFromString(bytes([0xD0, 0x3E, 7]))  # blob_share_mode (1002) = 7
    with pytest.raises(NetError, match=r"field 'blob_share_mode': unknown value 7"):
        upgrade_net(param)


# *** data transformation fields ***
@pytest.mark.parametrize("v1_type, sub", [("DATA", "data_param"), ("IMAGE_DATA", "image_data_param"),
                                          ("WINDOW_DATA", "window_data_param")])
def test_data_transformation_fields_move(v1_type, sub):
    text = (f'layers {{ name: "d" type: {v1_type} {sub} {{ source: "s" batch_size: 4 scale: 0.5 '
            f'mean_file: "m.binaryproto" crop_size: 7 mirror: true }} transform_param {{ mean_value: 3 }} }}')
    layer = upgraded(text).layer[0]
    t, p = layer.transform_param, getattr(layer, sub)
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "m.binaryproto", 7, True)
    assert list(t.mean_value) == [3]
    assert not any(p.HasField(f) for f in ("scale", "mean_file", "crop_size", "mirror"))
    assert (p.source, p.batch_size) == ("s", 4)


def test_data_transformation_only_for_data_layers_and_only_v1():
    layer = upgraded('layers { name: "m" type: MEMORY_DATA data_param { scale: 0.5 } }').layer[0]
    assert layer.data_param.scale == 0.5 and not layer.HasField("transform_param")
    current = 'layer { name: "d" type: "Data" data_param { scale: 0.5 } }'
    assert upgraded(current) == net(current)  # Caffe upgrades V1 nets only


# *** V0 -> V1 -> V2 ***
V0_NET = """name: "old"
input: "data"
input_dim: 10 input_dim: 3 input_dim: 32 input_dim: 32
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 96 kernelsize: 11 stride: 4 group: 2 biasterm: false
          weight_filler { type: "gaussian" std: 0.01 }
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 }
         bottom: "pool1" top: "norm1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.4 } bottom: "norm1" top: "norm1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 4 bias_filler { type: "constant" value: 1 } }
         bottom: "norm1" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
"""


def test_v0_net_upgrades_through_v1():
    lines = list(range(1, 9))
    param = upgraded(V0_NET, lines)
    assert [(layer.name, layer.type) for layer in param.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"),
        ("norm1", "LRN"), ("drop", "Dropout"), ("fc", "InnerProduct"), ("prob", "Softmax")]
    assert lines == [None, 2, 3, 4, 5, 6, 7, 8]  # the padding layer's entry is gone, the input's added
    inputs, conv, relu, pool, lrn, drop, fc, _ = param.layer
    assert list(inputs.top) == ["data"] and list(inputs.input_param.shape[0].dim) == [10, 3, 32, 32]
    # the padding layer is folded into the conv that read it
    assert list(conv.bottom) == ["data"] and list(conv.top) == ["conv1"]
    c = conv.convolution_param
    assert (c.num_output, list(c.kernel_size), list(c.stride), list(c.pad), c.group, c.bias_term) == (
        96, [11], [4], [2], 2, False)
    assert c.weight_filler.type == "gaussian" and c.weight_filler.std == np.float32(0.01)
    assert [(s.lr_mult, s.decay_mult) for s in conv.param] == [(1, 1), (2, 0)]
    assert list(relu.bottom) == list(relu.top) == ["conv1"]
    p = pool.pooling_param
    assert (p.pool, p.kernel_size, p.stride) == (caffe_pb2.PoolingParameter.AVE, 3, 2)
    n = lrn.lrn_param
    assert (n.local_size, n.alpha, n.beta) == (5, np.float32(0.0001), 0.75)
    assert drop.dropout_param.dropout_ratio == np.float32(0.4)
    assert fc.inner_product_param.num_output == 4 and fc.inner_product_param.bias_filler.value == 1
    assert not param.layers and not param.input and not param.input_dim


def test_v0_data_layer_fields():
    text = ('layers { layer { name: "d" type: "data" source: "db" batchsize: 8 rand_skip: 3 scale: 0.5 '
            'meanfile: "m" cropsize: 4 mirror: true } top: "x" }'
            'layers { layer { name: "w" type: "window_data" source: "w" det_fg_threshold: 0.6 '
            'det_bg_threshold: 0.4 det_fg_fraction: 0.3 det_context_pad: 16 det_crop_mode: "square" } '
            'top: "y" }'
            'layers { layer { name: "c" type: "concat" concat_dim: 0 } bottom: "x" bottom: "y" top: "z" }')
    d, w, c = upgraded(text).layer
    p = d.data_param
    assert (d.type, p.source, p.batch_size, p.rand_skip) == ("Data", "db", 8, 3)
    t = d.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "m", 4, True)
    q = w.window_data_param
    assert (q.fg_threshold, q.bg_threshold, q.fg_fraction, q.context_pad, q.crop_mode) == (
        np.float32(0.6), np.float32(0.4), np.float32(0.3), 16, "square")
    assert c.type == "Concat" and c.concat_param.HasField("concat_dim") and c.concat_param.concat_dim == 0


def test_v0_errors():
    with pytest.raises(NetError, match="V0 layer 'x': unknown type 'warp'"):
        upgraded('layers { layer { name: "x" type: "warp" } }')
    with pytest.raises(NetError, match="padding layer can only feed a conv or pool layer, not 'relu'"):
        upgraded('input: "d" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "d" top: "p" } '
                 'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }')
    with pytest.raises(NetError, match="V0 layer 'r': unknown bottom blob 'nowhere'"):
        upgraded('layers { layer { name: "r" type: "relu" } bottom: "nowhere" top: "r" }')


def test_v0_field_without_meaning_warns_and_is_dropped():
    with pytest.warns(UserWarning, match="V0 layer 'r': field 'num_output' means nothing for type 'relu'"):
        layer = upgraded('layers { layer { name: "r" type: "relu" num_output: 3 } }').layer[0]
    assert layer.type == "ReLU" and not layer.HasField("inner_product_param")


# *** legacy input fields ***
def test_input_dim_becomes_an_input_layer_in_front():
    lines = [7]
    param = upgraded('input: "a" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4 '
                     'input: "b" input_dim: 5 input_dim: 6 input_dim: 7 input_dim: 8 '
                     'layer { name: "r" type: "ReLU" bottom: "a" top: "c" }', lines)
    first = param.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["a", "b"])
    assert [list(s.dim) for s in first.input_param.shape] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert param.layer[1].name == "r" and lines == [None, 7]
    assert not (param.input or param.input_dim or param.input_shape)


def test_input_shape_variant():
    param = upgraded('input: "a" input_shape { dim: 2 dim: 5 } input: "b" input_shape { dim: 7 }')
    assert [list(s.dim) for s in param.layer[0].input_param.shape] == [[2, 5], [7]]
    assert list(param.layer[0].top) == ["a", "b"] and len(param.layer) == 1


def test_input_alone_is_dropped():
    """Old .caffemodel files name their inputs without shapes: Caffe just drops them."""
    lines = [3]
    param = upgraded('input: "data" layer { name: "r" type: "ReLU" }', lines)
    assert [layer.name for layer in param.layer] == ["r"] and not param.input and lines == [3]


def test_input_field_errors():
    with pytest.raises(NetError, match="'input_dim' needs 4 values per input"):
        upgraded('input: "a" input_dim: 1 input_dim: 2 input_dim: 3')
    with pytest.raises(NetError, match="'input_shape' given 2 times"):
        upgraded('input: "a" input: "b" input: "c" input_shape { dim: 1 } input_shape { dim: 2 }')
    with pytest.raises(NetError, match="'input_shape' and 'input_dim' disagree"):
        upgraded('input: "a" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4 input_shape { dim: 1 }')
    agreeing = upgraded('input: "a" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4 '
                        'input_shape { dim: 1 dim: 2 dim: 3 dim: 4 }')
    assert list(agreeing.layer[0].input_param.shape[0].dim) == [1, 2, 3, 4]


def test_v1_net_with_inputs_builds_and_runs(tmp_path):
    """End to end: a V1 prototxt with legacy inputs loads as a Net, errors citing the right line."""
    path = tmp_path / "v1.prototxt"
    path.write_text('name: "v1"\ninput: "x"\ninput_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1\n'
                    'layers {\n  name: "relu" type: RELU bottom: "x" top: "y"\n}\n'
                    'layers {\n  name: "pow" type: POWER bottom: "y" top: "z"\n'
                    '  power_param { scale: 2 shift: 1 }\n}\n')
    net = espresso.Net(str(path), espresso.TEST)
    assert list(net.blobs["x"].shape) == [2, 3, 1, 1]
    x = np.array([-1, 0.5, 2, -3, 4, 0], np.float32).reshape(2, 3, 1, 1)
    out = net.forward(x=x)["z"]
    np.testing.assert_array_equal(out, 2 * np.maximum(x, 0) + 1)
    bad = tmp_path / "bad.prototxt"
    bad.write_text('input: "x" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1\n'
                   'layers {\n  name: "a" type: RELU bottom: "x" top: "y"\n}\n'
                   'layers {\n  name: "b" type: RELU bottom: "nope" top: "z"\n}\n')
    with pytest.raises(NetError, match=r"bad.prototxt:5: .*unknown bottom blob 'nope'"):
        espresso.Net(str(bad), espresso.TEST)


def test_block_lines_match_layer_entries_of_v1_text():
    rows = LENET_V1.splitlines()
    assert block_lines(LENET_V1) == [i + 1 for i, r in enumerate(rows) if r.startswith("layers")]


# *** BatchNorm ***
def test_batch_norm_with_three_specs_is_frozen():
    param = upgraded('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 name: "m" } '
                     'param { lr_mult: 1 decay_mult: 1 } param { } }')
    specs = param.layer[0].param
    assert [(s.lr_mult, s.decay_mult) for s in specs] == [(0, 0)] * 3
    assert all(s.HasField("lr_mult") and s.HasField("decay_mult") for s in specs)
    assert specs[0].name == "m"  # everything else stays


@pytest.mark.parametrize("text", [
    'layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } }',
    'layer { name: "bn" type: "BatchNorm" }',
    'layer { name: "s" type: "Scale" param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 } }',
])
def test_batch_norm_upgrade_touches_nothing_else(text):
    assert upgraded(text) == net(text)


# *** solver ***
@pytest.mark.parametrize("enum_name, type_name", [
    ("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
    ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_enum_becomes_string(enum_name, type_name):
    solver = parse_text(f"base_lr: 0.1 solver_type: {enum_name}", caffe_pb2.SolverParameter())
    assert upgrade_solver(solver) is solver
    assert solver.type == type_name and solver.HasField("type") and not solver.HasField("solver_type")
    assert solver.base_lr == np.float32(0.1)


def test_solver_upgrade_leaves_current_solvers_and_refuses_conflicts():
    solver = parse_text('type: "Adam"', caffe_pb2.SolverParameter())
    assert upgrade_solver(solver).type == "Adam"
    assert not upgrade_solver(caffe_pb2.SolverParameter()).HasField("type")
    for text in ('type: "Nesterov" solver_type: NESTEROV', 'type: "SGD" solver_type: ADAM'):
        with pytest.raises(EspressoError, match="cannot both be given"):  # as Caffe, agreeing or not
            upgrade_solver(parse_text(text, caffe_pb2.SolverParameter()))


def test_zoo_solvers_upgrade(zoo):
    for path in sorted(zoo.rglob("*solver*.prototxt")):
        solver = parse_text(path.read_text(), caffe_pb2.SolverParameter(), str(path))
        had = solver.HasField("solver_type")
        upgrade_solver(solver)
        assert not solver.HasField("solver_type")
        assert solver.type in {"SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"}, (path, had)
