"""ONNX out: a built espresso.Net (TEST phase) as an ONNX model that computes what the net computes.

The layers are walked in the net's order; each Caffe type has one row in EXPORTERS, a function
that appends the ONNX nodes computing the layer's tops from its bottoms.  Blob names are tensor
names, so ONNX Runtime's inputs and outputs are named as the net's blobs (see _top_name for blobs
overwritten in place).  Weights are float32 initializers "<layer>.<i>"; intermediate tensors are
"<layer>/<op>".  An int8 layer (a net loaded from an int8 model file) is written in QDQ form: its
input through QuantizeLinear/DequantizeLinear (uint8, its calibrated scale and zero point) and its
weights int8 with per-channel scales through DequantizeLinear, which runtimes such as ONNX
Runtime fuse into int8 kernels.

The batch axis of every input is symbolic ("N"); the other axes keep the net's sizes, and those
fix Pooling's padding: Caffe's output size (ceil rounding, the last window starting inside the
image) is reached with extra padding at the end instead of ONNX's ceil_mode, and AVE pooling pads
with zeros first, so that its divisor counts the padding but no cell beyond it, as Caffe's.

A layer type or option that ONNX cannot express exactly is refused with a NetError naming the
layer, before anything is written.  The ops are emitted in forms valid from opset 13 (Softmax
over one axis, Split and ReduceSum taking sizes and axes as inputs) to onnx's newest.
"""

import math

import numpy as np

from espresso.errors import EspressoError, NetError
from espresso.interop import unique_name
from espresso.interop.caffe_layers import Layer, pool_window, refuse, trailing
from espresso.net.build import TEST
from espresso.proto import caffe_pb2
from espresso.proto.text import atomic_write

MIN_OPSET = 13
FLT_MIN = float(np.finfo(np.float32).tiny)  # SoftmaxWithLoss clamps probabilities there, as Caffe
_POOL, _ELTWISE, _REDUCTION = caffe_pb2.PoolingParameter, caffe_pb2.EltwiseParameter, caffe_pb2.ReductionParameter
_LOSS = caffe_pb2.LossParameter
_FLOAT, _INT64 = 1, 7  # onnx.TensorProto.FLOAT, INT64


def _onnx():
    try:
        import onnx
    except ImportError:
        raise EspressoError("ONNX export needs the 'onnx' package: pip install onnx "
                            "(or pip install 'espresso-nn[onnx]')") from None
    return onnx


def export_onnx(net, path, opset=17):
    """Write `net` (an espresso.Net built in the TEST phase) to the .onnx file `path`, atomically;
    nothing is written when a layer cannot be exported."""
    model = to_onnx_model(net, opset)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


def to_onnx_model(net, opset=17):
    """The onnx.ModelProto (of the default domain's `opset`) computing `net`'s outputs from its
    inputs, checked by onnx.checker (full check)."""
    onnx = _onnx()
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise EspressoError(f"ONNX export: opset {opset} is not supported (from {MIN_OPSET} to {newest})")
    if net.phase != TEST:
        raise NetError(f"ONNX export: net '{net.name}' was built in the TRAIN phase; build it with espresso.TEST")
    g = _Graph(onnx, opset, net.blobs)
    inputs, outputs = _walk(g, net)
    graph = onnx.helper.make_graph(g.nodes, net.name or "espresso", inputs, outputs, g.initializers)
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="espresso",
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model, full_check=True)
    return model


class _Graph:
    """The nodes and initializers made so far, and unique names for new tensors."""

    def __init__(self, onnx, opset, reserved):
        self.onnx, self.opset = onnx, opset
        self.nodes, self.initializers = [], []
        self.used, self.scope = set(reserved), ""  # blob names are taken: they name the blobs' tensors

    def fresh(self, base):
        name = unique_name(base, self.used)
        self.used.add(name)
        return name

    def const(self, value, hint="c", dtype=np.float32):
        name = self.fresh(f"{self.scope}.{hint}")
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def weight(self, value, hint):
        """An initializer for a float weight, or the float tensor an int8 one dequantizes to."""
        if not isinstance(value, _Int8Weight):
            return self.const(value, hint)
        values, scales = self.const(value.values, hint, np.int8), self.const(value.scales, hint + ".scale")
        return self.op("DequantizeLinear", [values, scales, self.const(np.zeros(len(value.scales)), hint + ".zero",
                                                                       np.int8)], axis=0)

    def ints(self, values):
        return self.const(values, "i", np.int64)

    def op(self, op_type, inputs, out=None, outputs=1, **attrs):
        """Append a node; its output name (a list of them when `outputs` > 1), `out` if given."""
        if out is None:
            out = [self.fresh(f"{self.scope}/{op_type}") for _ in range(outputs)]
        names = [out] if isinstance(out, str) else list(out)
        node = self.onnx.helper.make_node(op_type, inputs, names, name=self.fresh(f"{self.scope}:{op_type}"), **attrs)
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names


class _Int8Weight:
    """int8 weights and their per-output-channel scales (axis 0), as an int8 layer runs them."""

    def __init__(self, values, scales):
        self.values, self.scales = values, scales


def _quantize_dequantize(g, x, scale, zero):
    """x through QuantizeLinear and DequantizeLinear as uint8: an int8 layer's input, in QDQ form."""
    operands = [g.const(scale, "in.scale"), g.const(zero, "in.zero", np.uint8)]
    return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, *operands]), *operands])


def _walk(g, net):
    """Append every layer's nodes to g; the graph's (inputs, outputs) value infos."""
    last_writer = {blob.name: i for i, tops in enumerate(net.top_vecs) for blob in tops}
    inputs, current = [], {}  # current: blob name -> the tensor holding its latest value
    for i, layer in enumerate(net.engine_layers):
        g.scope = layer.name
        bottoms, top_blobs = net.bottom_vecs[i], net.top_vecs[i]
        x = [current[b.name] for b in bottoms]
        y = [_top_name(g, net, i, b.name, last_writer) for b in top_blobs]
        if layer.type == "Input":
            inputs += [_value_info(g, b.name, b.shape) for b in top_blobs]
        elif layer.type in EXPORTERS:
            w = [np.asarray(net.backend.to_host(b.data), np.float32) for b in layer.blobs]
            int8 = getattr(layer, "int8_form", None)
            if int8 is not None:  # an int8 layer (espresso/compress/int8.py): its QDQ form
                (values, scales), (scale, zero) = int8()
                x[0], w[0] = _quantize_dequantize(g, x[0], scale, zero), _Int8Weight(values, scales)
            EXPORTERS[layer.type](g, Layer(layer, x, y, [b.shape for b in bottoms], [b.shape for b in top_blobs], w))
        else:
            raise NetError(f"{layer.where}: no ONNX export for layer type '{layer.type}' "
                           f"(exported: Input, {', '.join(sorted(EXPORTERS))})")
        current.update((b.name, name) for b, name in zip(top_blobs, y, strict=True))
    return inputs, [_value_info(g, current[name], net.blobs[name].shape) for name in net.outputs]


def _top_name(g, net, i, blob, last_writer):
    """The tensor that layer i writes for `blob`: ONNX writes a tensor once, so a blob overwritten
    in place is one tensor per version, the blob's name going to the last (to the first, for a net
    input, which ONNX Runtime is fed by that name) and "<blob>/<layer>" to the others."""
    if net.engine_layers[i].type == "Input" or (last_writer[blob] == i and blob not in net.inputs):
        return blob
    return g.fresh(f"{blob}/{net.engine_layers[i].name}")


def _value_info(g, name, shape):
    """A float tensor of `shape` with its first axis, the batch axis, symbolic."""
    return g.onnx.helper.make_tensor_value_info(name, _FLOAT, ["N", *shape[1:]][:len(shape)])


def _refuse(L, message):
    refuse(L, "ONNX", message)


# *** shared steps ***
def _reshape(g, x, shape, out=None):
    """x reshaped to `shape`, its first axis inferred (-1): the batch axis, or what holds it."""
    return g.op("Reshape", [x, g.ints((-1, *shape[1:]))], out)


def _broadcast(vector, rank):
    """A per-channel (C,) vector shaped to broadcast along axis 1 of a rank-`rank` tensor."""
    return vector.reshape((-1,) + (1,) * (rank - 2))


def _chain(g, L, steps):
    """Bottom 0 through (op, constant) steps, constant None for unary ops; the last writes top 0,
    no steps copy it."""
    z, steps = L.x[0], steps or [("Identity", None)]
    for k, (op, value) in enumerate(steps):
        z = g.op(op, [z] if value is None else [z, g.const(value)], L.y[0] if k == len(steps) - 1 else None)


def _step(op, value, identity):
    """[(op, value)], or no step where the value leaves x as it is (Caffe skips those too)."""
    return [] if value == identity else [(op, value)]


def _affine(scale, shift):
    return _step("Mul", scale, 1) + _step("Add", shift, 0)


# *** neurons ***
def _unary(op_type):
    return lambda g, L: g.op(op_type, L.x, L.y[0])


def _relu(g, L):
    slope = L.layer.p.negative_slope
    if slope == 0:
        g.op("Relu", L.x, L.y[0])
    else:
        g.op("LeakyRelu", L.x, L.y[0], alpha=slope)


def _elu(g, L):
    g.op("Elu", L.x, L.y[0], alpha=L.layer.p.alpha)


def _prelu(g, L):
    slope = g.const(_broadcast(L.w[0], len(L.xs[0])), "0")
    g.op("PRelu", [L.x[0], slope], L.y[0])


def _power(g, L):
    p = L.layer.p
    _chain(g, L, _affine(p.scale, p.shift) + _step("Pow", p.power, 1))


def _exp(g, L):
    layer = L.layer  # base^(shift + scale x) = base^shift * exp(ln(base) scale x), as Caffe
    _chain(g, L, [("Mul", layer.inner_scale), ("Exp", None)] + _step("Mul", layer.outer_scale, 1))


def _log(g, L):
    p = L.layer.p
    _chain(g, L, _affine(p.scale, p.shift) + [("Log", None)] + _step("Mul", L.layer.base_scale, 1))


def _threshold(g, L):
    above = g.op("Greater", [L.x[0], g.const(L.layer.p.threshold)])
    g.op("Cast", [above], L.y[0], to=_FLOAT)


def _clip(g, L):
    p = L.layer.p  # min(x, max) first: Caffe's order, which decides when min > max
    _chain(g, L, [("Min", p.max), ("Max", p.min)])


def _swish(g, L):
    x, beta = L.x[0], L.layer.p.beta
    gate = g.op("Sigmoid", [x if beta == 1 else g.op("Mul", [x, g.const(beta)])])
    g.op("Mul", [x, gate], L.y[0])


def _dropout(g, L):
    if L.layer.train:
        _refuse(L, "it runs in the TRAIN phase (its phase field), where it draws random masks")
    _chain(g, L, _step("Mul", L.layer.test_scale, 1))  # the identity in TEST, unless scale_train is off


def _identity(g, L):
    for y in L.y:
        g.op("Identity", L.x[:1], y)


# *** vision ***
def _convolution(g, L):
    layer = L.layer
    if layer.axis != 1:
        _refuse(L, f"convolution_param.axis {layer.p.axis}: ONNX convolves over axis 1 only")
    weights = [g.weight(w, str(k)) for k, w in enumerate(L.w)]
    attrs = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride), pads=list(layer.pad) * 2,
                 dilations=list(layer.dilation), group=layer.p.group)
    for x, y in zip(L.x, L.y, strict=True):  # several bottoms share the weights
        g.op("ConvTranspose" if layer.transposed else "Conv", [x, *weights], y, **attrs)


def _pooling(g, L):
    p = L.layer.p
    kernel, stride, pad, extra = pool_window(L, "ONNX")
    attrs = dict(kernel_shape=list(kernel), strides=list(stride))
    if p.pool == _POOL.MAX:  # padding never wins a max, in both
        g.op("MaxPool", L.x, L.y[0], pads=[*pad, *(q + e for q, e in zip(pad, extra))], **attrs)
        return
    # AVE divides by the window clipped to the padded image: Caffe's padding as zeros that count,
    # the extra end padding as ONNX padding that does not (count_include_pad 0)
    x = L.x[0]
    if any(pad):
        x = g.op("Pad", [x, g.ints([0, 0, *pad, 0, 0, *pad])])
    g.op("AveragePool", [x], L.y[0], pads=[0] * len(pad) + extra, count_include_pad=0, **attrs)


def _lrn(g, L):
    p, x = L.layer.p, L.x[0]
    if L.layer.across:  # both scale alpha by 1/local_size
        g.op("LRN", L.x, L.y[0], size=p.local_size, alpha=p.alpha, beta=p.beta, bias=p.k)
        return
    # WITHIN_CHANNEL, as Caffe builds it: x (1 + alpha * mean of x^2 over n x n, zero padded)^-beta
    n = p.local_size
    mean = g.op("AveragePool", [g.op("Mul", [x, x])], kernel_shape=[n, n], strides=[1, 1],
                pads=[(n - 1) // 2] * 4, count_include_pad=1)
    base = g.op("Add", [g.op("Mul", [mean, g.const(p.alpha)]), g.const(1.0)])
    g.op("Mul", [x, g.op("Pow", [base, g.const(-p.beta)])], L.y[0])


def _crop(g, L):
    layer = L.layer  # bottom 1 only gives the shape
    kept = layer.slices[layer.start:]
    starts, stops = [s.start for s in kept], [s.stop for s in kept]
    axes = list(range(layer.start, len(L.xs[0])))
    g.op("Slice", [L.x[0], g.ints(starts), g.ints(stops), g.ints(axes)], L.y[0])


# *** common ***
def _inner_product(g, L):
    layer, shape = L.layer, L.xs[0]
    axis = layer.p.axis % len(shape)
    x = L.x[0] if (len(shape), axis) == (2, 1) else g.op("Flatten", L.x, axis=axis)  # (M, K)
    weights = [g.weight(w, str(k)) for k, w in enumerate(L.w)]
    flat = len(L.ys[0]) == 2
    y = g.op("Gemm", [x, *weights], L.y[0] if flat else None, transB=0 if layer.p.transpose else 1)
    if not flat:
        _reshape(g, y, L.ys[0], L.y[0])


def _softmax(g, L):
    g.op("Softmax", L.x, L.y[0], axis=L.layer.axis)


def _eltwise(g, L):
    layer = L.layer
    if layer.op == _ELTWISE.SUM:
        terms = [x if c == 1 else g.op("Mul", [x, g.const(c)]) for x, c in zip(L.x, layer.coeffs, strict=True)]
        g.op("Sum", terms, L.y[0])
    elif layer.op == _ELTWISE.MAX:
        g.op("Max", L.x, L.y[0])
    else:
        z = L.x[0]
        for k, x in enumerate(L.x[1:], 2):
            z = g.op("Mul", [z, x], L.y[0] if k == len(L.x) else None)


def _argmax(g, L):
    p, shape = L.layer.p, L.xs[0]
    along = p.HasField("axis")
    axis = p.axis % len(shape) if along else 1
    x = L.x[0] if along else g.op("Flatten", L.x, axis=1)
    n = shape[axis] if along else math.prod(shape[1:])
    # Caffe's ties go to the larger index, TopK's to the smaller: search the reversed axis
    reverse = g.op("Slice", [x, g.ints([-1]), g.ints([np.iinfo(np.int64).min]), g.ints([axis]), g.ints([-1])])
    values, order = g.op("TopK", [reverse, g.ints([p.top_k])], outputs=2, axis=axis)
    index = g.op("Cast", [g.op("Sub", [g.ints(n - 1), order])], to=_FLOAT)
    if along:
        g.op("Identity", [values if p.out_max_val else index], L.y[0])
    else:  # (N, 1 or 2, top_k) padded with 1s: indices, then values
        rows = g.op("Concat", [index, values], axis=1) if p.out_max_val else index
        _reshape(g, rows, L.ys[0], L.y[0])


def _reduction(g, L):
    layer, rank = L.layer, len(L.xs[0])
    x = L.x[0]
    if layer.op == _REDUCTION.ASUM:
        x = g.op("Abs", [x])
    elif layer.op == _REDUCTION.SUMSQ:
        x = g.op("Mul", [x, x])
    total = g.op("ReduceSum", [x, g.ints(list(range(layer.p.axis % rank, rank)))], keepdims=0)
    g.op("Mul", [total, g.const(layer.scale)], L.y[0])  # coeff, over the count for MEAN


# *** utility ***
def _reshape_layer(g, L):
    _reshape(g, L.x[0], L.ys[0], L.y[0])  # Flatten and Reshape: the top's shape, resolved by the layer


def _concat(g, L):
    if len(L.x) == 1:
        _identity(g, L)
    else:
        g.op("Concat", L.x, L.y[0], axis=L.layer.axis)


def _slice(g, L):
    if len(L.y) == 1:
        _identity(g, L)
    else:
        axis = L.layer.axis
        g.op("Split", [L.x[0], g.ints([shape[axis] for shape in L.ys])], L.y, axis=axis)


def _tile(g, L):
    repeats = [1] * len(L.xs[0])
    repeats[L.layer.p.axis % len(repeats)] = L.layer.p.tiles
    g.op("Tile", [L.x[0], g.ints(repeats)], L.y[0])


def _silence(g, L):
    pass


# *** Espresso's own layers (espresso/layers/extensions.py) ***
def _permute(g, L):
    g.op("Transpose", L.x, L.y[0], perm=L.layer.order)


def _pad(g, L):
    p = L.layer.p
    g.op("Pad", [L.x[0], g.ints(list(p.pad)), g.const(p.value, "value")], L.y[0], mode=p.mode)


def _upsample(g, L):
    """Resize with the layer's coordinate rule; the scales it was given, else the output size."""
    p, rank = L.layer.p, len(L.xs[0])
    if p.scale_h or p.scale_w:
        in_h, in_w = L.xs[0][-2:]
        scales = [1.0] * (rank - 2) + [p.scale_h or p.height / in_h, p.scale_w or p.width / in_w]
        inputs = [L.x[0], "", g.const(scales, "scales")]
    else:  # sizes: the input's leading axes (the batch among them, symbolic), then height and width
        leading = g.op("Slice", [g.op("Shape", [L.x[0]]), g.ints([0]), g.ints([rank - 2])])
        inputs = [L.x[0], "", "", g.op("Concat", [leading, g.ints([p.height, p.width])], axis=0)]
    if p.mode == "nearest":
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        transform = "align_corners" if p.align_corners else "half_pixel"
        attrs = {"mode": "linear", "coordinate_transformation_mode": transform}
    g.op("Resize", inputs, L.y[0], **attrs)


# *** normalization ***
def _batch_norm(g, L):
    layer, x, rank = L.layer, L.x[0], len(L.xs[0])
    if layer.use_global:  # the statistics are blob / s, with 0 for s == 0, as Caffe
        s = L.w[2][0]
        factor = np.float32(0) if s == 0 else np.float32(1) / s
        mean = g.const(_broadcast(L.w[0] * factor, rank), "mean")
        std = g.const(_broadcast(np.sqrt(L.w[1] * factor + np.float32(layer.eps)), rank), "std")
        g.op("Div", [g.op("Sub", [x, mean]), std], L.y[0])
        return
    axes = [0, *range(2, rank)]  # the batch's own mean and biased variance per channel
    centered = g.op("Sub", [x, _reduce_mean(g, x, axes)])
    var = _reduce_mean(g, g.op("Mul", [centered, centered]), axes)
    g.op("Div", [centered, g.op("Sqrt", [g.op("Add", [var, g.const(layer.eps)])])], L.y[0])


def _reduce_mean(g, x, axes):
    if g.opset >= 18:  # the axes became an input
        return g.op("ReduceMean", [x, g.ints(axes)], keepdims=1)
    return g.op("ReduceMean", [x], axes=axes, keepdims=1)


def _operand(g, L):
    """Scale's or Bias's operand, bottom 1 or the learned blob 0, shaped to broadcast."""
    if len(L.x) == 1:
        return g.const(L.w[0].reshape(trailing(L, L.w[0].shape)), "0")
    shape = trailing(L, L.xs[1])
    return L.x[1] if shape == tuple(L.xs[1]) else _reshape(g, L.x[1], shape)


def _scale(g, L):
    index = L.layer.bias_index
    if index is None:
        g.op("Mul", [L.x[0], _operand(g, L)], L.y[0])
        return
    bias = g.const(L.w[index].reshape(trailing(L, L.w[index].shape)), str(index))
    g.op("Add", [g.op("Mul", [L.x[0], _operand(g, L)]), bias], L.y[0])


def _bias(g, L):
    g.op("Add", [L.x[0], _operand(g, L)], L.y[0])


# *** loss and accuracy ***
def _by_class(g, L, scores, axis):
    """Scores as (outer, classes, inner) around `axis`; bottom 1's labels as int64 (outer, 1,
    inner), truncated as Caffe's static_cast, ignored ones made 0; the float mask of the labels
    not ignored (None without ignore_label)."""
    shape = L.xs[0]
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    scores = _reshape(g, scores, (outer, shape[axis], inner))
    label = g.op("Cast", [_reshape(g, L.x[1], (outer, 1, inner))], to=_INT64)
    ignore = L.layer.labels.ignore
    if ignore is None:
        return scores, label, None
    valid = g.op("Not", [g.op("Equal", [label, g.ints(ignore)])])
    return scores, g.op("Where", [valid, label, g.ints(0)]), g.op("Cast", [valid], to=_FLOAT)


def _count(g, label, mask):
    """The number of labels (not ignored), a float scalar."""
    if mask is None:
        return g.op("Cast", [g.op("Size", [label])], to=_FLOAT)
    return g.op("ReduceSum", [mask], keepdims=0)


def _mean_over(g, L, terms, mask, count):
    """sum(terms * mask) / max(count, 1), into top 0."""
    if mask is not None:
        terms = g.op("Mul", [terms, mask])
    g.op("Div", [g.op("ReduceSum", [terms], keepdims=0), g.op("Max", [count, g.const(1.0)])], L.y[0])


def _softmax_loss(g, L):
    layer = L.layer
    prob = g.op("Softmax", L.x[:1], L.y[1] if len(L.y) > 1 else None, axis=layer.softmax.axis)
    prob, label, mask = _by_class(g, L, prob, layer.softmax.axis)
    picked = g.op("GatherElements", [prob, label], axis=1)
    loss = g.op("Neg", [g.op("Log", [g.op("Max", [picked, g.const(FLT_MIN)])])])
    count = {_LOSS.VALID: lambda: _count(g, label, mask),
             _LOSS.FULL: lambda: _count(g, label, None),
             _LOSS.BATCH_SIZE: lambda: g.op("Div", [_count(g, label, None), g.const(layer.inner)]),
             _LOSS.NONE: lambda: g.const(1.0)}[layer.normalization]()
    _mean_over(g, L, loss, mask, count)


def _accuracy(g, L):
    p = L.layer.p
    if len(L.y) > 1:
        _refuse(L, "the per-class accuracy top is not exported")
    scores, label, mask = _by_class(g, L, L.x[0], p.axis % len(L.xs[0]))
    truth = g.op("GatherElements", [scores, label], axis=1)
    # Caffe counts the classes scoring at least the true one, itself included: a hit if at most top_k
    at_least = g.op("Cast", [g.op("GreaterOrEqual", [scores, truth])], to=_FLOAT)
    ranked = g.op("ReduceSum", [at_least, g.ints([1])], keepdims=1)  # (outer, 1, inner), as the mask
    hit = g.op("Cast", [g.op("Less", [ranked, g.const(p.top_k + 0.5)])], to=_FLOAT)
    _mean_over(g, L, hit, mask, _count(g, label, mask))


EXPORTERS = {
    "Split": _identity, "Dropout": _dropout, "Silence": _silence,
    "ReLU": _relu, "PReLU": _prelu, "ELU": _elu,
    "Sigmoid": _unary("Sigmoid"), "TanH": _unary("Tanh"), "AbsVal": _unary("Abs"), "BNLL": _unary("Softplus"),
    "Power": _power, "Exp": _exp, "Log": _log, "Threshold": _threshold, "Clip": _clip, "Swish": _swish,
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling, "LRN": _lrn, "Crop": _crop,
    "InnerProduct": _inner_product, "Softmax": _softmax, "Eltwise": _eltwise, "ArgMax": _argmax,
    "Reduction": _reduction, "Flatten": _reshape_layer, "Reshape": _reshape_layer, "Concat": _concat,
    "Slice": _slice, "Tile": _tile, "BatchNorm": _batch_norm, "Scale": _scale, "Bias": _bias,
    "SoftmaxWithLoss": _softmax_loss, "Accuracy": _accuracy,
    "Permute": _permute, "Pad": _pad, "Upsample": _upsample,
}
