"""Core ML out: a built espresso.Net (TEST phase) as a Core ML model that computes what the net computes.

The layers are walked in the net's order, as in onnx_export.py; each Caffe type has one row in
CONVERTERS, a function that appends the MIL ops (coremltools' Model Intermediate Language) computing
the layer's tops from its bottoms and returns the tops' values.  The program is converted by
coremltools to an ML Program (iOS 15 / macOS 12 and newer), whose features are named as the
net's input and output blobs (Core ML replaces characters other than letters, digits and '_').
Shapes are the net's, batch included: reshape the net's inputs first to export another batch.

Caffe's semantics are kept exactly, as in the ONNX export: Pooling reaches Caffe's ceil-rounded
output size with extra end padding, and AVE pooling pads with zeros first so that its divisor
counts Caffe's padding but no cell beyond it; BatchNorm divides by sqrt(var + eps) of the stored
statistics over the scale factor.  The weights stay Caffe's: the coremltools passes that fold
constants into weights or turn divisions into multiplications are left out (the Core ML compiler
on the device still fuses).  A layer type or option Core ML cannot express exactly is refused
with a NetError naming the layer, before anything is written.

Options:
- precision "float16" stores the weights and computes in float16 (inputs and outputs stay float32).
- image_input makes an input an image (ImageType) with Caffe's preprocessing.  Caffe feeds the net
  (pixel - mean) * scale (DataTransformer; pycaffe's Transformer with raw_scale r, mean m in r's
  units and input_scale s feeds (pixel * r / 255 - m) * s); Core ML feeds scale * pixel + bias,
  with pixels in 0..255 and one bias per channel in the net's channel order.  So
  {"mean": m, "scale": s} becomes Core ML's scale s and bias -m * s, and pycaffe's Transformer is
  {"scale": s * r / 255, "bias": -m * s}.  Equal up to float rounding.
- class_labels makes a classifier reading the net's last output (its values are the probabilities).
- updatable=True (with a Caffe solver) makes the InnerProduct layers after the last layer with
  other weights trainable on the device.  Core ML trains NeuralNetwork models only (not ML
  Programs), so that model is a NeuralNetwork (iOS 13 and newer) with batch-1 inputs.  See
  _updatable for what it needs of the net and what it takes from the solver.
"""

import contextlib
import io
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import warnings

import numpy as np

from espresso.errors import EspressoError, NetError
from espresso.interop import unique_name
from espresso.interop.caffe_layers import Layer, pool_window, refuse, trailing
from espresso.net.build import TEST
from espresso.proto import caffe_pb2
from espresso.proto.upgrade import upgrade_solver
from espresso.solver.solver import read_solver_param

_POOL, _ELTWISE = caffe_pb2.PoolingParameter, caffe_pb2.EltwiseParameter
# the default passes that rewrite weights (conv * scale + bias folded into the conv) or change
# the arithmetic (x / c as x * (1/c)): left out so that the model holds Caffe's weights and order
_REWRITING_PASSES = ["common::divide_to_multiply", "common::fuse_conv_scale", "common::fuse_conv_bias",
                     "common::fuse_conv_batchnorm", "common::fuse_elementwise_to_batchnorm",
                     "common::fuse_linear_bias", "common::fuse_matmul_weight_bias"]
_PROGRESS = re.compile(r"^(Running|Translating) MIL .*(passes|ops)/s\]$")  # coremltools' progress bars


def _coremltools():
    """coremltools, imported without its import-time warnings (an untested torch version, and off
    macOS the Core ML runtime libraries it cannot load); errors still show."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools
    except ModuleNotFoundError as e:
        if e.name != "coremltools":  # installed, but something it needs is broken: show that
            raise
        raise EspressoError("Core ML export needs the 'coremltools' package: pip install coremltools "
                            "(or pip install 'espresso-nn[coreml]')") from None
    finally:
        logger.setLevel(level)
    return coremltools


def export_coreml(net, path, precision="float32", image_input=None, class_labels=None, updatable=False,
                  solver=None, epochs=1):
    """Write `net` (an espresso.Net built in the TEST phase) to `path`, an .mlpackage directory (or,
    updatable, an .mlmodel file), through a temporary beside it; nothing is written when a layer
    cannot be exported.  The options are to_coreml_model's."""
    path = os.path.abspath(os.fspath(path))
    suffixes = (".mlpackage", ".mlmodel") if updatable else (".mlpackage",)
    if not path.endswith(suffixes):
        raise EspressoError(f"Core ML export: {path}: the name must end in {' or '.join(suffixes)}")
    _save(to_coreml_model(net, precision, image_input, class_labels, updatable, solver, epochs), path)


def to_coreml_model(net, precision="float32", image_input=None, class_labels=None, updatable=False,
                    solver=None, epochs=1):
    """The coremltools MLModel computing `net`'s outputs from its inputs, not saved.

    precision: "float32" or "float16" (weights and arithmetic; features stay float32).
    image_input: {"input": blob (default the first input), "scale": s, "mean": per-channel values
        (Caffe's) or "bias": per-channel values (Core ML's), "channel_order": "BGR" (default,
        Caffe's) or "RGB"}; see the module's docstring for the mapping.
    class_labels: a list of labels, one per value of the net's last output: a classifier.
    updatable, solver, epochs: a NeuralNetwork whose last InnerProduct layers train on the device,
        with the optimizer of `solver` (a SolverParameter or a solver prototxt path) for `epochs`."""
    ct = _coremltools()
    if net.phase != TEST:
        raise NetError(f"Core ML export: net '{net.name}' was built in the TRAIN phase; build it with espresso.TEST")
    if precision not in ("float32", "float16"):
        raise EspressoError(f"Core ML export: precision '{precision}': float32 or float16")
    if not updatable:
        if solver is not None:
            raise EspressoError("Core ML export: a solver is used only with updatable=True")
        return _convert(ct, net, precision, image_input, class_labels)[0]
    return _updatable(ct, net, precision, image_input, class_labels, solver, epochs)


def _convert(ct, net, precision, image_input, class_labels, tail=()):
    """(the MLModel, the _Graph it was built from); `tail`: the layers of the trainable tail, whose
    presence makes it a NeuralNetwork."""
    neural = bool(tail)
    inputs = None if image_input is None else _input_types(ct, net, image_input)
    classifier = None if class_labels is None else _classifier_config(ct, net, class_labels)
    g = _Graph(net.blobs, tail)
    program = _program(g, net, ct.target.iOS13 if neural else ct.target.iOS15)
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(_REWRITING_PASSES)
    options = dict(convert_to="neuralnetwork", minimum_deployment_target=ct.target.iOS13) if neural else dict(
        convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32)
    try:
        with _progress_bars_hidden():
            model = ct.convert(program, inputs=inputs, classifier_config=classifier, pass_pipeline=pipeline, **options)
    except (ValueError, NotImplementedError) as e:
        raise EspressoError(f"Core ML export of net '{net.name}': coremltools refused it: {e}") from e
    return model, g


@contextlib.contextmanager
def _progress_bars_hidden():
    """coremltools draws progress bars on stderr: keep them out, but show everything else it writes
    there (its warnings), and all of it when the conversion fails.  Its own temporary weights
    directory, dropped without cleanup(), warns too: not the user's concern."""
    with contextlib.redirect_stderr(io.StringIO()) as captured, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Implicitly cleaning up <TemporaryDirectory", ResourceWarning)
        try:
            yield
        except BaseException:
            sys.stderr.write(captured.getvalue())
            raise
    for line in captured.getvalue().split("\n"):
        line = line.rpartition("\r")[2]  # a progress bar's last state
        if line and not _PROGRESS.match(line):
            sys.stderr.write(line + "\n")


def _save(model, path):
    """model.save into a temporary directory beside `path`, then renamed to it; an earlier model
    there is replaced only then."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        made = os.path.join(tmp, os.path.basename(path))
        model.save(made)
        if os.path.lexists(path):
            os.replace(path, os.path.join(tmp, "old"))  # a directory cannot be renamed over another
        os.replace(made, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# *** the MIL program ***
class _Graph:
    """The MIL builder, unique names for new values, and what the NeuralNetwork tail records."""

    def __init__(self, blobs, tail):
        from coremltools.converters.mil import Builder

        self.mb, self.scope = Builder, ""
        self.used = set(blobs)  # blob names are taken: they name the values of the blobs
        self.tail = set(tail)  # layers emitted for Core ML training (see _updatable)
        self.trainable, self.loss_input = [], None  # their Core ML layers to train; the softmax the loss reads

    def fresh(self, base):
        name = unique_name(base, self.used)
        self.used.add(name)
        return name

    def op(self, op_type, out=None, **inputs):
        """Append a MIL op named `out` (a fresh "<layer>/<op>" if None), its unset inputs left out."""
        inputs = {key: value for key, value in inputs.items() if value is not None}
        return getattr(self.mb, op_type)(name=out or self.fresh(f"{self.scope}/{op_type}"), **inputs)


def _program(g, net, opset):
    from coremltools.converters.mil.mil import Function, Program

    specs = {name: g.mb.TensorSpec(shape=net.blobs[name].shape) for name in net.inputs}
    with Function(specs, opset_version=opset) as function:
        function.set_outputs(_walk(g, net, dict(function.inputs)))
    program = Program()
    program.add_function("main", function)
    return program


def _walk(g, net, inputs):
    last_writer = {blob.name: i for i, tops in enumerate(net.top_vecs) for blob in tops}
    current = dict(inputs)  # blob name -> the MIL value holding its latest version
    for i, layer in enumerate(net.engine_layers):
        if layer.type == "Input":
            continue
        if layer.type not in CONVERTERS:
            raise NetError(f"{layer.where}: no Core ML export for layer type '{layer.type}' "
                           f"(exported: Input, {', '.join(sorted(CONVERTERS))})")
        g.scope = layer.name
        bottoms, tops = net.bottom_vecs[i], net.top_vecs[i]
        names = [b.name if last_writer[b.name] == i and b.name not in net.inputs else None for b in tops]
        w = [np.asarray(net.backend.to_host(b.data), np.float32) for b in layer.blobs]
        L = Layer(layer, [current[b.name] for b in bottoms], names, [b.shape for b in bottoms],
                   [b.shape for b in tops], w)
        values = CONVERTERS[layer.type](g, L)
        values = values if isinstance(values, list) else [values]
        assert layer.name in g.tail or [tuple(v.shape) for v in values] == [b.shape for b in tops], layer.where
        current.update((b.name, value) for b, value in zip(tops, values, strict=True))
    return [_named(g, current[name], name) for name in net.outputs]


def _named(g, value, name):
    """`value` under the name `name`, through an identity where a layer that adds no op (Split,
    Dropout, Concat of one) or an input holds it."""
    return value if value.name == name else g.mb.identity(x=value, name=name)


def _refuse(L, message):
    refuse(L, "Core ML", message)


# *** shared steps ***
def _f32(value):
    return np.float32(value)


def _pairs(begins, ends):
    """MIL's padding: begin and end of each axis in turn."""
    return [q for pair in zip(begins, ends, strict=True) for q in pair]


def _broadcast(vector, rank):
    """A per-channel (C,) vector shaped to broadcast along axis 1 of a rank-`rank` tensor."""
    return vector.reshape((-1,) + (1,) * (rank - 2))


def _chain(g, L, steps):
    """Bottom 0 through (op, inputs besides x) steps, the last named for top 0; no steps: bottom 0."""
    z = L.x[0]
    for k, (op, inputs) in enumerate(steps):
        z = g.op(op, L.y[0] if k == len(steps) - 1 else None, x=z, **inputs)
    return z


def _step(op, value, identity):
    """[(op, {y: value})], or no step where the value leaves x as it is (Caffe skips those too)."""
    return [] if value == identity else [(op, {"y": _f32(value)})]


def _affine(scale, shift):
    return _step("mul", scale, 1) + _step("add", shift, 0)


# *** neurons ***
def _unary(op_type):
    return lambda g, L: g.op(op_type, L.y[0], x=L.x[0])


def _relu(g, L):
    slope = L.layer.p.negative_slope
    if slope == 0:
        return g.op("relu", L.y[0], x=L.x[0])
    return g.op("leaky_relu", L.y[0], x=L.x[0], alpha=_f32(slope))


def _prelu(g, L):
    x, alpha, rank = L.x[0], L.w[0], len(L.xs[0])
    if alpha.size == L.xs[0][1] and 3 <= rank <= 5:  # MIL's prelu: one slope per channel, rank 3 to 5
        return g.op("prelu", L.y[0], x=x, alpha=alpha)
    slope = _broadcast(alpha, rank) if alpha.size > 1 else alpha.reshape(())  # Caffe's max(x, 0) + a min(x, 0)
    negative = g.op("mul", x=g.op("minimum", x=x, y=_f32(0)), y=slope)
    return g.op("add", L.y[0], x=g.op("relu", x=x), y=negative)


def _elu(g, L):
    return g.op("elu", L.y[0], x=L.x[0], alpha=_f32(L.layer.p.alpha))


def _power(g, L):
    p = L.layer.p  # squares and roots by their own ops: exact, and no pow of a negative base on the device
    power = {1: [], 2: [("square", {})], 0.5: [("sqrt", {})]}.get(p.power, [("pow", {"y": _f32(p.power)})])
    return _chain(g, L, _affine(p.scale, p.shift) + power)


def _exp(g, L):
    layer = L.layer  # base^(shift + scale x) = base^shift * exp(ln(base) scale x), as Caffe
    return _chain(g, L, _step("mul", layer.inner_scale, 1) + [("exp", {})] + _step("mul", layer.outer_scale, 1))


def _log(g, L):
    p = L.layer.p  # MIL's log adds epsilon (1e-45 unless told): none, as Caffe
    steps = _affine(p.scale, p.shift) + [("log", {"epsilon": _f32(0)})] + _step("mul", L.layer.base_scale, 1)
    return _chain(g, L, steps)


def _threshold(g, L):
    above = g.op("greater", x=L.x[0], y=_f32(L.layer.p.threshold))
    return g.op("cast", L.y[0], x=above, dtype="fp32")


def _clip(g, L):
    p = L.layer.p  # min(x, max) first: Caffe's order, which decides when min > max
    return _chain(g, L, [("minimum", {"y": _f32(p.max)}), ("maximum", {"y": _f32(p.min)})])


def _swish(g, L):
    x, beta = L.x[0], L.layer.p.beta
    gate = g.op("sigmoid", x=x if beta == 1 else g.op("mul", x=x, y=_f32(beta)))
    return g.op("mul", L.y[0], x=x, y=gate)


def _dropout(g, L):
    if L.layer.train:
        _refuse(L, "it runs in the TRAIN phase (its phase field), where it draws random masks")
    return _chain(g, L, _step("mul", L.layer.test_scale, 1))  # the identity in TEST, unless scale_train is off


def _split(g, L):
    return L.x[:1] * len(L.y)


def _silence(g, L):
    return []


# *** vision ***
def _convolution(g, L):
    layer = L.layer
    if layer.axis != 1:
        _refuse(L, f"convolution_param.axis {layer.p.axis}: Core ML convolves over axis 1 only")
    if len(layer.kernel) > 3:
        _refuse(L, f"{len(layer.kernel)} spatial axes: Core ML convolves over 1 to 3")
    attrs = dict(weight=L.w[0], bias=L.w[1] if len(L.w) > 1 else None, strides=list(layer.stride),
                 pad_type="custom", pad=_pairs(layer.pad, layer.pad), dilations=list(layer.dilation),
                 groups=layer.p.group)
    op = "conv_transpose" if layer.transposed else "conv"  # MIL's weights have Caffe's layouts
    return [g.op(op, y, x=x, **attrs) for x, y in zip(L.x, L.y, strict=True)]  # several bottoms share them


def _pooling(g, L):
    p = L.layer.p
    kernel, stride, pad, extra = pool_window(L, "Core ML")
    attrs = dict(kernel_sizes=list(kernel), strides=list(stride), pad_type="custom")
    if p.pool == _POOL.MAX:  # padding never wins a max, in both
        return g.op("max_pool", L.y[0], x=L.x[0], pad=_pairs(pad, [q + e for q, e in zip(pad, extra)]), **attrs)
    if not any(extra):  # every window inside the padded image: Caffe divides by the kernel's size
        return g.op("avg_pool", L.y[0], x=L.x[0], pad=_pairs(pad, pad), exclude_padding_from_average=False, **attrs)
    # Caffe's padding as zeros that count, the extra end padding as MIL padding that does not
    x = g.op("pad", x=L.x[0], pad=_pairs(pad, pad)) if any(pad) else L.x[0]
    return g.op("avg_pool", L.y[0], x=x, pad=_pairs([0] * len(pad), extra), exclude_padding_from_average=True,
                **attrs)


def _lrn(g, L):
    p, x = L.layer.p, L.x[0]
    if L.layer.across:  # both scale alpha by 1/local_size
        return g.op("local_response_norm", L.y[0], x=x, size=p.local_size, alpha=_f32(p.alpha),
                    beta=_f32(p.beta), k=_f32(p.k))
    # WITHIN_CHANNEL, as Caffe builds it: x (1 + alpha * mean of x^2 over n x n, zero padded)^-beta
    n, q = p.local_size, (p.local_size - 1) // 2
    mean = g.op("avg_pool", x=g.op("mul", x=x, y=x), kernel_sizes=[n, n], strides=[1, 1], pad_type="custom",
                pad=[q] * 4, exclude_padding_from_average=False)
    base = g.op("add", x=g.op("mul", x=mean, y=_f32(p.alpha)), y=_f32(1))
    return g.op("mul", L.y[0], x=x, y=g.op("pow", x=base, y=_f32(-p.beta)))


def _crop(g, L):
    layer = L.layer  # bottom 1 only gives the shape
    begin = [s.start or 0 for s in layer.slices]
    end = [n if s.stop is None else s.stop for s, n in zip(layer.slices, L.xs[0], strict=True)]
    return g.op("slice_by_index", L.y[0], x=L.x[0], begin=begin, end=end)


def _upsample(g, L):
    p, shape = L.layer.p, L.xs[0]
    if len(shape) < 3:
        _refuse(L, f"a rank-{len(shape)} bottom: Core ML resizes rank 3 and more")
    sizes = list(zip(shape[-2:], (p.height, p.width), (p.scale_h, p.scale_w), strict=True))
    if p.mode == "nearest":  # Core ML's rule for other factors is not documented
        if any(out % n or (scale and scale != out // n) for n, out, scale in sizes):
            _refuse(L, "nearest upsampling by other than whole factors")
        return g.op("upsample_nearest_neighbor", L.y[0], x=L.x[0], scale_factor_height=p.height // shape[-2],
                    scale_factor_width=p.width // shape[-1])
    if not p.align_corners and any(scale and scale != out / n for n, out, scale in sizes):
        _refuse(L, "half-pixel bilinear resizing by a scale other than output / input size")
    mode = "STRICT_ALIGN_CORNERS" if p.align_corners else "UNALIGN_CORNERS"  # as Espresso's src = f(dst)
    return g.op("resize_bilinear", L.y[0], x=L.x[0], target_size_height=p.height, target_size_width=p.width,
                sampling_mode=mode)


# *** common ***
def _inner_product(g, L):
    layer, shape = L.layer, L.xs[0]
    if layer.name in g.tail:
        return _inner_product_as_convolution(g, L)
    axis = layer.p.axis % len(shape)
    rows, k = math.prod(shape[:axis]), math.prod(shape[axis:])
    x = L.x[0] if tuple(shape) == (rows, k) else g.op("reshape", x=L.x[0], shape=[rows, k])
    flat = len(L.ys[0]) == 2
    y = g.op("linear", L.y[0] if flat else None, x=x, weight=_weight(L), bias=L.w[1] if len(L.w) > 1 else None)
    return y if flat else g.op("reshape", L.y[0], x=y, shape=list(L.ys[0]))


def _weight(L):
    """InnerProduct's (num_output, K) weight matrix: blob 0, or its transpose under transpose: true."""
    return np.ascontiguousarray(L.w[0].T) if L.layer.p.transpose else L.w[0]


def _inner_product_as_convolution(g, L):
    """In the trainable tail: a 1 x 1 convolution of (M, K, 1, 1), its top (M, num_output, 1, 1), so
    that the net ends in the rank-4 softmax Core ML's loss needs, with only layers Core ML
    back-propagates through on the way (a reshape is not one)."""
    shape, weight = L.xs[0], _weight(L)
    flat = [shape[0], math.prod(shape[1:]), 1, 1]
    x = L.x[0] if list(L.x[0].shape) == flat else g.op("reshape", x=L.x[0], shape=flat)
    y = g.op("conv", L.y[0], x=x, weight=weight.reshape(weight.shape + (1, 1)),
             bias=L.w[1] if len(L.w) > 1 else None, pad_type="valid")
    g.trainable.append(y.op.name)
    return y


def _softmax(g, L):
    if L.layer.name not in g.tail:
        return g.op("softmax", L.y[0], x=L.x[0], axis=L.layer.axis)
    # over (M, classes, 1, 1): NeuralNetwork's softmax layer; its name makes the loss target's input name
    prob = g.op("softmax", g.fresh(re.sub(r"\W", "_", f"{L.layer.name}_softmax")), x=L.x[0], axis=1)
    g.loss_input = prob.name
    return g.op("reshape", L.y[0], x=prob, shape=list(L.ys[0]))


def _eltwise(g, L):
    layer = L.layer
    if layer.op == _ELTWISE.SUM:
        terms = [x if c == 1 else g.op("mul", x=x, y=_f32(c)) for x, c in zip(L.x, layer.coeffs, strict=True)]
        op = "add"
    else:
        terms, op = L.x, "mul" if layer.op == _ELTWISE.PROD else "maximum"
    z = terms[0]
    for k, term in enumerate(terms[1:], 2):
        z = g.op(op, L.y[0] if k == len(terms) else None, x=z, y=term)
    return z


# *** utility ***
def _reshape_layer(g, L):
    return g.op("reshape", L.y[0], x=L.x[0], shape=list(L.ys[0]))  # Flatten and Reshape: the top's shape


def _concat(g, L):
    if len(L.x) == 1:
        return L.x[0]
    return g.op("concat", L.y[0], values=L.x, axis=L.layer.axis)


def _slice(g, L):
    if len(L.y) == 1:
        return L.x[0]
    axis, start, tops = L.layer.axis, 0, []
    for y, shape in zip(L.y, L.ys, strict=True):
        begin, end = [0] * len(shape), list(L.xs[0])
        begin[axis], end[axis] = start, start + shape[axis]
        tops.append(g.op("slice_by_index", y, x=L.x[0], begin=begin, end=end))
        start += shape[axis]
    return tops


def _tile(g, L):
    repeats = [1] * len(L.xs[0])
    repeats[L.layer.p.axis % len(repeats)] = L.layer.p.tiles
    return g.op("tile", L.y[0], x=L.x[0], reps=repeats)


# *** Espresso's own layers (espresso/layers/extensions.py) ***
def _permute(g, L):
    return g.op("transpose", L.y[0], x=L.x[0], perm=L.layer.order)


def _pad(g, L):
    p, rank = L.layer.p, len(L.xs[0])
    begins, ends = list(p.pad[:rank]), list(p.pad[rank:])
    if p.mode != "constant" and any(begins[:-2] + ends[:-2]):
        _refuse(L, f"{p.mode} padding of other than the last two axes")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[p.mode]
    return g.op("pad", L.y[0], x=L.x[0], pad=_pairs(begins, ends), mode=mode, constant_val=_f32(p.value))


# *** normalization ***
def _batch_norm(g, L):
    layer, x, rank = L.layer, L.x[0], len(L.xs[0])
    if layer.use_global:  # the statistics are blob / s, with 0 for s == 0, as Caffe
        s = L.w[2][0]
        factor = np.float32(0) if s == 0 else np.float32(1) / s
        mean = _broadcast(L.w[0] * factor, rank)
        std = _broadcast(np.sqrt(L.w[1] * factor + np.float32(layer.eps)), rank)
        return g.op("real_div", L.y[0], x=g.op("sub", x=x, y=mean), y=std)
    axes = [0, *range(2, rank)]  # the batch's own mean and biased variance per channel
    centered = g.op("sub", x=x, y=g.op("reduce_mean", x=x, axes=axes, keep_dims=True))
    var = g.op("reduce_mean", x=g.op("mul", x=centered, y=centered), axes=axes, keep_dims=True)
    std = g.op("sqrt", x=g.op("add", x=var, y=_f32(layer.eps)))
    return g.op("real_div", L.y[0], x=centered, y=std)


def _operand(g, L):
    """Scale's or Bias's operand, bottom 1 or the learned blob 0, shaped to broadcast."""
    if len(L.x) == 1:
        return L.w[0].reshape(trailing(L, L.w[0].shape))
    shape = trailing(L, L.xs[1])
    return L.x[1] if shape == tuple(L.xs[1]) else g.op("reshape", x=L.x[1], shape=list(shape))


def _scale(g, L):
    index = L.layer.bias_index
    if index is None:
        return g.op("mul", L.y[0], x=L.x[0], y=_operand(g, L))
    bias = L.w[index].reshape(trailing(L, L.w[index].shape))
    return g.op("add", L.y[0], x=g.op("mul", x=L.x[0], y=_operand(g, L)), y=bias)


def _bias(g, L):
    return g.op("add", L.y[0], x=L.x[0], y=_operand(g, L))


CONVERTERS = {
    "Split": _split, "Dropout": _dropout, "Silence": _silence,
    "ReLU": _relu, "PReLU": _prelu, "ELU": _elu,
    "Sigmoid": _unary("sigmoid"), "TanH": _unary("tanh"), "AbsVal": _unary("abs"), "BNLL": _unary("softplus"),
    "Power": _power, "Exp": _exp, "Log": _log, "Threshold": _threshold, "Clip": _clip, "Swish": _swish,
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling, "LRN": _lrn, "Crop": _crop,
    "InnerProduct": _inner_product, "Softmax": _softmax, "Eltwise": _eltwise,
    "Flatten": _reshape_layer, "Reshape": _reshape_layer, "Concat": _concat, "Slice": _slice, "Tile": _tile,
    "BatchNorm": _batch_norm, "Scale": _scale, "Bias": _bias,
    "Permute": _permute, "Pad": _pad, "Upsample": _upsample,
}


# *** image input and classifier ***
def _input_types(ct, net, image_input):
    """The features' types: an ImageType for the image input, TensorTypes for the others."""
    spec = dict(image_input)
    name = spec.pop("input", net.inputs[0])
    scale, order = float(spec.pop("scale", 1.0)), spec.pop("channel_order", "BGR")
    mean, bias = spec.pop("mean", None), spec.pop("bias", None)
    if spec:
        raise EspressoError(f"image_input: unknown keys {sorted(spec)} "
                            "(known: input, mean, bias, scale, channel_order)")
    if name not in net.inputs:
        raise EspressoError(f"image_input: '{name}' is not an input of the net (inputs: {', '.join(net.inputs)})")
    shape = net.blobs[name].shape
    if len(shape) != 4 or shape[0] != 1 or shape[1] not in (1, 3):
        raise EspressoError(f"image_input: input '{name}' of shape {shape}: an image is (1, 3 or 1, H, W); "
                            "reshape the net's input to batch 1 first")
    if order not in ("BGR", "RGB"):
        raise EspressoError(f"image_input: channel_order '{order}': BGR (Caffe's) or RGB")
    if mean is not None and bias is not None:
        raise EspressoError("image_input: give mean (Caffe's, subtracted before scaling) or bias (Core ML's), "
                            "not both")
    offset = 0.0 if mean is None and bias is None else (-np.asarray(mean, float) * scale if bias is None else bias)
    try:
        offset = np.broadcast_to(np.asarray(offset, float), (shape[1],))
    except ValueError:
        raise EspressoError(f"image_input: mean or bias: one value per channel (or one for all), got shape "
                            f"{np.shape(offset)}; Core ML has no mean image (pycaffe: mean.mean(1).mean(1))") from None
    image = ct.ImageType(name=name, shape=shape, scale=scale, channel_first=True,
                         bias=float(offset[0]) if shape[1] == 1 else [float(b) for b in offset],
                         color_layout=ct.colorlayout.GRAYSCALE if shape[1] == 1 else ct.colorlayout(order))
    others = [ct.TensorType(name=other, shape=net.blobs[other].shape) for other in net.inputs if other != name]
    return [image, *others]


def _classifier_config(ct, net, labels):
    output = net.outputs[-1]
    shape = net.blobs[output].shape
    if not labels or not all(isinstance(label, (str, int)) for label in labels):
        raise EspressoError("class_labels: a list of strings (or integers), one per class")
    if len(labels) != math.prod(shape):
        raise EspressoError(f"class_labels: {len(labels)} labels for output '{output}' of shape {shape} "
                            f"({math.prod(shape)} values; a classifier reads one example)")
    return ct.ClassifierConfig(list(labels), predicted_probabilities_output=output)


# *** the updatable NeuralNetwork ***
_BACKPROP = {"InnerProduct", "ReLU", "Sigmoid", "TanH", "Dropout"}  # layers Core ML trains through


def _updatable(ct, net, precision, image_input, class_labels, solver, epochs):
    """A NeuralNetwork whose last InnerProduct layers (those after the last layer with other weights)
    train on the device by categorical cross-entropy on the net's final Softmax, with the solver's
    SGD (base_lr, momentum) or Adam (base_lr, momentum, momentum2, delta), the net's input batch as
    the mini-batch and inputs of batch 1 (Core ML takes one example per input); what Core ML's
    optimizer does not do (lr policies, weight decay, ...) is named in a warning."""
    if precision != "float32":
        raise EspressoError("Core ML export: an updatable model keeps float32 weights (Core ML trains no float16)")
    if not isinstance(epochs, int) or epochs < 1:
        raise EspressoError(f"Core ML export: epochs must be a positive integer, got {epochs!r}")
    tail, trained = _trainable_tail(net)
    batch = net.blobs[net.inputs[0]].shape[0]
    optimizer = _optimizer(ct, net, solver, trained, batch)
    with _batch_of_one(net):
        model, g = _convert(ct, net, "float32", image_input, class_labels, tail)
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder(spec=model.get_spec())
    builder.make_updatable(g.trainable)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the target input it adds
        builder.set_categorical_cross_entropy_loss(name=_fresh_layer_name(builder, "loss"), input=g.loss_input)
    if isinstance(optimizer, ct.models.neural_network.SgdParams):
        builder.set_sgd_optimizer(optimizer)
    else:
        builder.set_adam_optimizer(optimizer)
    builder.set_epochs(epochs)
    return ct.models.MLModel(builder.spec)


def _trainable_tail(net):
    """(the names of the layers from the first trainable InnerProduct to the final Softmax, the
    names of those InnerProduct layers), or a NetError saying what Core ML cannot train."""
    layers = net.engine_layers
    last = layers[-1]
    if last.type != "Softmax" or last.axis != 1:
        last.fail("updatable: the net must end in a Softmax over axis 1, which Core ML's loss reads", NetError)
    other = max((i for i, layer in enumerate(layers) if layer.blobs and layer.type != "InnerProduct"), default=-1)
    first = next((i for i in range(other + 1, len(layers)) if layers[i].type == "InnerProduct"), None)
    if first is None:
        last.fail("updatable: no InnerProduct layer after the last layer with other weights", NetError)
    for layer, bottoms in zip(layers[first:-1], net.bottom_vecs[first:-1], strict=True):
        through = layer.type in _BACKPROP and not (
            (layer.type == "ReLU" and layer.p.negative_slope != 0)
            or (layer.type == "InnerProduct" and layer.p.axis % bottoms[0].num_axes != 1)
            or (layer.type == "Dropout" and layer.test_scale != 1))
        if not through:
            layer.fail("updatable: Core ML does not train through this layer, which lies between the trained "
                       "InnerProduct layers and the Softmax", NetError)
    tail = [layer.name for layer in layers[first:]]
    return tail, [layer.name for layer in layers[first:] if layer.type == "InnerProduct"]


def _optimizer(ct, net, solver, trained, batch):
    """Core ML's SgdParams or AdamParams from the Caffe solver."""
    if solver is None:
        raise EspressoError("Core ML export: updatable=True needs the solver (a SolverParameter or a prototxt path)")
    if isinstance(solver, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(solver)
        param = upgrade_solver(param)
    else:
        param = read_solver_param(solver)
    nn = ct.models.neural_network
    if param.type == "SGD":
        optimizer = nn.SgdParams(_decimal(param.base_lr), batch, _decimal(param.momentum))
    elif param.type == "Adam":
        optimizer = nn.AdamParams(_decimal(param.base_lr), batch, _decimal(param.momentum),
                                  _decimal(param.momentum2), _decimal(param.delta))
    else:
        raise EspressoError(f"Core ML export: solver type '{param.type}': Core ML trains with SGD or Adam only")
    optimizer.set_lr(_decimal(param.base_lr), 0, max(1.0, param.base_lr))  # the range an app may set it in
    _warn_unsupported(net, param, trained)
    return optimizer


def _decimal(value):
    """A float32 field as the decimal it was written as (0.01, not 0.009999999776), for Core ML's doubles."""
    return float(str(np.float32(value)))


def _warn_unsupported(net, param, trained):
    unsupported = [text for text, differs in (
        (f"lr_policy '{param.lr_policy}' (Core ML keeps base_lr)", param.lr_policy != "fixed"),
        (f"weight_decay {_decimal(param.weight_decay)}", param.weight_decay != 0),
        (f"clip_gradients {_decimal(param.clip_gradients)}", param.clip_gradients >= 0),
        (f"iter_size {param.iter_size}", param.iter_size != 1),
        ("lr_mult or decay_mult of the trained layers",
         any(spec.lr_mult != 1 or spec.decay_mult != 1 for name in trained for spec in net.layer_dict[name].lp.param)),
    ) if differs]
    if unsupported:
        warnings.warn(f"Core ML export: Core ML's on-device training does not apply the solver's "
                      f"{', '.join(unsupported)}", stacklevel=5)


@contextlib.contextmanager
def _batch_of_one(net):
    """The net reshaped to batch 1 for the while, then back to its shapes."""
    shapes = {name: net.blobs[name].shape for name in net.inputs}
    try:
        for name, shape in shapes.items():
            net.blobs[name].reshape((1, *shape[1:]))
        net.reshape()
        yield
    finally:
        for name, shape in shapes.items():
            net.blobs[name].reshape(shape)
        net.reshape()


def _fresh_layer_name(builder, base):
    return unique_name(base, builder.layer_specs)
