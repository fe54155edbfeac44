"""ONNX in: an .onnx model as an ordinary Caffe net (a NetParameter) and its weights.

The graph is walked in its (topological) order.  Each tensor is either a constant (an
initializer, a Constant node, or folded: the Shape/Gather/Unsqueeze/Concat chains exporters
emit to compute shapes) or a blob of the Caffe net, whose shape is known at every step: each
emitted layer is set up once, alone, by Espresso's own layer class, so the shapes are Caffe's
(its pooling rounding included) and any mismatch with ONNX's is caught where it arises.

A shape constant computed from a blob's shape remembers which of its values came from the
batch dimension, so a Reshape to [batch, -1] becomes Caffe's [0, -1] and the net keeps
working at every batch size.  Graph inputs and outputs keep their ONNX names as blob names.

An op that cannot be mapped exactly is refused with its node name, op type and opset, before
anything is written; nothing is dropped silently.  Ops with no Caffe layer use Espresso's
(see docs/onnx.md).
"""

import mmap
import os

import numpy as np

from espresso import backend as backends
from espresso.blob import Blob
from espresso.errors import EspressoError, ModelFileError, NetError
from espresso.interop import unique_name
from espresso.layer import layer_class
from espresso.proto import caffe_pb2
from espresso.proto.text import require_regular
from espresso.proto.weights import length_field, wire_fields

OPSETS = range(7, 23)  # default-domain opsets read


class OnnxError(NetError):
    """An ONNX model that cannot be converted (an op, attribute or shape Espresso cannot map)."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise EspressoError("ONNX import needs the 'onnx' package: pip install onnx "
                            "(or pip install 'espresso-nn[onnx]')") from None
    return onnx


def read_model(path):
    """(ModelProto, {initializer name: array}) of an .onnx file, checked.  The weights are never
    read into memory here: those inside the file are cut out of the message and mapped where they
    lie (read-only views), those in external data files beside it are mapped there."""
    onnx = _onnx()
    require_regular(path)
    try:
        model, weights, cut = _lean_model(onnx, os.fspath(path))
        onnx.checker.check_model(_without_data(onnx, model, cut))
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelFileError(f"{path}: not a readable ONNX model: {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # protobuf's DecodeError has no common base with the above
        if type(e).__name__ != "DecodeError":
            raise
        raise ModelFileError(f"{path}: not an ONNX model (the protobuf does not parse: {e})") from None
    return model, weights


_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def _lean_model(onnx, path):
    """The model with each initializer's raw_data cut out, the initializers as arrays, and the
    names of those cut out."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
    message, places = bytearray(), []
    for field, wire, start, value, end in wire_fields(buf):
        if (field, wire) != (_GRAPH, 2):
            message += buf[start:end]
            continue
        graph = bytearray()
        for g_field, g_wire, g_start, g_value, g_end in wire_fields(buf, value, end):
            if (g_field, g_wire) != (_INITIALIZER, 2):
                graph += buf[g_start:g_end]
                continue
            tensor, place = bytearray(), None
            for t_field, t_wire, t_start, t_value, t_end in wire_fields(buf, g_value, g_end):
                if (t_field, t_wire) == (_RAW_DATA, 2):
                    place = (t_value, t_end - t_value)
                else:
                    tensor += buf[t_start:t_end]
            graph += length_field(_INITIALIZER, bytes(tensor))
            places.append(place)
        message += length_field(_GRAPH, bytes(graph))
    model = onnx.ModelProto.FromString(bytes(message))
    weights = {t.name: _initializer(onnx, t, buf, place, _directory(path))
               for t, place in zip(model.graph.initializer, places, strict=True)}
    cut = {t.name for t, place in zip(model.graph.initializer, places) if place is not None}
    return model, weights, cut


def _initializer(onnx, tensor, buf, place, directory):
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return _external(tensor, directory)
    if place is None:  # values in a typed field (float_data, int64_data, ...): small, read
        return onnx.numpy_helper.to_array(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    offset, size = place
    if size != int(np.prod(tensor.dims)) * dtype.itemsize:
        raise ModelFileError(f"tensor '{tensor.name}': {size} bytes for shape {list(tensor.dims)} of {dtype}")
    return np.frombuffer(buf, dtype, size // dtype.itemsize, offset).reshape(tuple(tensor.dims))


def _without_data(onnx, model, cut):
    """A copy for onnx.checker, the initializers cut out or external one value each (the checker
    would want the values left in the files; their sizes are checked when they are mapped)."""
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    for tensor in checked.graph.initializer:
        if tensor.name not in cut and tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        del tensor.dims[:], tensor.external_data[:]
        tensor.data_location, tensor.raw_data = onnx.TensorProto.DEFAULT, bytes(itemsize)
    return checked


def _directory(path):
    """Where a model's external data files lie: beside it."""
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def _external(tensor, directory):
    """A tensor whose values lie in a file beside the model, mapped into memory (not read)."""
    onnx = _onnx()
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = os.path.normpath(os.path.join(directory, info.get("location", "")))
    if not location.startswith(os.path.join(directory, "")):
        raise ModelFileError(f"tensor '{tensor.name}': external data '{info.get('location')}' lies outside "
                             f"the model's directory {directory}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count, offset = int(np.prod(tensor.dims)), int(info.get("offset", 0))
    try:
        size = os.path.getsize(location)
    except OSError as e:
        raise ModelFileError(f"tensor '{tensor.name}': external data file {location}: {e.strerror}") from None
    if offset + count * dtype.itemsize > size:
        raise ModelFileError(f"tensor '{tensor.name}': needs {count * dtype.itemsize} bytes at {offset} of "
                             f"{location}, which has {size}")
    if count == 0:
        return np.zeros(tuple(tensor.dims), dtype)
    return np.memmap(location, dtype.newbyteorder("<"), "r", offset, tuple(tensor.dims))


def import_onnx(path_or_model, batch=None):
    """(NetParameter, {layer name: [weight arrays]}) for an .onnx file or ModelProto; a symbolic
    batch dimension is given `batch` (default 1) in the Input layer's shapes (a fixed one stays)."""
    if isinstance(path_or_model, (str, os.PathLike)):
        model, weights = read_model(path_or_model)
    else:
        onnx, model = _onnx(), path_or_model
        weights = {t.name: _initializer(onnx, t, None, None, os.getcwd()) for t in model.graph.initializer}
    return _Converter(model, batch, weights).run()


def load_onnx(path, batch=None, backend=None):
    """An espresso.Net (TEST phase) with the model's weights."""
    from espresso.net import TEST, Net

    param, weights = import_onnx(path, batch)
    net = Net(param, TEST, backend=backend)
    set_weights(net, weights)
    return net


def set_weights(net, weights):
    for name, arrays in weights.items():
        for blob, array in zip(net.layer_dict[name].blobs, arrays, strict=True):
            blob.data[...] = net.backend.to_device(np.asarray(array).reshape(blob.shape), net.dtype)


# layers whose output count sets their weights' size: set up with one output to learn the shapes
_WIDE = {"Convolution": "convolution_param", "Deconvolution": "convolution_param",
         "InnerProduct": "inner_product_param"}


class _Shape:
    """A constant computed from blob shapes: its values, and which of them are the batch size
    (or were computed from it)."""

    def __init__(self, values, batch):
        self.values, self.batch = np.asarray(values), np.asarray(batch, bool)


class _Converter:
    def __init__(self, model, batch, weights):
        onnx = _onnx()
        self.onnx, self.graph = onnx, model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if self.opset not in OPSETS:
            raise OnnxError(f"ONNX opset {self.opset} is not supported (opsets {OPSETS.start} to {OPSETS.stop - 1})")
        self.batch = batch
        self.consts = dict(weights)
        self.shapes = {}  # blob name -> shape (tuple)
        self.layers, self.weights, self.names = [], {}, set()
        self.aliases = {}  # ONNX name -> the blob it is (Identity, Dropout)
        self.uses = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.cpu = backends.get("cpu")

    # *** the walk ***
    def run(self):
        self._inputs()
        for node in self.graph.node:
            self.node = node
            handler = _OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if handler is None:
                self.refuse("has no Espresso mapping")
            handler(self, node, self._attrs(node))
        self._outputs()
        param = caffe_pb2.NetParameter(name=self.graph.name or "onnx")
        param.layer.extend(self.layers)
        return param, self.weights

    def refuse(self, why):
        node = self.node
        raise OnnxError(f"ONNX node '{node.name or '(unnamed)'}' ({node.op_type}, opset {self.opset}): {why}")

    def _attrs(self, node):
        values = {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}
        return {name: v.decode() if isinstance(v, bytes) else v for name, v in values.items()}

    def _inputs(self):
        tops, shapes = [], []
        for value in self.graph.input:
            if value.name in self.consts:
                continue  # an initializer listed as an input (IR < 4)
            dims = value.type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            if None in shape[1:] or not shape:
                raise OnnxError(f"ONNX input '{value.name}': shape {[d.dim_param or d.dim_value for d in dims]}; "
                                "only the first (batch) dimension may be symbolic")
            if shape[0] is None:
                shape[0] = self.batch or 1
            tops.append(value.name)
            shapes.append(shape)
            self.shapes[value.name] = tuple(shape)
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=tops)
        for shape in shapes:
            layer.input_param.shape.add().dim.extend(shape)
        self.names.add("input")
        self.layers.append(layer)

    def _outputs(self):
        for value in self.graph.output:
            name = value.name
            if name in self.consts:
                raise OnnxError(f"ONNX output '{name}' is a constant; Caffe nets output blobs")
            if self.aliases.get(name, name) != name:  # an output that is another blob's alias: copy it
                self.add("Split", [name], name=f"{name}_output", bottoms=[self.blob(name)])

    # *** tensors ***
    def is_const(self, name):
        return name == "" or name in self.consts

    def const(self, name, default=None):
        if name == "":
            return default
        value = self.consts.get(name)
        if value is None:
            self.refuse(f"input '{name}' must be a constant here (it is computed by the net)")
        return value.values if isinstance(value, _Shape) else value

    def blob(self, name):
        name = self.aliases.get(name, name)
        if name not in self.shapes:
            self.refuse(f"input '{name}' is a constant where Espresso needs a blob")
        return name

    def shape(self, name):
        return self.shapes[self.blob(name)]

    def input(self, i):
        node = self.node
        return node.input[i] if i < len(node.input) else ""

    # *** emitting layers ***
    def add(self, type_, tops, weights=(), name=None, bottoms=None, **params):
        """Add a Caffe layer reading `bottoms` (default: the node's first input) and writing
        `tops`; its top shapes come from setting it up alone."""
        bottoms = [self.blob(self.input(0))] if bottoms is None else bottoms
        layer = caffe_pb2.LayerParameter(name=self._unique(name or self.node.name or self.node.op_type),
                                         type=type_, bottom=bottoms, top=tops, **params)
        shapes = self._setup(layer, [self.shapes[b] for b in bottoms], weights)
        for top, shape in zip(tops, shapes, strict=True):
            self.shapes[top] = shape
        self.layers.append(layer)
        if weights:
            self.weights[layer.name] = [np.asarray(w, np.float32) for w in weights]
        return layer

    def _unique(self, name):
        unique = unique_name(name, self.names, "_")
        self.names.add(unique)
        return unique

    def _setup(self, layer, shapes, weights):
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(layer)
        param.phase = caffe_pb2.TEST
        wide = param.type in _WIDE  # set up with one output (per group): its weights are not made
        if wide:
            outputs = getattr(param, _WIDE[param.type])
            count, outputs.num_output = outputs.num_output, getattr(outputs, "group", 1)
        instance = layer_class(param.type)(param, self.cpu, caffe_pb2.TEST)
        bottom = [Blob(s, np.float32, self.cpu) for s in shapes]
        top = [Blob((), np.float32, self.cpu) for _ in param.top]
        try:
            instance.setup_all(bottom, top)
        except EspressoError as e:
            self.refuse(f"maps to a Caffe {param.type} layer that refuses it: {e}")
        if wide:  # the outputs' axis: 1 for convolutions, the last for InnerProduct
            axis = 1 if param.type != "InnerProduct" else top[0].num_axes - 1
            return [top[0].shape[:axis] + (count,) + top[0].shape[axis + 1:]]
        for blob, array in zip(instance.blobs, weights, strict=True):
            if blob.count != np.size(array):
                self.refuse(f"weight of shape {np.shape(array)} for a Caffe blob of shape {blob.shape}")
        return [t.shape for t in top]

    def temp(self, suffix):
        """A fresh blob name for an intermediate result."""
        return self._unique(f"{self.node.output[0]}_{suffix}")


# *** constant folding ***
def _fold(function, marks="first"):
    """An op on constants: `function(converter, node, attrs, *values)` gives the output value(s).
    Which output values come from the batch size: those the op takes from batch-marked values of
    its first input ("first": Gather, Slice, ...) or of any input ("all": Concat), or every value
    that any batch-marked value enters ("any": arithmetic)."""

    def handler(c, node, attrs):
        found = [c.consts.get(name) if name else None for name in node.input]
        values = [v.values if isinstance(v, _Shape) else v for v in found]
        masks = [v.batch if isinstance(v, _Shape) else None if v is None else np.zeros(np.shape(v), bool)
                 for v in found]
        out = function(c, node, attrs, *values)
        outs = out if isinstance(out, list) else [out]
        if not any(isinstance(v, _Shape) and v.batch.any() for v in found):
            for name, value in zip(node.output, outs):
                c.consts[name] = value
            return
        if marks == "any":
            batch = np.logical_or.reduce(np.broadcast_arrays(*[m for m in masks if m is not None]))
        else:
            marked = [m.astype(np.int64) if m is not None and (marks == "all" or i == 0) else v
                      for i, (m, v) in enumerate(zip(masks, values))]
            batch = function(c, node, attrs, *marked)
        batches = batch if isinstance(batch, list) else [batch] * len(outs)
        for name, value, mask in zip(node.output, outs, batches):
            c.consts[name] = _Shape(value, np.broadcast_to(np.asarray(mask) != 0, np.shape(value)))
    return handler


def _foldable(mapped, folded):
    """An op folded when every input is a constant, else mapped to layers."""

    def handler(c, node, attrs):
        if all(c.is_const(name) for name in node.input):
            return folded(c, node, attrs)
        return mapped(c, node, attrs)
    return handler


def _axes_input(c, node, attrs, index=1):
    """`axes` as an attribute (older opsets) or an input."""
    if "axes" in attrs:
        return list(attrs["axes"])
    return None if len(node.input) <= index or not node.input[index] else [int(a) for a in c.const(node.input[index])]


def _shape_of(c, node, attrs):
    shape = c.shape(node.input[0])
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    mask = np.zeros(len(shape), bool)
    mask[0] = True  # axis 0 is the batch
    c.consts[node.output[0]] = _Shape(np.array(shape, np.int64)[start:end], mask[start:end])


def _numpy(function, marks="first"):
    return _fold(lambda c, node, attrs, *values: function(attrs, *values), marks)


def _gather(attrs, data, indices):
    return np.take(data, indices, axis=attrs.get("axis", 0))


def _slice_values(c, node, attrs, data, starts=None, ends=None, axes=None, steps=None):
    if "starts" in attrs:  # opset < 10
        starts, ends, axes = attrs["starts"], attrs["ends"], attrs.get("axes")
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e) if e < 2**62 else None, int(st))
    return data[tuple(index)]


def _unsqueeze_values(c, node, attrs, data, axes=None):
    axes = attrs.get("axes", axes)
    out_rank = data.ndim + len(axes)
    return np.expand_dims(data, tuple(int(a) % out_rank for a in axes))


def _squeeze_values(c, node, attrs, data, axes=None):
    axes = attrs.get("axes", axes)
    return np.squeeze(data, None if axes is None else tuple(int(a) % data.ndim for a in axes))


def _concat_values(c, node, attrs, *values):
    return np.concatenate([np.atleast_1d(v) for v in values], axis=attrs["axis"])


def _cast(attrs, value):
    return value.astype(_onnx().helper.tensor_dtype_to_np_dtype(attrs["to"]))


def _constant(c, node, attrs):
    onnx = c.onnx
    if "value" in attrs:
        value = onnx.numpy_helper.to_array(attrs["value"])
    else:
        key = next(k for k in ("value_float", "value_floats", "value_int", "value_ints") if k in attrs)
        value = np.array(attrs[key], np.float32 if "float" in key else np.int64)
    c.consts[node.output[0]] = value


def _constant_of_shape(attrs, shape):
    fill = _onnx().numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return np.full(tuple(int(s) for s in shape), fill.reshape(-1)[0], fill.dtype)


def _reshape_values(attrs, data, shape):
    shape = [d if d != 0 else data.shape[i] for i, d in enumerate(shape)]
    return data.reshape(shape)


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": None, "Pow": np.power}


def _binary_values(op):
    def function(attrs, a, b):
        if op == "Div":  # integer division truncates toward zero in ONNX
            return (a // b) if a.dtype.kind in "iu" and b.dtype.kind in "iu" else np.divide(a, b).astype(a.dtype)
        return _BINARY[op](a, b).astype(np.result_type(a, b))
    return function


# *** ops mapped to layers ***
def _alias(c, node, attrs):
    if c.is_const(node.input[0]):
        c.consts[node.output[0]] = c.consts[node.input[0]]
    else:
        c.aliases[node.output[0]] = c.blob(node.input[0])


def _simple(type_, **fixed):
    def handler(c, node, attrs):
        c.add(type_, [node.output[0]], **fixed)
    return handler


def _leaky_relu(c, node, attrs):
    c.add("ReLU", [node.output[0]], relu_param={"negative_slope": attrs.get("alpha", 0.01)})


def _elu(c, node, attrs):
    c.add("ELU", [node.output[0]], elu_param={"alpha": attrs.get("alpha", 1.0)})


def _prelu(c, node, attrs):
    slope = c.const(node.input[1]).astype(np.float32)
    channels = c.shape(node.input[0])[1]
    if slope.size == 1:
        return c.add("PReLU", [node.output[0]], [slope.reshape(1)], prelu_param={"channel_shared": True})
    if slope.size != channels or slope.squeeze().shape != (channels,):
        c.refuse(f"slope of shape {slope.shape}: Caffe's PReLU takes one slope or one per channel ({channels})")
    c.add("PReLU", [node.output[0]], [slope.reshape(channels)])


def _clip(c, node, attrs):
    low = attrs.get("min", c.const(c.input(1), np.float32(-np.inf)))
    high = attrs.get("max", c.const(c.input(2), np.float32(np.inf)))
    c.add("Clip", [node.output[0]], clip_param={"min": float(low), "max": float(high)})


def _power(c, node, out, bottom, power=1.0, scale=1.0, shift=0.0):
    return c.add("Power", [out], bottoms=[bottom], power_param={"power": power, "scale": scale, "shift": shift})


def _hard_sigmoid(c, node, attrs, out=None):
    mid = c.temp("affine")
    _power(c, node, mid, c.blob(node.input[0]), scale=attrs.get("alpha", 0.2), shift=attrs.get("beta", 0.5))
    c.add("Clip", [out or node.output[0]], bottoms=[mid], clip_param={"min": 0.0, "max": 1.0})


def _hard_swish(c, node, attrs):
    gate = c.temp("gate")
    _hard_sigmoid(c, node, {"alpha": 1 / 6, "beta": 0.5}, gate)
    c.add("Eltwise", [node.output[0]], bottoms=[c.blob(node.input[0]), gate], eltwise_param={"operation": 0})


def _unary_power(**params):
    def handler(c, node, attrs):
        _power(c, node, node.output[0], c.blob(node.input[0]), **params)
    return handler


def _softmax(c, node, attrs, log=False):
    shape = c.shape(node.input[0])
    axis = attrs.get("axis", -1 if c.opset >= 13 else 1) % len(shape)
    out = c.temp("softmax") if log else node.output[0]
    if c.opset >= 13 or axis == len(shape) - 1:
        c.add("Softmax", [out], softmax_param={"axis": axis})
    else:  # opsets < 13 take the softmax over all axes from `axis` on, flattened
        flat, soft = c.temp("flat"), c.temp("soft")
        c.add("Flatten", [flat], flatten_param={"axis": axis})
        c.add("Softmax", [soft], bottoms=[flat], softmax_param={"axis": axis})
        c.add("Reshape", [out], bottoms=[soft], reshape_param={"shape": {"dim": _keep_batch(shape)}})
    if log:
        c.add("Log", [node.output[0]], bottoms=[out])


def _keep_batch(shape):
    return [0] + list(shape[1:])


def _conv(c, node, attrs):
    weight, bias = c.const(node.input[1]), c.const(c.input(2))
    kernel = list(weight.shape[2:])
    strides, dilations = attrs.get("strides", [1] * len(kernel)), attrs.get("dilations", [1] * len(kernel))
    pads = _pads(c, attrs, c.shape(node.input[0])[2:], kernel, strides, dilations)
    bottom = _pad_asymmetric(c, pads, len(kernel))
    param = {"num_output": weight.shape[0], "group": attrs.get("group", 1), "bias_term": bias is not None,
             "kernel_size": kernel, "stride": strides, "dilation": dilations, "pad": pads[:len(kernel)]}
    c.add("Convolution", [node.output[0]], [weight] + ([bias] if bias is not None else []), bottoms=[bottom],
          convolution_param=param)


def _conv_transpose(c, node, attrs):
    weight, bias = c.const(node.input[1]), c.const(c.input(2))
    spatial, group = weight.ndim - 2, attrs.get("group", 1)
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in attrs:
        c.refuse("auto_pad and output_shape are not supported; give explicit pads")
    if pads[:spatial] != pads[spatial:] or any(attrs.get("output_padding", [0] * spatial)):
        c.refuse(f"asymmetric pads {pads} or output_padding: Caffe's Deconvolution crops evenly")
    param = {"num_output": weight.shape[1] * group, "group": group, "bias_term": bias is not None,
             "kernel_size": list(weight.shape[2:]), "stride": attrs.get("strides", [1] * spatial),
             "dilation": attrs.get("dilations", [1] * spatial), "pad": pads[:spatial]}
    c.add("Deconvolution", [node.output[0]], [weight] + ([bias] if bias is not None else []),
          convolution_param=param)


def _pads(c, attrs, sizes, kernel, strides, dilations):
    """ONNX pads [begin..., end...], with auto_pad resolved."""
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(attrs.get("pads", [0] * 2 * len(kernel))) if auto == "NOTSET" else [0] * 2 * len(kernel)
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _pad_asymmetric(c, pads, spatial, value=0.0):
    """The input blob, first padded by the extra end (or begin) amount where pads differ."""
    bottom = c.blob(c.node.input[0])
    extra = [e - b for b, e in zip(pads[:spatial], pads[spatial:])]
    if not any(extra):
        return bottom
    if any(x < 0 for x in extra):
        c.refuse(f"pads {pads}: more padding at the start than at the end")
    padded = c.temp("pad")
    rank = len(c.shapes[bottom])
    full = [0] * (rank - spatial) + [0] * spatial + [0] * (rank - spatial) + extra
    c.add("Pad", [padded], bottoms=[bottom], pad_param={"pad": full, "value": value})
    return padded


def _pool(kind):
    def handler(c, node, attrs):
        shape, kernel = c.shape(node.input[0]), list(attrs["kernel_shape"])
        spatial = len(kernel)
        if spatial != 2:
            c.refuse(f"{spatial}-D pooling: Caffe pools 2-D")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            c.refuse("dilated pooling has no Caffe layer")
        strides = list(attrs.get("strides", [1, 1]))
        pads = _pads(c, attrs, shape[2:], kernel, strides, [1, 1])
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "AVE" and not attrs.get("count_include_pad", 0) and any(pads):
            return _average_excluding_pads(c, node, kernel, strides, pads, ceil)
        bottom = _pad_asymmetric(c, pads, spatial, -np.inf if kind == "MAX" else 0.0)
        _pooling(c, node.output[0], bottom, kind, kernel, strides, pads[:2], ceil)
    return handler


def _pooling(c, out, bottom, kind, kernel, strides, pads, ceil):
    param = {"pool": 0 if kind == "MAX" else 1, "kernel_h": kernel[0], "kernel_w": kernel[1],
             "stride_h": strides[0], "stride_w": strides[1], "pad_h": pads[0], "pad_w": pads[1],
             "round_mode": 0 if ceil else 1}
    return c.add("Pooling", [out], bottoms=[bottom], pooling_param=param)


def _average_excluding_pads(c, node, kernel, strides, pads, ceil):
    """ONNX's count_include_pad=0: Caffe's average (which counts the padding) times, at each
    output position, the window's size over its count of real values."""
    real_h, real_w = c.shape(node.input[0])[2:]
    bottom = _pad_asymmetric(c, pads, 2)
    summed = c.temp("avg")
    _pooling(c, summed, bottom, "AVE", kernel, strides, pads[:2], ceil)
    h, w = c.shapes[bottom][2:]
    out_h, out_w = c.shapes[summed][2:]
    ratio = np.empty((out_h, out_w), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * strides[0] - pads[0], j * strides[1] - pads[1]
            caffe = (min(r0 + kernel[0], h + pads[0]) - r0) * (min(c0 + kernel[1], w + pads[1]) - c0)
            real = (min(r0 + kernel[0], real_h) - max(r0, 0)) * (min(c0 + kernel[1], real_w) - max(c0, 0))
            ratio[i, j] = caffe / real
    c.add("Scale", [node.output[0]], [ratio], bottoms=[summed], scale_param={"axis": 2, "num_axes": 2})


def _global_pool(kind):
    def handler(c, node, attrs):
        c.add("Pooling", [node.output[0]], pooling_param={"pool": 0 if kind == "MAX" else 1, "global_pooling": True})
    return handler


def _batch_norm(c, node, attrs):
    scale, bias, mean, var = (c.const(name).astype(np.float32) for name in node.input[1:5])
    normed = c.temp("normalized")
    c.add("BatchNorm", [normed], [mean, var, np.ones(1, np.float32)],
          batch_norm_param={"use_global_stats": True, "eps": attrs.get("epsilon", 1e-5)})
    c.add("Scale", [node.output[0]], [scale, bias], bottoms=[normed], scale_param={"bias_term": True})


def _instance_norm(c, node, attrs):
    scale, bias = c.const(node.input[1]), c.const(node.input[2])
    normed = c.temp("normalized")
    c.add("MVN", [normed], mvn_param={"eps": attrs.get("epsilon", 1e-5)})
    c.add("Scale", [node.output[0]], [scale, bias], bottoms=[normed], scale_param={"bias_term": True})


def _lrn(c, node, attrs):
    c.add("LRN", [node.output[0]], lrn_param={"local_size": attrs["size"], "alpha": attrs.get("alpha", 1e-4),
                                              "beta": attrs.get("beta", 0.75), "k": attrs.get("bias", 1.0)})


def _gemm(c, node, attrs):
    if attrs.get("transA", 0) or c.is_const(node.input[0]) or not c.is_const(node.input[1]):
        c.refuse("only blob x constant (A not transposed) maps to InnerProduct")
    weight, bias = c.const(node.input[1]), c.const(c.input(2))
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    weight = weight if attrs.get("transB", 0) else weight.T
    _inner_product(c, node, weight if alpha == 1 else weight * alpha,
                   None if bias is None else bias if beta == 1 else bias * beta, axis=1)


def _inner_product(c, node, weight, bias, axis):
    """Caffe's InnerProduct with weight (outputs, inputs); a bias of one value per output."""
    if bias is not None:
        bias = np.broadcast_to(bias, (weight.shape[0],)) if np.size(bias) in (1, weight.shape[0]) else None
        if bias is None:
            c.refuse("a bias that is not one value per output")
    param = {"num_output": weight.shape[0], "bias_term": bias is not None, "axis": axis}
    c.add("InnerProduct", [node.output[0]], [weight] + ([bias] if bias is not None else []),
          inner_product_param=param)


def _matmul(c, node, attrs):
    a, b = node.input[0], node.input[1]
    if c.is_const(a) or not c.is_const(b) or c.const(b).ndim != 2:
        c.refuse("only blob x 2-D constant maps to InnerProduct")
    _inner_product(c, node, c.const(b).T, None, axis=len(c.shape(a)) - 1)


def _binary(op):
    def handler(c, node, attrs):
        a, b = node.input
        if c.is_const(a) and c.is_const(b):
            return _numpy(_binary_values(op), "any")(c, node, attrs)
        if c.is_const(a) or c.is_const(b):
            return _with_const(c, node, op, a, b)
        return _two_blobs(c, node, op, c.blob(a), c.blob(b))
    return handler


def _with_const(c, node, op, a, b):
    """blob op constant (or constant op blob): Power for a scalar, else Scale/Bias."""
    const_first = c.is_const(a)
    blob, value = (c.blob(b), c.const(a)) if const_first else (c.blob(a), c.const(b))
    value = value.astype(np.float32)
    out = node.output[0]
    if op == "Add" and _fold_bias(c, blob, value, out):
        return
    if op == "Pow":
        if const_first or value.size != 1:
            c.refuse("Pow maps to Caffe's Power only with a scalar constant exponent")
        return _power(c, node, out, blob, power=float(value.reshape(-1)[0]))
    if op == "Sub" and const_first:  # c - x = (-x) + c
        negated = c.temp("neg")
        _power(c, node, negated, blob, scale=-1.0)
        blob, op = negated, "Add"
    elif op == "Sub":
        value, op = -value, "Add"
    elif op == "Div":
        if const_first:
            c.refuse("constant / blob: Caffe has no exact division by a blob")
        value, op = (1 / value).astype(np.float32), "Mul"
    if value.size == 1:
        v = float(value.reshape(-1)[0])
        return _power(c, node, out, blob, **({"shift": v} if op == "Add" else {"scale": v}))
    axis, block = _broadcast_block(c, c.shapes[blob], value.shape)
    weights = _block_values(c, value, c.shapes[blob], axis, block)
    kind, field = ("Bias", "bias_param") if op == "Add" else ("Scale", "scale_param")
    c.add(kind, [out], [weights], bottoms=[blob], **{field: {"axis": axis, "num_axes": len(block)}})


def _broadcast_block(c, shape, other):
    """(axis, dims): the axes of `shape` that a broadcast `other` varies along, as the block
    Caffe's Scale/Bias take (one contiguous run of axes; `other` is 1 outside it)."""
    other = (1,) * (len(shape) - len(other)) + tuple(other)
    if len(other) != len(shape):
        c.refuse(f"a constant of rank {len(other)} against a blob of shape {shape}")
    varying = [i for i, d in enumerate(other) if d != 1]
    if any(other[i] != shape[i] for i in varying):
        c.refuse(f"a constant of shape {other} that would broadcast the blob of shape {shape}")
    if not varying:
        return 0, ()
    first, last = varying[0], varying[-1]
    return first, tuple(shape[first:last + 1])


def _block_values(c, value, shape, axis, block):
    value = value.reshape((1,) * (len(shape) - value.ndim) + value.shape)
    index = tuple(0 if i < axis or i >= axis + len(block) else slice(None) for i in range(len(shape)))
    return np.broadcast_to(value[index], block).astype(np.float32)


def _fold_bias(c, blob, value, out):
    """Add(MatMul's output, bias): the bias becomes the InnerProduct's own (exporters split
    them), the InnerProduct writing the Add's output."""
    layer = c.layers[-1]
    if layer.type != "InnerProduct" or layer.top[0] != blob or layer.inner_product_param.bias_term:
        return False
    outputs = layer.inner_product_param.num_output
    if c.uses.get(blob, 0) != 1 or value.size not in (1, outputs) or value.shape[-1:] not in ((outputs,), (1,), ()):
        return False
    layer.inner_product_param.bias_term = True
    c.weights[layer.name].append(np.broadcast_to(value.reshape(-1), (outputs,)).astype(np.float32))
    layer.top[0] = out
    c.shapes[out] = c.shapes.pop(blob)
    return True


def _two_blobs(c, node, op, a, b):
    out = node.output[0]
    if c.shapes[a] == c.shapes[b]:
        if op == "Div":
            inverse = c.temp("inverse")
            _power(c, node, inverse, b, power=-1.0)
            op, b = "Mul", inverse
        if op == "Pow":
            c.refuse("blob ** blob has no Caffe layer")
        params = {"operation": 0} if op == "Mul" else {"operation": 1, "coeff": [1, -1 if op == "Sub" else 1]}
        return c.add("Eltwise", [out], bottoms=[a, b], eltwise_param=params)
    if op not in ("Add", "Mul") or len(c.shapes[b]) > len(c.shapes[a]):
        c.refuse(f"{op} of blobs of shapes {c.shapes[a]} and {c.shapes[b]}: only Add and Mul broadcast "
                 "(as Caffe's Bias and Scale with two bottoms)")
    axis, block = _broadcast_block(c, c.shapes[a], c.shapes[b])
    flat = c.temp("block")
    c.add("Reshape", [flat], bottoms=[b], reshape_param={"shape": {"dim": list(block)}})
    kind, field = ("Bias", "bias_param") if op == "Add" else ("Scale", "scale_param")
    c.add(kind, [out], bottoms=[a, flat], **{field: {"axis": axis, "num_axes": len(block)}})


def _variadic(op):
    def handler(c, node, attrs):
        blobs = [c.blob(name) for name in node.input]
        if len(blobs) == 1:
            c.aliases[node.output[0]] = blobs[0]
            return
        if len({c.shapes[b] for b in blobs}) != 1:
            c.refuse("inputs of different shapes")
        if op != "Min":
            operation = 1 if op == "Sum" else 2
            return c.add("Eltwise", [node.output[0]], bottoms=blobs, eltwise_param={"operation": operation})
        negated = []  # min(a, b) = -max(-a, -b), exactly
        for blob in blobs:
            negated.append(c.temp("neg"))
            _power(c, node, negated[-1], blob, scale=-1.0)
        most = c.temp("max")
        c.add("Eltwise", [most], bottoms=negated, eltwise_param={"operation": 2})
        _power(c, node, node.output[0], most, scale=-1.0)
    return handler


def _concat(c, node, attrs):
    shape = c.shape(node.input[0])
    c.add("Concat", [node.output[0]], bottoms=[c.blob(n) for n in node.input],
          concat_param={"axis": attrs["axis"] % len(shape)})


def _flatten(c, node, attrs):
    shape = c.shape(node.input[0])
    axis = attrs.get("axis", 1) % (len(shape) + 1) if len(shape) else 0
    if axis == 1:
        return c.add("Flatten", [node.output[0]], flatten_param={"axis": 1})
    dims = [1, -1] if axis == 0 else [-1, int(np.prod(shape[axis:]))]
    c.add("Reshape", [node.output[0]], reshape_param={"shape": {"dim": dims}})


def _reshape(c, node, attrs):
    target = c.consts.get(node.input[1])
    if target is None:
        c.refuse("the target shape must be computable when converting")
    values = target.values if isinstance(target, _Shape) else np.asarray(target)
    batch = target.batch if isinstance(target, _Shape) else np.zeros(values.shape, bool)
    _reshape_to(c, node, values, batch, attrs.get("allowzero", 0))


def _reshape_to(c, node, values, batch, allowzero=0):
    """Caffe's Reshape to ONNX dims; a dim computed from the batch size becomes 0 (copy) in the
    first axis, else the one -1."""
    shape, dims = c.shape(node.input[0]), []
    for i, (d, from_batch) in enumerate(zip(values.tolist(), batch.tolist())):
        if from_batch:
            d = 0 if i == 0 and d == shape[0] else -1
        elif d == 0 and allowzero:
            c.refuse("allowzero with a 0 in the shape")
        dims.append(int(d))
    if dims.count(-1) > 1:
        c.refuse(f"shape {values.tolist()} has more than one dimension to infer")
    c.add("Reshape", [node.output[0]], reshape_param={"shape": {"dim": dims}})


def _squeeze(c, node, attrs):
    shape = c.shape(node.input[0])
    axes = _axes_input(c, node, attrs)
    axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else [a % len(shape) for a in axes]
    if 0 in axes:
        c.refuse("squeezing the batch axis")
    _reshape_to(c, node, np.array([d for i, d in enumerate(shape) if i not in axes]),
                np.array([i == 0 for i in range(len(shape)) if i not in axes]))


def _unsqueeze(c, node, attrs):
    shape = list(c.shape(node.input[0]))
    axes = sorted(a % (len(shape) + len(_axes_input(c, node, attrs))) for a in _axes_input(c, node, attrs))
    batch = [True] + [False] * (len(shape) - 1)
    for a in axes:
        shape.insert(a, 1)
        batch.insert(a, False)
    if axes and axes[0] == 0:
        c.refuse("a new axis before the batch axis")
    _reshape_to(c, node, np.array(shape), np.array(batch))


def _split(c, node, attrs):
    shape = c.shape(node.input[0])
    axis = attrs.get("axis", 0) % len(shape)
    sizes = attrs.get("split") or (list(c.const(c.input(1))) if c.input(1) else None)
    if sizes is None:
        parts = len(node.output)
        size = -(-shape[axis] // parts)
        sizes = [min(size, shape[axis] - i * size) for i in range(parts)]
    points = list(np.cumsum(sizes)[:-1])
    c.add("Slice", list(node.output), slice_param={"axis": axis, "slice_point": [int(p) for p in points]})


def _slice(c, node, attrs):
    shape = c.shape(node.input[0])
    if "starts" in attrs:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = c.const(node.input[1]), c.const(node.input[2])
        axes, steps = c.const(c.input(3)), c.const(c.input(4))
    axes = list(range(len(starts))) if axes is None else [int(a) % len(shape) for a in axes]
    bottom = c.blob(node.input[0])
    for n, (start, end, axis) in enumerate(zip(starts, ends, axes)):
        if steps is not None and steps[n] != 1:
            c.refuse("a slice with a step other than 1")
        start, end, _ = slice(int(start), int(min(end, 2**62))).indices(shape[axis])
        if axis == 0:
            c.refuse("slicing the batch axis")
        if (start, end) == (0, shape[axis]):
            continue
        out = node.output[0] if n == len(axes) - 1 else c.temp(f"slice{n}")
        points = [p for p in (start, end) if 0 < p < shape[axis]]
        tops = [c.temp("before")] * (start > 0) + [out] + [c.temp("after")] * (end < shape[axis])
        c.add("Slice", tops, bottoms=[bottom], slice_param={"axis": axis, "slice_point": points})
        unused = [t for t in tops if t != out]
        c.add("Silence", [], bottoms=unused, name=f"{c.node.name or 'slice'}_unused")
        bottom, shape = out, c.shapes[out]
    if bottom != node.output[0]:  # the last axis needed no slicing
        c.aliases[node.output[0]] = bottom


def _reduce(operation):
    def handler(c, node, attrs):
        shape = c.shape(node.input[0])
        axes = _axes_input(c, node, attrs)
        axes = list(range(len(shape))) if axes is None else sorted(a % len(shape) for a in axes)
        if axes != list(range(axes[0], len(shape))) or axes[0] == 0:
            c.refuse(f"reducing axes {axes} of a rank-{len(shape)} blob: Caffe's Reduction reduces every axis "
                     "from one on, never the batch")
        keep = attrs.get("keepdims", 1)
        out = c.temp("reduced") if keep else node.output[0]
        c.add("Reduction", [out], reduction_param={"operation": operation, "axis": axes[0]})
        if keep:
            c.add("Reshape", [node.output[0]], bottoms=[out],
                  reshape_param={"shape": {"dim": [0] * axes[0] + [1] * len(axes)}})
    return handler


def _pad(c, node, attrs):
    mode = attrs.get("mode", "constant")
    pads = list(attrs["pads"]) if "pads" in attrs else [int(p) for p in c.const(node.input[1])]
    value = attrs.get("value", float(c.const(c.input(2), np.zeros(1)).reshape(-1)[0]) if c.input(2) else 0.0)
    if c.input(3):
        c.refuse("Pad with axes")
    if any(p < 0 for p in pads):
        c.refuse(f"negative pads {pads}")
    c.add("Pad", [node.output[0]], pad_param={"pad": pads, "value": value, "mode": mode})


def _resize(c, node, attrs):
    shape = c.shape(node.input[0])
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear") or len(shape) != 4:
        c.refuse(f"{mode} resizing of a rank-{len(shape)} blob: Espresso's Upsample is nearest or bilinear, 2-D")
    if node.op_type == "Upsample":
        scales = attrs.get("scales") or c.const(node.input[1])
        sizes = None
    else:
        scales = c.const(c.input(2)) if c.input(2) else None
        sizes = c.const(c.input(3)) if c.input(3) else None
        scales = None if scales is not None and np.size(scales) == 0 else scales
    if sizes is not None:
        out = [int(s) for s in sizes[2:]]
    else:
        if list(np.asarray(scales)[:2]) != [1, 1]:
            c.refuse(f"scales {list(scales)}: only the spatial axes may be resized")
        out = [int(np.floor(d * s)) for d, s in zip(shape[2:], np.asarray(scales)[2:])]
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest = attrs.get("nearest_mode", "round_prefer_floor")
    if node.op_type == "Upsample" or c.opset < 11:
        transform, nearest = "asymmetric", "floor"
    if mode == "nearest" and (transform, nearest) not in (("asymmetric", "floor"),):
        c.refuse(f"nearest resizing with {transform}/{nearest}: Espresso's Upsample takes asymmetric/floor")
    if mode == "linear" and transform not in ("half_pixel", "align_corners", "pytorch_half_pixel"):
        c.refuse(f"linear resizing with coordinate_transformation_mode {transform}")
    if transform == "pytorch_half_pixel" and 1 in out:  # there, an output of one takes source 0
        c.refuse("pytorch_half_pixel resizing to a size of 1")
    param = {"height": out[0], "width": out[1], "mode": mode, "align_corners": transform == "align_corners"}
    if sizes is None:  # ONNX maps coordinates by the scales given, not out / in
        param.update(scale_h=float(np.asarray(scales)[2]), scale_w=float(np.asarray(scales)[3]))
    c.add("Upsample", [node.output[0]], bottoms=[c.blob(node.input[0])], upsample_param=param)


def _transpose(c, node, attrs):
    shape = c.shape(node.input[0])
    order = list(attrs.get("perm", range(len(shape) - 1, -1, -1)))
    if order[0] != 0:
        c.refuse(f"perm {order} moves the batch axis")
    c.add("Permute", [node.output[0]], permute_param={"order": order})


def _gather_blob(c, node, attrs):
    shape = c.shape(node.input[0])
    axis, index = attrs.get("axis", 0) % len(shape), c.const(node.input[1])
    if axis == 0 or index.ndim != 0:
        c.refuse("gathering from a blob: only one index along a non-batch axis")
    i = int(index) % shape[axis]
    picked = c.temp("picked")
    tops = [c.temp("before")] * (i > 0) + [picked] + [c.temp("after")] * (i < shape[axis] - 1)
    c.add("Slice", tops, slice_param={"axis": axis, "slice_point": [p for p in (i, i + 1) if 0 < p < shape[axis]]})
    if len(tops) > 1:
        c.add("Silence", [], bottoms=[t for t in tops if t != picked], name=f"{node.name or 'gather'}_unused")
    kept = [d for k, d in enumerate(shape) if k != axis]
    c.add("Reshape", [node.output[0]], bottoms=[picked], reshape_param={"shape": {"dim": _keep_batch(kept)}})


def _lstm(c, node, attrs):
    """A forward LSTM as Caffe's (expose_hidden), its weights in Caffe's gate order (i, f, o, g;
    ONNX's is i, o, f, c, with two biases), the sequence indicators and initial states as
    Parameter blobs: 0 at t = 0 (each forward starts afresh), 1 after.  The batch is fixed."""
    T, N, _ = c.shape(node.input[0])
    H = attrs["hidden_size"]
    unsupported = {"direction": "forward", "layout": 0, "input_forget": 0, "clip": None,
                   "activations": ["Sigmoid", "Tanh", "Tanh"]}
    for name, default in unsupported.items():
        if name in attrs and attrs[name] != default:
            c.refuse(f"{name} {attrs[name]!r}: Caffe's LSTM is forward, {default!r} only")
    if c.input(4) and (np.asarray(c.const(c.input(4))) != T).any() or c.input(7):
        c.refuse("sequence lengths shorter than the sequence, or peepholes: Caffe's LSTM has neither")

    def caffe_gates(matrix):  # (4H, ...) from ONNX's i, o, f, c to Caffe's i, f, o, g
        return matrix.reshape((4, H) + matrix.shape[1:])[[0, 2, 1, 3]].reshape(matrix.shape)

    bias = c.const(c.input(3), np.zeros((1, 8 * H), np.float32))[0]
    weights = [caffe_gates(c.const(node.input[1])[0]), caffe_gates(bias[:4 * H] + bias[4 * H:]),
               caffe_gates(c.const(node.input[2])[0])]
    cont = np.ones((T, N), np.float32)
    cont[0] = 0
    bottoms = [c.blob(node.input[0])]
    for name, value in (("cont", cont), ("h0", c.input(5)), ("c0", c.input(6))):
        value = value if isinstance(value, np.ndarray) else c.const(value, np.zeros((1, N, H), np.float32))
        bottoms.append(c.temp(name))
        c.add("Parameter", [bottoms[-1]], [value], bottoms=[], parameter_param={"shape": {"dim": value.shape}})
    outputs = [c.temp("y"), c.temp("h") if len(node.output) < 2 or not node.output[1] else node.output[1],
               c.temp("c") if len(node.output) < 3 or not node.output[2] else node.output[2]]
    c.add("LSTM", outputs, weights, bottoms=bottoms, recurrent_param={"num_output": H, "expose_hidden": True})
    if node.output[0]:  # ONNX's Y has a directions axis: (T, 1, N, H)
        c.add("Reshape", [node.output[0]], bottoms=[outputs[0]], reshape_param={"shape": {"dim": [T, 1, N, H]}})


_OPS = {
    "Identity": _alias, "Dropout": _alias,
    "Constant": _constant,
    "Shape": _shape_of,
    "Gather": _foldable(_gather_blob, _numpy(_gather)),
    "Unsqueeze": _foldable(_unsqueeze, _fold(_unsqueeze_values)),
    "Squeeze": _foldable(_squeeze, _fold(_squeeze_values)),
    "Concat": _foldable(_concat, _fold(_concat_values, "all")),
    "Slice": _foldable(_slice, _fold(_slice_values)),
    "Cast": _foldable(_alias, _numpy(_cast)),
    "ConstantOfShape": _numpy(_constant_of_shape),
    "Expand": _numpy(lambda attrs, x, shape: x * np.ones(tuple(int(d) for d in shape), x.dtype)),
    "Reshape": _foldable(_reshape, _numpy(_reshape_values)),
    "Flatten": _flatten,
    "Transpose": _foldable(_transpose, _numpy(lambda attrs, x: np.transpose(x, attrs.get("perm")))),
    "Relu": _simple("ReLU"), "LeakyRelu": _leaky_relu, "PRelu": _prelu, "Elu": _elu,
    "Sigmoid": _simple("Sigmoid"), "Tanh": _simple("TanH"), "Exp": _simple("Exp"), "Log": _simple("Log"),
    "Abs": _simple("AbsVal"), "Softplus": _simple("BNLL"),
    "Neg": _unary_power(scale=-1.0), "Sqrt": _unary_power(power=0.5), "Reciprocal": _unary_power(power=-1.0),
    "Clip": _clip, "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish,
    "Softmax": _softmax, "LogSoftmax": lambda c, node, attrs: _softmax(c, node, attrs, log=True),
    "Conv": _conv, "ConvTranspose": _conv_transpose,
    "MaxPool": _pool("MAX"), "AveragePool": _pool("AVE"),
    "GlobalMaxPool": _global_pool("MAX"), "GlobalAveragePool": _global_pool("AVE"),
    "BatchNormalization": _batch_norm, "InstanceNormalization": _instance_norm, "LRN": _lrn,
    "Gemm": _gemm, "MatMul": _matmul,
    **{op: _binary(op) for op in _BINARY},
    "Sum": _variadic("Sum"), "Max": _variadic("Max"), "Min": _variadic("Min"),
    "Split": _split,
    "ReduceMean": _reduce(4), "ReduceSum": _reduce(1),
    "Pad": _pad, "Resize": _resize, "Upsample": _resize, "LSTM": _lstm,
}
