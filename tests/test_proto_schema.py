"""Checks that espresso/proto/caffe.proto is wire-compatible with BVLC Caffe.

Field numbers, enum values and defaults below are Caffe 1.0 master's; a wrong
number or default in our schema would silently misread real Caffe files.
"""
import struct

from google.protobuf import text_format

from espresso.proto import caffe_pb2


def f32(x):
    """x rounded to float32, as stored for a `float` field default."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def number(message, field):
    return message.DESCRIPTOR.fields_by_name[field].number


# --- field numbers ---------------------------------------------------------

LAYER_PARAM_NUMBERS = {
    "name": 1, "type": 2, "bottom": 3, "top": 4, "loss_weight": 5, "param": 6,
    "blobs": 7, "include": 8, "exclude": 9, "phase": 10, "propagate_down": 11,
    "transform_param": 100, "loss_param": 101, "accuracy_param": 102,
    "argmax_param": 103, "concat_param": 104, "contrastive_loss_param": 105,
    "convolution_param": 106, "data_param": 107, "dropout_param": 108,
    "dummy_data_param": 109, "eltwise_param": 110, "exp_param": 111,
    "hdf5_data_param": 112, "hdf5_output_param": 113, "hinge_loss_param": 114,
    "image_data_param": 115, "infogain_loss_param": 116,
    "inner_product_param": 117, "lrn_param": 118, "memory_data_param": 119,
    "mvn_param": 120, "pooling_param": 121, "power_param": 122,
    "relu_param": 123, "sigmoid_param": 124, "softmax_param": 125,
    "slice_param": 126, "tanh_param": 127, "threshold_param": 128,
    "window_data_param": 129, "python_param": 130, "prelu_param": 131,
    "spp_param": 132, "reshape_param": 133, "log_param": 134,
    "flatten_param": 135, "reduction_param": 136, "embed_param": 137,
    "tile_param": 138, "batch_norm_param": 139, "elu_param": 140,
    "bias_param": 141, "scale_param": 142, "input_param": 143,
    "crop_param": 144, "parameter_param": 145, "recurrent_param": 146,
    "swish_param": 147, "clip_param": 148,
}


# Espresso's own layers' fields (espresso/layers/extensions.py, hashed.py): SSD Caffe's number for Permute,
# numbers from 1000 on (which Caffe does not use) for the rest
ESPRESSO_LAYER_PARAM_NUMBERS = {"permute_param": 202, "pad_param": 1001, "upsample_param": 1002,
                               "hashed_param": 1003}


def test_layer_parameter_field_numbers():
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    got = {name: f.number for name, f in fields.items()}
    assert got == {**LAYER_PARAM_NUMBERS, **ESPRESSO_LAYER_PARAM_NUMBERS}
    assert not set(LAYER_PARAM_NUMBERS.values()) & set(ESPRESSO_LAYER_PARAM_NUMBERS.values())


def test_net_parameter_fields():
    p = caffe_pb2.NetParameter
    assert number(p, "name") == 1
    assert number(p, "layers") == 2
    assert number(p, "input") == 3
    assert number(p, "input_dim") == 4
    assert number(p, "force_backward") == 5
    assert number(p, "state") == 6
    assert number(p, "debug_info") == 7
    assert number(p, "input_shape") == 8
    assert number(p, "layer") == 100


def test_solver_parameter_fields():
    p = caffe_pb2.SolverParameter
    expected = {
        "train_net": 1, "test_net": 2, "test_iter": 3, "test_interval": 4,
        "base_lr": 5, "display": 6, "max_iter": 7, "lr_policy": 8, "gamma": 9,
        "power": 10, "momentum": 11, "weight_decay": 12, "stepsize": 13,
        "snapshot": 14, "snapshot_prefix": 15, "snapshot_diff": 16,
        "solver_mode": 17, "device_id": 18, "test_compute_loss": 19,
        "random_seed": 20, "train_net_param": 21, "test_net_param": 22,
        "debug_info": 23, "net": 24, "net_param": 25, "train_state": 26,
        "test_state": 27, "snapshot_after_train": 28,
        "regularization_type": 29, "solver_type": 30, "delta": 31,
        "test_initialization": 32, "average_loss": 33, "stepvalue": 34,
        "clip_gradients": 35, "iter_size": 36, "snapshot_format": 37,
        "rms_decay": 38, "momentum2": 39, "type": 40,
        "layer_wise_reduce": 41, "weights": 42,
    }
    got = {n: f.number for n, f in p.DESCRIPTOR.fields_by_name.items()}
    assert got == expected
    # `weights` is a repeated string: tag (42 << 3) | 2 == varint d2 02.
    solver = caffe_pb2.SolverParameter(weights=["a.caffemodel", "b"])
    assert solver.SerializeToString() == b"\xd2\x02\x0ca.caffemodel\xd2\x02\x01b"


def test_blob_proto_fields_and_packing():
    p = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in p.items()} == {
        "num": 1, "channels": 2, "height": 3, "width": 4, "data": 5,
        "diff": 6, "shape": 7, "double_data": 8, "double_diff": 9,
    }
    # Caffe writes these packed; the wire bytes depend on it.
    blob = caffe_pb2.BlobProto()
    blob.data.extend([1.0, 2.0])
    assert blob.SerializeToString() == b"\x2a\x08" + struct.pack("<2f", 1.0, 2.0)
    shape = caffe_pb2.BlobShape(dim=[2, 3])
    assert shape.SerializeToString() == b"\x0a\x02\x02\x03"


def test_layer_specific_numbers():
    assert number(caffe_pb2.ConvolutionParameter, "dilation") == 18
    assert number(caffe_pb2.ConvolutionParameter, "force_nd_im2col") == 17
    assert number(caffe_pb2.ConvolutionParameter, "stride") == 6
    assert number(caffe_pb2.ConvolutionParameter, "group") == 5
    assert number(caffe_pb2.PoolingParameter, "round_mode") == 13
    assert number(caffe_pb2.PoolingParameter, "global_pooling") == 12
    assert number(caffe_pb2.InnerProductParameter, "transpose") == 6
    assert number(caffe_pb2.ConcatParameter, "axis") == 2
    assert number(caffe_pb2.SliceParameter, "axis") == 3
    assert number(caffe_pb2.LossParameter, "normalization") == 3
    assert number(caffe_pb2.SPPParameter, "engine") == 6
    assert number(caffe_pb2.DummyDataParameter, "shape") == 6
    assert number(caffe_pb2.PythonParameter, "share_in_parallel") == 4
    assert number(caffe_pb2.ClipParameter, "min") == 1
    assert number(caffe_pb2.ClipParameter, "max") == 2
    assert number(caffe_pb2.V1LayerParameter, "param") == 1001
    assert number(caffe_pb2.V1LayerParameter, "blob_share_mode") == 1002
    assert number(caffe_pb2.V1LayerParameter, "layer") == 1
    assert number(caffe_pb2.V1LayerParameter, "loss_param") == 42
    assert number(caffe_pb2.V0LayerParameter, "k") == 22
    assert number(caffe_pb2.V0LayerParameter, "det_context_pad") == 58
    assert number(caffe_pb2.V0LayerParameter, "concat_dim") == 65
    assert number(caffe_pb2.V0LayerParameter, "hdf5_output_param") == 1001


# --- enums -----------------------------------------------------------------

def test_v1_layer_types():
    t = caffe_pb2.V1LayerParameter
    assert t.NONE == 0
    assert t.ACCURACY == 1
    assert t.BNLL == 2
    assert t.CONCAT == 3
    assert t.CONVOLUTION == 4
    assert t.DATA == 5
    assert t.DROPOUT == 6
    assert t.EUCLIDEAN_LOSS == 7
    assert t.FLATTEN == 8
    assert t.INNER_PRODUCT == 14
    assert t.LRN == 15
    assert t.POOLING == 17
    assert t.RELU == 18
    assert t.SIGMOID == 19
    assert t.SOFTMAX == 20
    assert t.SOFTMAX_LOSS == 21
    assert t.SPLIT == 22
    assert t.TANH == 23
    assert t.ELTWISE == 25
    assert t.ABSVAL == 35
    assert t.SILENCE == 36
    assert t.DECONVOLUTION == 39
    assert len(t.LayerType.keys()) == 40


def test_other_enums():
    assert caffe_pb2.TRAIN == 0 and caffe_pb2.TEST == 1
    assert caffe_pb2.PoolingParameter.CEIL == 0
    assert caffe_pb2.PoolingParameter.FLOOR == 1
    assert caffe_pb2.PoolingParameter.STOCHASTIC == 2
    assert caffe_pb2.LossParameter.FULL == 0
    assert caffe_pb2.LossParameter.VALID == 1
    assert caffe_pb2.LossParameter.BATCH_SIZE == 2
    assert caffe_pb2.LossParameter.NONE == 3
    assert caffe_pb2.EltwiseParameter.PROD == 0
    assert caffe_pb2.EltwiseParameter.SUM == 1
    assert caffe_pb2.ReductionParameter.SUM == 1
    assert caffe_pb2.ReductionParameter.MEAN == 4
    assert caffe_pb2.HingeLossParameter.L1 == 1
    assert caffe_pb2.DataParameter.LMDB == 1
    assert caffe_pb2.FillerParameter.AVERAGE == 2
    assert caffe_pb2.SolverParameter.ADAM == 5
    assert caffe_pb2.SolverParameter.BINARYPROTO == 1
    assert caffe_pb2.ParamSpec.PERMISSIVE == 1


# --- defaults --------------------------------------------------------------

def test_defaults():
    s = caffe_pb2.SolverParameter()
    assert s.type == "SGD"
    assert s.solver_mode == caffe_pb2.SolverParameter.GPU
    assert s.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert s.regularization_type == "L2"
    assert s.random_seed == -1
    assert s.clip_gradients == -1
    assert s.average_loss == 1 and s.iter_size == 1
    assert s.test_initialization is True
    assert s.snapshot_after_train is True
    assert s.layer_wise_reduce is True
    assert s.delta == f32(1e-8)
    assert s.momentum2 == f32(0.999)
    assert s.rms_decay == f32(0.99)

    bn = caffe_pb2.BatchNormParameter()
    assert bn.moving_average_fraction == f32(0.999)
    assert bn.eps == f32(1e-5)

    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    pool = caffe_pb2.PoolingParameter()
    assert pool.round_mode == caffe_pb2.PoolingParameter.CEIL
    assert pool.pool == caffe_pb2.PoolingParameter.MAX
    assert pool.stride == 1 and pool.pad == 0

    conv = caffe_pb2.ConvolutionParameter()
    assert conv.bias_term is True
    assert conv.group == 1
    assert conv.axis == 1
    assert conv.force_nd_im2col is False

    lrn = caffe_pb2.LRNParameter()
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (5, 1.0, 0.75, 1.0)
    assert lrn.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS

    assert caffe_pb2.DropoutParameter().dropout_ratio == 0.5
    assert caffe_pb2.SoftmaxParameter().axis == 1
    assert caffe_pb2.InnerProductParameter().bias_term is True
    assert caffe_pb2.InnerProductParameter().axis == 1
    assert caffe_pb2.ConcatParameter().axis == 1
    assert caffe_pb2.CropParameter().axis == 2
    assert caffe_pb2.FlattenParameter().end_axis == -1
    assert caffe_pb2.ReshapeParameter().num_axes == -1
    assert caffe_pb2.EltwiseParameter().operation == caffe_pb2.EltwiseParameter.SUM
    assert caffe_pb2.EltwiseParameter().stable_prod_grad is True
    assert caffe_pb2.MVNParameter().eps == f32(1e-9)
    assert caffe_pb2.ExpParameter().base == -1.0
    assert caffe_pb2.SwishParameter().beta == 1.0
    assert caffe_pb2.ELUParameter().alpha == 1.0
    assert caffe_pb2.ScaleParameter().bias_term is False
    assert caffe_pb2.DataParameter().prefetch == 4
    assert caffe_pb2.ImageDataParameter().is_color is True
    assert caffe_pb2.WindowDataParameter().crop_mode == "warp"
    assert caffe_pb2.WindowDataParameter().fg_fraction == 0.25

    filler = caffe_pb2.FillerParameter()
    assert filler.type == "constant" and filler.std == 1.0 and filler.max == 1.0
    assert filler.sparse == -1
    assert filler.variance_norm == caffe_pb2.FillerParameter.FAN_IN

    spec = caffe_pb2.ParamSpec()
    assert spec.lr_mult == 1.0 and spec.decay_mult == 1.0
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.V0LayerParameter().biasterm is True
    assert caffe_pb2.V0LayerParameter().det_crop_mode == "warp"


def test_clip_is_required_like_caffe():
    clip = caffe_pb2.ClipParameter(min=0.0)
    assert not clip.IsInitialized()
    clip.max = 6.0
    assert clip.IsInitialized()


def test_text_round_trip():
    text = """
    name: "tiny"
    layer { name: "data" type: "Input" top: "data"
            input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
            convolution_param { num_output: 4 kernel_size: 3 pad: 1
                                weight_filler { type: "xavier" } } }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
            pooling_param { pool: AVE kernel_size: 2 stride: 2 round_mode: FLOOR } }
    layer { name: "clip" type: "Clip" bottom: "pool" top: "pool"
            clip_param { min: 0 max: 6 } }
    """
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    again = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    assert again == net
    assert again.layer[1].convolution_param.kernel_size == [3]
    assert again.layer[2].pooling_param.round_mode == caffe_pb2.PoolingParameter.FLOOR
    assert again.layer[3].clip_param.max == 6.0


# --- real Caffe files ------------------------------------------------------

def _is_solver(path):
    return "solver" in path.name.lower()


def test_zoo_prototxts_parse(zoo):
    files = sorted(zoo.rglob("*.prototxt"))
    assert len(files) > 20, f"only {len(files)} prototxt files under {zoo}"
    failures = []
    for path in files:
        message = caffe_pb2.SolverParameter() if _is_solver(path) else caffe_pb2.NetParameter()
        try:
            text_format.Merge(path.read_text(), message)
        except text_format.ParseError as exc:
            failures.append(f"{path}: {exc}")
            continue
        if isinstance(message, caffe_pb2.NetParameter):
            if not (message.layer or message.layers):
                failures.append(f"{path}: parsed to a net with no layers")
        elif not (message.net or message.train_net or message.net_param.layer
                  or message.net_param.layers or message.train_net_param.layer):
            failures.append(f"{path}: solver names no net")
    assert not failures, "\n".join(failures)
