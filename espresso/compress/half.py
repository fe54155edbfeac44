"""16-bit float deployment: weights stored as IEEE half (float16) or bfloat16, and inference on
the GPU with 16-bit operands and float32 accumulation.

`espresso compress ... --fp16` (or `--bf16`) writes every InnerProduct's and Convolution's
weights as 16-bit floats (biases stay float32), half the bytes.  A TEST net loading the file
on a GPU replaces each InnerProduct (not transposed, axis 1) and each 2-D Convolution that
cuDNN runs with a `HalfLayer`: its input is rounded to the 16-bit type, the product runs on
tensor cores with float32 accumulation (cuBLAS GemmEx, compute type 32F; cuDNN's "pseudo
half" configuration, compute type float), and the result is float32 again, with the bias
added in float32 (a convolution's output passes through the 16-bit type first: cuDNN writes
its output in the input's type).  The other layers stay float32.  On the CPU the weights load
as float32 (the 16-bit values exactly) and run in float32.

bfloat16 is float32's upper 16 bits (8 exponent bits, 7 fraction bits), rounded to nearest
even; NumPy has no such type, so bfloat16 arrays are uint16 bit patterns here.
"""

import numpy as np

from espresso.compress.model_file import HALF_KINDS as KINDS
from espresso.compress.runtime import CompressedBlob, CompressedLayer
from espresso.errors import EspressoError


def to_bits(values, kind):
    """float values -> their 16-bit patterns (uint16) in `kind`, rounded to nearest even."""
    values = np.asarray(values, np.float32)
    if kind == "float16":
        return values.astype(np.float16).view(np.uint16)
    if kind != "bfloat16":
        raise EspressoError(f"16-bit float kind '{kind}': {' or '.join(KINDS)}")
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40  # a NaN stays a NaN (rounding would carry into the exponent)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def from_bits(bits, kind):
    """16-bit patterns of `kind` -> float32 (exact)."""
    bits = np.asarray(bits, np.uint16)
    if kind == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def can_run(layer):
    """Whether a HalfLayer can stand in for `layer` (on the GPU, with cuDNN for convolutions)."""
    if len(layer.lp.bottom) != 1:
        return False
    if layer.type == "InnerProduct":
        return not layer.p.transpose and layer.p.axis == 1
    return (layer.type == "Convolution" and layer.axis == 1 and len(layer.blobs[0].shape) == 4
            and layer.backend.cudnn is not None and not layer.backend.deterministic)


class HalfLayer(CompressedLayer):
    """An InnerProduct or Convolution of a TEST net on the GPU with 16-bit weights (see the
    module docstring); inference only, its weight blob read-only, as CompressedLayer's."""

    chain = None  # no fused runs: each layer is one tensor-core call already

    def __init__(self, layer, weights):
        super(CompressedLayer, self).__init__(layer)  # _Wrapper's: no sparse matrix
        self.shared, self.matrix, self.kind = None, None, weights.kind
        xp, k = layer.backend.xp, layer.backend.k
        self.weights16 = xp.asarray(weights.bits if self.kind == "bfloat16" else weights.bits.view(np.float16))
        self.blobs = [CompressedBlob(self, tuple(weights.shape))] + layer.blobs[1:]
        self.k, self.buffers, self.shape = k, None, None
        self.zero_bias = xp.zeros(weights.shape[0], np.float32)  # a bias-less convolution's, made once

    def __repr__(self):
        return f"<HalfLayer '{self.inner.name}' ({self.inner.type}), {self.kind} weights>"

    @property
    def nbytes(self):
        return self.weights16.nbytes

    def dense_weights(self):
        bits = self.backend.to_host(self.weights16).view(np.uint16)
        return self.xp.asarray(from_bits(bits, self.kind).reshape(self.blobs[0].shape))

    def reshape(self, bottom, top):
        inner, shape = self.inner, tuple(bottom[0].shape)
        if self.shared is not None or inner.type == "InnerProduct":
            inner.reshape(bottom, top)
        else:
            self._conv_reshape(shape, top)
        if self.shared is None:
            out = tuple(top[0].shape)
            half = np.float16 if self.kind == "float16" else np.uint16
            self.buffers = (self.xp.empty(shape, half), self.xp.empty(out, half) if inner.type != "InnerProduct"
                            else None)
            self.shape = shape

    def _conv_reshape(self, shape, top):
        from espresso.layers.vision import conv_output_spatial

        inner = self.inner
        out = conv_output_spatial(inner, shape[2:])
        top[0].reshape((shape[0], inner.p.num_output) + out)
        self.plan = self.backend.cudnn.plan(shape, tuple(top[0].shape), self.blobs[0].shape, inner.stride,
                                            inner.pad, inner.dilation, inner.p.group, self.kind)

    def compute_compressed(self, bottom, top):
        inner = self.inner
        if self.shape != tuple(bottom[0].shape):
            self.reshape(bottom, top)
        x16, y16 = self.buffers
        self.k.to_half(bottom[0].data, x16, self.kind)
        bias = inner.blobs[1].data if len(inner.blobs) > 1 else None
        y = top[0].data
        if inner.type == "InnerProduct":
            self.backend.blas.half_matmul_t(x16.reshape(len(x16), -1), self.weights16, y.reshape(len(y), -1),
                                            self.kind)
            if bias is not None:
                y += bias
        else:
            self.plan.forward(x16, self.weights16, y16)
            self.k.from_half(y16, self.zero_bias if bias is None else bias, y, self.kind)
