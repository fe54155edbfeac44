"""Post-training int8 quantization with calibration, and the layers that run it on the CPU and GPU.

Weights: per output channel, symmetric: w = scale[m] * q, q in [-127, 127], scale[m] =
max |w[m]| / 127.  Activations: one scale per layer input from a calibration set (the largest
magnitude seen): an input never negative in calibration (after a ReLU, or image pixels) is
uint8 round(x / scale) with scale = max / 255; one that is signed is uint8 round(x / scale) +
128 with scale = max |x| / 127, which keeps 0 exact either way (the convolution's padding).
The product accumulates in int32 and is dequantized as
y[m] = in_scale * scale[m] * (acc[m] - zero * sum_k q[m, k]) + bias[m].

`calibrate(net, ...)` runs a net's own data layer (or given inputs) and returns each
InnerProduct's and 2-D Convolution's input range; `int8_records(...)` turns a net's weights
into the model file's int8 blobs (ScaledIntegers, or CompressedWeights with an input scale when
Deep Compression ran first); a TEST net loading such a file runs those layers as `Int8Layer` on
the CPU (Numba kernels, espresso/compress/int8_kernels.py) and `Int8GpuLayer` on a GPU (cuBLAS's
int8 GEMM, espresso/backend/cuda/int8.cu): the same integers, the same float32 outputs.
"""

import functools
import math

import numba
import numpy as np

from espresso import graphs
from espresso.compress import int8_kernels as kernels
from espresso.compress.model_file import CompressedWeights, ScaledIntegers
from espresso.compress.runtime import CompressedBlob, CompressedLayer
from espresso.errors import EspressoError
from espresso.layers.vision import conv_output_spatial


def quantize_weights(w):
    """Per-row symmetric int8 of a (rows, ...) array: (int8 values, float32 scales)."""
    rows = np.asarray(w, np.float64).reshape(len(w), -1)
    scales = np.abs(rows).max(1) / 127
    scales[scales == 0] = 1.0
    values = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    return values.reshape(np.shape(w)), scales.astype(np.float32)


def input_format(low, high):
    """(scale, zero point) of an input seen in [low, high] (see the module docstring)."""
    if low >= 0:
        return (high / 255 if high > 0 else 1.0), 0
    return max(-low, high) / 127, 128


def int8_layers(net, keep_float=()):
    """The layers int8 can run: InnerProduct (not transposed, axis 1) and 2-D Convolution;
    `keep_float` names layers to leave in float ('first' and 'last' mean the first and last of
    those)."""
    found = [name for name, layer in net.layer_dict.items() if _can_run(layer)]
    unknown = set(keep_float) - set(found) - {"first", "last"}
    if unknown:
        raise EspressoError(f"--keep-float: no layer int8 can run is named {', '.join(sorted(unknown))} "
                            f"(they are: {', '.join(found)})")
    ends = {"first": found[:1], "last": found[-1:]}
    kept = {n for name in keep_float for n in ends.get(name, [name])}
    return [name for name in found if name not in kept]


MAX_K = (1 << 31) // (255 * 127)  # products summed per output before int32 could overflow


def _can_run(layer):
    """One bottom, an int32 accumulator that cannot overflow, and InnerProduct (not transposed,
    axis 1) or a 2-D Convolution."""
    if layer.type not in ("InnerProduct", "Convolution") or len(layer.lp.bottom) != 1 or \
            math.prod(layer.blobs[0].shape[1:]) > MAX_K:
        return False
    if layer.type == "InnerProduct":
        return not layer.p.transpose and layer.p.axis == 1
    return layer.type == "Convolution" and layer.axis == 1 and len(layer.blobs[0].shape) == 4


def calibrate(net, names, iterations=0, inputs=None):
    """{layer: (low, high)} of the inputs of layers `names`, over `iterations` batches of the
    net's own data layers, or over `inputs` (an array of samples shaped as the net's first input
    blob, fed in batches of its batch size)."""
    batches = [None] * iterations
    if inputs is not None:
        batches = _input_batches(net, inputs)
    if not batches:
        raise EspressoError("int8 calibration needs data: --calibration-iters N (N > 0) batches of the net's own "
                            "data, or calibration inputs")
    index = {name: i for i, name in enumerate(net.layer_dict)}
    missing = [name for name in names if name not in index]
    if missing:
        raise EspressoError(f"int8 calibration: the calibration net has no layer {', '.join(missing)}")
    ranges = {name: (math.inf, -math.inf) for name in names}
    for batch in batches:
        if batch is not None:
            net.blobs[net.inputs[0]].data[...] = batch
        for i in range(len(net.engine_layers)):
            net.forward_layers(i, i, losses=False)
            for name in names:
                if index[name] == i + 1:  # its bottom as it reads it
                    x = net.backend.to_host(net.bottom_vecs[i + 1][0].data)
                    low, high = ranges[name]
                    ranges[name] = (min(low, float(x.min())), max(high, float(x.max())))
    return ranges


def _input_batches(net, inputs):
    if not net.inputs:
        raise EspressoError("int8 calibration inputs need a net with an input blob (a deploy net)")
    blob = net.blobs[net.inputs[0]]
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim != len(blob.shape) or inputs.shape[1:] != tuple(blob.shape[1:]) or not len(inputs):
        raise EspressoError(f"int8 calibration inputs of shape {inputs.shape} do not fit the net's input "
                            f"'{net.inputs[0]}' {tuple(blob.shape)}: give (n, {', '.join(map(str, blob.shape[1:]))})")
    size = blob.shape[0]
    return [inputs[k:k + size] for k in range(0, len(inputs) - size + 1, size)] or [np.resize(inputs, blob.shape)]


def int8_records(net, ranges, records=None):
    """The model file's records of `net` with the layers in `ranges` int8: dense ones as
    ScaledIntegers, Deep-Compressed ones (in `records`, from Compressor.records) keeping their
    form with the input scale added."""
    given = {name: blobs for name, _, blobs in records or []}
    out = []
    for name, layer in net.layer_dict.items():
        if not layer.blobs:
            continue
        blobs = list(given.get(name) or [np.array(b.host_data(), np.float32) for b in layer.blobs])
        if name in ranges:
            scale, zero = input_format(*ranges[name])
            if isinstance(blobs[0], CompressedWeights):
                blobs[0].input_scale, blobs[0].input_zero = scale, zero
            else:
                blobs[0] = ScaledIntegers(*quantize_weights(blobs[0]), scale, zero)
        out.append((name, layer.type, blobs))
    return out


class Int8Layer(CompressedLayer):
    """An InnerProduct or Convolution layer of a built TEST net running in int8 on the CPU
    (inference only, as CompressedLayer, whose weight blob and sharing rules it keeps)."""

    def __init__(self, layer, weights):
        super(CompressedLayer, self).__init__(layer)  # _Wrapper's: no sparse matrix
        self.shared, self.matrix = None, None
        if isinstance(weights, ScaledIntegers) and weights.values.dtype == np.int8:
            values, scales = weights.values, weights.scales
        else:
            values, scales = quantize_weights(weights.dense())
        self.values = values.reshape(len(values), -1)
        self.scales = np.broadcast_to(np.asarray(scales, np.float32), (len(values),)).copy()  # one for all: each
        self.groups = layer.p.group if layer.type == "Convolution" else 1
        self.packed = self._pack(values)
        self.input_scale, self.zero = np.float32(weights.input_scale), weights.input_zero
        self.inverse = 1.0 / float(self.input_scale)
        self.scale = (weights.input_scale * self.scales).astype(np.float32)
        # the zero point's share of each output, taken off with the bias (passed on each run: it may change)
        self.correction = (self.scale * self.zero * self.values.astype(np.int64).sum(1)).astype(np.float32)
        self.zeros = np.zeros_like(self.correction)
        self.blobs = [CompressedBlob(self, tuple(weights.shape))] + layer.blobs[1:]
        self.buffers, self.shape, self.call = None, None, None

    def __repr__(self):
        return f"<Int8Layer '{self.inner.name}' ({self.inner.type}), {self.values.size} int8 weights>"

    @property
    def nbytes(self):
        return self.packed.nbytes + 8 * len(self.scales)

    def _pack(self, values):
        """The weights as the CPU kernels read them: a convolution's ordered (m, kh, kw, c), a
        grouped one's made whole with zeros off its group's channels (G times the products:
        grouped int8 convolutions are right on the CPU, not fast)."""
        if self.groups > 1:
            rows, width = len(values) // self.groups, values.shape[1]
            whole = np.zeros((len(values), width * self.groups) + values.shape[2:], np.int8)
            for g in range(self.groups):
                whole[g * rows:(g + 1) * rows, g * width:(g + 1) * width] = values[g * rows:(g + 1) * rows]
            values = whole
        channels_last = values.transpose(0, 2, 3, 1) if values.ndim == 4 else values  # the kernel's patch order
        return kernels.pack(channels_last.reshape(len(values), -1))

    def int8_form(self):
        """((int8 weights of the blob's shape, per-channel scales), (input scale, zero point)),
        for the ONNX exporter's QDQ form."""
        values = self.values.reshape(self.blobs[0].shape)
        return (values, self.scales), (self.input_scale, self.zero)

    def dense_weights(self):
        return (self.values * self.scales[:, None]).reshape(self.blobs[0].shape)

    def reshape(self, bottom, top):
        inner, shape = self.inner, tuple(bottom[0].shape)
        if self.shared is not None or inner.type == "InnerProduct":
            inner.reshape(bottom, top)
        else:
            out = conv_output_spatial(inner, shape[2:])
            top[0].reshape((shape[0], inner.p.num_output) + out)
        if self.shared is None:
            self._allocate(shape, tuple(top[0].shape))

    def _allocate(self, shape, out):
        """The quantized input, patch rows and accumulator for one input shape (rule 1: at
        reshape, never per forward)."""
        k = kernels.padded_k(self.packed)
        if self.inner.type == "InnerProduct":
            rows = shape[0]
            quantized = kernels.aligned((rows, k), np.uint8)
        else:
            rows = shape[0] * math.prod(out[2:])
            quantized = (np.empty((shape[0],) + shape[2:] + shape[1:2], np.uint8), kernels.aligned((rows, k), np.uint8))
        self.buffers = (quantized, kernels.aligned((rows, kernels.acc_columns(len(self.values))), np.int32))
        self.shape = shape

    def compute_compressed(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        version = graphs.version(self.backend)  # moves when any blob is reshaped or rebound
        if self.call is None or self.call[0] != version or self.call[1] is not x or self.call[2] is not y:
            if self.shape != x.shape:
                self.reshape(bottom, top)
                y = top[0].data
            self.call = (version, x, y, self._bind(x, y))
        self.call[3]()

    def _bind(self, x, y):
        """The kernel call on these bottom and top arrays (the Python around it costs more than
        the GEMM itself for a small layer at batch 1)."""
        inner, (quantized, acc) = self.inner, self.buffers
        bias = inner.blobs[1].data if len(inner.blobs) > 1 else self.zeros
        if inner.type == "InnerProduct":
            kernel = kernels.inner_product
            args = (x.reshape(len(x), -1), self.inverse, self.zero, quantized, self.packed, acc, self.scale, bias,
                    self.correction, False, y.reshape(len(y), -1))
        else:
            kernel = kernels.convolution(*inner.kernel, x.shape[1])
            args = (x, self.inverse, self.zero, quantized[0], quantized[1], tuple(inner.stride), tuple(inner.pad),
                    tuple(inner.dilation), self.packed, acc, self.scale, bias, self.correction, y)
        return _compiled(kernel, args)

    @property
    def no_bias(self):
        return self.zeros

    @staticmethod
    def chain(layers, relus):
        """FusedRun's binder for a run of int8 inner products (see sparse.pack): bind(first,
        biases, x, ys) -> the call computing layers first.. of the run."""

        def bind(first, biases, x, ys):
            fields = [tuple(getattr(layer, name) for layer in layers) for name in ("inverse", "zero", "scale",
                                                                                  "correction", "packed")]
            inverses, zeros, scales, corrections, packed = fields
            quantized, accs = zip(*(layer.buffers for layer in layers))
            args = (first, x, inverses, zeros, quantized, packed, accs, scales, biases, corrections, tuple(relus), ys)
            return _compiled(kernels.inner_product_chain, args)

        return bind


def _compiled(kernel, args):
    """kernel(*args) as a call of its compiled version for these argument types: Numba's
    dispatch on ten arguments' types costs ~1 us a call, as much as a small layer's GEMM."""
    return functools.partial(kernel.compile(tuple(numba.typeof(a) for a in args)), *args)


class Int8GpuLayer(Int8Layer):
    """Int8Layer on a GPU: quantized patches (int8.cu), one cuBLAS int8 GEMM per group on
    tensor cores, and the dequantizing pass; its integers and outputs are the CPU's."""

    chain = None  # no fused runs: a GEMM per layer already

    def __init__(self, layer, weights):
        super().__init__(layer, weights)
        xp = self.xp
        # the patches hold u - 128 (int8.cu): 128 * sum_k q[m, k] restores sum_k q u
        self.offset = xp.asarray(128 * self.values.astype(np.int64).sum(1), np.int32)
        self.scale, self.correction, self.zeros = (xp.asarray(a) for a in (self.scale, self.correction, self.zeros))

    def _pack(self, values):
        """(m, k) in Caffe's order, k zero-padded to a multiple of 16 (cuBLAS's int8 kernels)."""
        rows = values.reshape(len(values), -1)
        padded = np.zeros((len(rows), -(-rows.shape[1] // 16) * 16), np.int8)
        padded[:, :rows.shape[1]] = rows
        return self.xp.asarray(padded)

    def dense_weights(self):
        return self.xp.asarray(super().dense_weights())

    def _allocate(self, shape, out):
        rows = -(-shape[0] * math.prod(out[2:]) // 16) * 16  # a multiple of 16 for cuBLAS
        patches = self.xp.empty((rows, self.groups * self.packed.shape[1]), np.int8)
        self.buffers, self.shape = (patches, self.xp.empty((len(self.values), rows), np.int32)), shape

    def _bind(self, x, y):
        inner, (patches, acc) = self.inner, self.buffers
        bias = inner.blobs[1].data if len(inner.blobs) > 1 else self.zeros
        if inner.type == "InnerProduct":
            x, geometry = x.reshape(len(x), -1, 1, 1), ((1, 1), (1, 1), (0, 0), (1, 1), (1, 1))
        else:
            geometry = (inner.kernel, inner.stride, inner.pad, inner.dilation, y.shape[2:])
        kernel, stride, pad, dilation, out = (tuple(int(v) for v in field) for field in geometry)
        m, width, k, blas = len(self.values) // self.groups, self.packed.shape[1], self.backend.k, self.backend.blas
        gemms = [(self.packed[g * m:(g + 1) * m], patches[:, g * width:(g + 1) * width], acc[g * m:(g + 1) * m])
                 for g in range(self.groups)]

        def run():
            k.int8_patches(x, self.inverse, self.zero, kernel, stride, pad, dilation, self.groups,
                           self.values.shape[1], out, patches)
            for operands in gemms:
                blas.int8_matmul_t(*operands)
            k.int8_output(acc, self.offset, self.scale, bias, self.correction, y)

        return run
