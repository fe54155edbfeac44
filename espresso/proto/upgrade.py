"""Upgrading old net and solver formats to the current ones, with Caffe's rules (upgrade_proto.cpp).

`upgrade_net(param, lines)` rewrites `param` in place, in Caffe's order: V0 layers -> V1
(padding layers folded into the conv/pool they feed), V1 data-layer transformation fields ->
transform_param, V1 `layers` -> `layer`, legacy `input` fields -> an Input layer, BatchNorm param
specs frozen.  `lines` (one entry per layer block: a source line, None, or anything the caller
wants carried along, such as a weights file's arrays) stays aligned with `param.layer`.
"""

import warnings

try:
    from google.protobuf.unknown_fields import UnknownFieldSet
except ImportError:  # protobuf < 4.22 has message.UnknownFields() instead
    UnknownFieldSet = None

from espresso.errors import EspressoError, NetError
from espresso.proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter

# V1LayerParameter.LayerType enum name -> layer type string: a fixed fact of the format.
V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V0 type strings -> V1 enum names (Caffe's UpgradeV0LayerType).
V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS", "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
    "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
    "tanh": "TANH", "window_data": "WINDOW_DATA",
}

_ANY = None  # a V0 field that every layer type moves to the same place
_FILLERS = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
            "window_data": "window_data_param", "infogain_loss": "infogain_loss_param"}
_BATCHES = {t: p for t, p in _SOURCES.items() if t != "infogain_loss"}
_KERNELS = {"conv": "convolution_param", "pool": "pooling_param"}
_LRN = {"lrn": "lrn_param"}
_WINDOW = {"window_data": "window_data_param"}

# V0 field -> ({V0 type or _ANY: V1 sub-message}, field name there); Caffe's UpgradeV0LayerParameter.
V0_FIELDS = {
    "num_output": (_FILLERS, "num_output"), "biasterm": (_FILLERS, "bias_term"),
    "weight_filler": (_FILLERS, "weight_filler"), "bias_filler": (_FILLERS, "bias_filler"),
    "pad": (_KERNELS, "pad"), "kernelsize": (_KERNELS, "kernel_size"), "stride": (_KERNELS, "stride"),
    "group": ({"conv": "convolution_param"}, "group"), "pool": ({"pool": "pooling_param"}, "pool"),
    "dropout_ratio": ({"dropout": "dropout_param"}, "dropout_ratio"),
    "local_size": (_LRN, "local_size"), "alpha": (_LRN, "alpha"), "beta": (_LRN, "beta"), "k": (_LRN, "k"),
    "source": (_SOURCES, "source"), "batchsize": (_BATCHES, "batch_size"),
    "scale": ({_ANY: "transform_param"}, "scale"), "meanfile": ({_ANY: "transform_param"}, "mean_file"),
    "cropsize": ({_ANY: "transform_param"}, "crop_size"), "mirror": ({_ANY: "transform_param"}, "mirror"),
    "rand_skip": ({"data": "data_param", "images": "image_data_param"}, "rand_skip"),
    "shuffle_images": ({"images": "image_data_param"}, "shuffle"),
    "new_height": ({"images": "image_data_param"}, "new_height"),
    "new_width": ({"images": "image_data_param"}, "new_width"),
    "concat_dim": ({"concat": "concat_param"}, "concat_dim"),
    "det_fg_threshold": (_WINDOW, "fg_threshold"), "det_bg_threshold": (_WINDOW, "bg_threshold"),
    "det_fg_fraction": (_WINDOW, "fg_fraction"), "det_context_pad": (_WINDOW, "context_pad"),
    "det_crop_mode": (_WINDOW, "crop_mode"),
    "hdf5_output_param": ({"hdf5_output": "hdf5_output_param"}, None),  # the whole message
}

SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                "ADADELTA": "AdaDelta", "ADAM": "Adam"}

_DATA_TYPES = {"DATA": "data_param", "IMAGE_DATA": "image_data_param", "WINDOW_DATA": "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def upgrade_net(param, lines=None):
    """Bring `param` to the current format in place and return it; `lines` (a list) follows."""
    lines = [] if lines is None else lines
    if len(lines) != len(param.layer) + len(param.layers):  # the caller could not tell: no lines at all
        lines[:] = [None] * (len(param.layer) + len(param.layers))
    if param.layer and param.layers:
        raise NetError("the net mixes 'layer' and the old 'layers' (V1) blocks; "
                       "write every layer in one format, preferably 'layer'")
    if any(v1.HasField("layer") for v1 in param.layers):
        _upgrade_v0(param, lines)
    _upgrade_data_transformation(param)
    if param.layers:
        _upgrade_v1(param)
    _upgrade_input_fields(param, lines)
    _upgrade_batch_norm(param)
    return param


def upgrade_solver(solver):
    """The legacy `solver_type` enum becomes the `type` string (Caffe's UpgradeSolverType)."""
    if not solver.HasField("solver_type"):
        return solver
    enum_name = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
    name = SOLVER_TYPES[enum_name]
    if solver.HasField("type"):  # Caffe refuses both fields even when they agree
        raise EspressoError(f"solver: 'solver_type: {enum_name}' (legacy) and 'type: \"{solver.type}\"' "
                            "cannot both be given; keep only 'type'")
    solver.type = name
    solver.ClearField("solver_type")
    return solver


def v1_type_names():
    """V1 enum name -> type string: Caffe's fixed table, plus what layer classes declare."""
    from espresso.layer import legacy_types  # here: espresso.layer imports every layer module

    return {**V1_TYPES, **legacy_types()}


# *** V0 (layers { layer { type: "conv" ... } }) ***
def _upgrade_v0(param, lines):
    """Caffe's UpgradeV0Net: fold padding layers away, then turn each V0 layer into a V1 one."""
    _fold_padding(param, lines)
    upgraded = [_v0_to_v1(connection) for connection in param.layers]
    del param.layers[:]
    param.layers.extend(upgraded)


def _fold_padding(param, lines):
    """A "padding" layer feeding a conv or pool layer becomes that layer's `pad` (UpgradeV0PaddingLayers)."""
    producer = {name: None for name in param.input}  # blob -> the V1 entry that last wrote it
    kept, kept_lines = [], []
    for connection, line in zip(param.layers, lines, strict=True):
        layer = connection.layer
        for j, blob in enumerate(connection.bottom):
            if blob not in producer:
                raise NetError(f"V0 layer '{layer.name}': unknown bottom blob '{blob}' (bottom {j})")
            source = producer[blob]
            if source is not None and source.layer.type == "padding":
                _check_padding(layer, connection, source)
                layer.pad = source.layer.pad
                connection.bottom[j] = source.bottom[0]
        for blob in connection.top:
            producer[blob] = connection
        if layer.type != "padding":
            kept.append(connection)
            kept_lines.append(line)
    del param.layers[:]
    param.layers.extend(kept)
    lines[:] = kept_lines


def _check_padding(layer, connection, padding):
    where = f"V0 layer '{layer.name}' (after padding layer '{padding.layer.name}')"
    if layer.type not in ("conv", "pool"):
        raise NetError(f"{where}: a padding layer can only feed a conv or pool layer, not '{layer.type}'")
    if len(connection.bottom) != 1 or len(padding.bottom) != 1 or len(padding.top) != 1:
        raise NetError(f"{where}: the padding layer and its reader must each have one bottom and one top")


def _v0_to_v1(connection):
    """Caffe's UpgradeV0LayerParameter: V0 fields go to the V1 sub-message that owns them now."""
    v0 = connection.layer
    v1 = V1(bottom=connection.bottom, top=connection.top)
    if v0.HasField("name"):
        v1.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_TYPES:
            raise NetError(f"V0 layer '{v0.name}': unknown type '{v0.type}' (known: {', '.join(V0_TYPES)})")
        v1.type = V1.LayerType.Value(V0_TYPES[v0.type])
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        if field.name in V0_FIELDS:
            _move_v0_field(v0, field.name, value, v1)
    return v1


def _move_v0_field(v0, name, value, v1):
    owners, target = V0_FIELDS[name]
    owner = owners.get(_ANY, owners.get(v0.type))
    if owner is None:  # Caffe logs an error and drops the field
        warnings.warn(f"V0 layer '{v0.name}': field '{name}' means nothing for type '{v0.type}'; ignored",
                      stacklevel=4)
        return
    message = getattr(v1, owner)
    if target is None:
        message.CopyFrom(value)
    elif name == "pool":  # same method names, different enums
        method = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
        message.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(method)
    elif message.DESCRIPTOR.fields_by_name[target].message_type is not None:
        getattr(message, target).CopyFrom(value)
    elif _is_repeated(message, target):  # pad, kernel_size, stride became repeated
        getattr(message, target).append(value)
    else:
        setattr(message, target, value)


def _is_repeated(message, field):
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    if hasattr(descriptor, "is_repeated"):  # protobuf >= 5 spells it this way
        return descriptor.is_repeated
    return descriptor.label == descriptor.LABEL_REPEATED


# *** V1 data-layer transformation fields ***
def _upgrade_data_transformation(param):
    """Caffe's UpgradeNetDataTransformation: scale/mean_file/crop_size/mirror of V1 Data, ImageData
    and WindowData params move into transform_param."""
    for v1 in param.layers:
        owner = _DATA_TYPES.get(V1.LayerType.Name(v1.type))
        if owner is None or not v1.HasField(owner):
            continue
        sub = getattr(v1, owner)
        for field in _TRANSFORM_FIELDS:
            if sub.HasField(field):
                setattr(v1.transform_param, field, getattr(sub, field))
                sub.ClearField(field)


# *** V1 (layers { type: CONVOLUTION ... }) ***
def _upgrade_v1(param):
    """Caffe's UpgradeV1Net: every `layers` entry becomes a `layer`."""
    names = v1_type_names()
    upgraded = [_v1_to_layer(v1, i, names) for i, v1 in enumerate(param.layers)]
    del param.layers[:]
    param.layer.extend(upgraded)


def _v1_to_layer(v1, index, names):
    """Caffe's UpgradeV1LayerParameter."""
    where = f"layers {index} ('{v1.name}')"
    layer = caffe_pb2.LayerParameter(bottom=v1.bottom, top=v1.top, include=v1.include, exclude=v1.exclude,
                                     blobs=v1.blobs, loss_weight=v1.loss_weight)
    if v1.HasField("name"):
        layer.name = v1.name
    if v1.HasField("type"):
        layer.type = names[V1.LayerType.Name(v1.type)]
    _refuse_unknown_enums(v1, where)
    _v1_param_specs(v1, layer)
    for field, value in v1.ListFields():  # every *_param, transform_param and loss_param
        if field.name.endswith("_param") and field.name in layer.DESCRIPTOR.fields_by_name:
            getattr(layer, field.name).CopyFrom(value)
    return layer


def _refuse_unknown_enums(v1, where):
    """A binary file's enum number this schema does not know lands in the unknown fields, where it
    would silently read as unset: name it instead."""
    for field in UnknownFieldSet(v1) if UnknownFieldSet else v1.UnknownFields():
        if field.field_number in (5, 1002) and field.wire_type == 0:  # type, blob_share_mode
            name = V1.DESCRIPTOR.fields_by_number[field.field_number].name
            raise NetError(f"{where}: field '{name}': unknown value {field.data}")


def _v1_param_specs(v1, layer):
    """V1's parallel lists (param, blob_share_mode, blobs_lr, weight_decay) become ParamSpecs."""
    def spec(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(V1.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay


# *** legacy net inputs ***
def _upgrade_input_fields(param, lines):
    """Legacy `input:` + `input_dim:` / `input_shape:` become one Input layer named "input" in
    front (Caffe's UpgradeNetInput).  `input:` alone (old .caffemodel files) is simply dropped."""
    if param.input_dim or param.input_shape:
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=param.input)
        layer.input_param.shape.extend(_input_shapes(param))
        layers = [layer] + list(param.layer)
        del param.layer[:]
        param.layer.extend(layers)
        lines.insert(0, None)
    for field in ("input", "input_dim", "input_shape"):
        param.ClearField(field)


def _input_shapes(param):
    inputs = list(param.input)
    from_dims = None
    if param.input_dim:
        if len(param.input_dim) != 4 * len(inputs):
            raise NetError(f"net inputs {inputs}: field 'input_dim' needs 4 values per input "
                           f"({4 * len(inputs)}), got {len(param.input_dim)}")
        dims = list(param.input_dim)
        from_dims = [caffe_pb2.BlobShape(dim=dims[4 * i: 4 * i + 4]) for i in range(len(inputs))]
    if not param.input_shape:
        return from_dims
    shapes = list(param.input_shape)
    if len(shapes) not in (1, len(inputs)):
        raise NetError(f"net inputs {inputs}: field 'input_shape' given {len(shapes)} times; "
                       f"give it once per input")
    if from_dims is not None and [list(s.dim) for s in shapes] != [list(s.dim) for s in from_dims]:
        raise NetError(f"net inputs {inputs}: fields 'input_shape' and 'input_dim' disagree; keep one")
    return shapes


# *** BatchNorm ***
def _upgrade_batch_norm(param):
    """Caffe's UpgradeNetBatchNorm: a BatchNorm layer with three param specs (the old way of
    freezing its statistics) gets lr_mult 0 and decay_mult 0 on each; nothing else changes."""
    for layer in param.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
