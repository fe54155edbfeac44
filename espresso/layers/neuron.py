"""Element-wise (neuron) layers: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, Power, Exp, Log, BNLL,
Threshold, Clip, Swish.  (Dropout lives in common.py.)

Every layer here may run in place.  A layer whose backward needs the input (`saves_bottom`)
keeps a copy of it when top is bottom, as Caffe's PReLU does; Caffe's Power, Log, BNLL and
Clip read the overwritten bottom instead and get wrong gradients in place (Caffe refuses AbsVal
in place).  Espresso's in-place gradients are the true ones: a deliberate difference.
"""

import math

import numpy as np

from espresso.layer import Layer, register
from espresso.proto import caffe_pb2


class NeuronLayer(Layer):
    """One bottom, one top of the same shape, computed element by element.

    Subclasses write `forward_values(x, y)` and `backward_values(x, y, dy, dx)` on arrays; the
    base class sizes the top and `temps` workspaces of the bottom's shape, and keeps the copy
    of the bottom that `saves_bottom` layers need when they run in place.
    """

    exact_bottoms = exact_tops = 1
    inplace = True
    saves_bottom = False  # backward reads the bottom data (the copy when running in place)
    temps = 0  # workspaces of the bottom's shape that forward/backward need

    def setup(self, bottom, top):
        self.work = [self.new_blob(()) for _ in range(self.temps)]
        self.saved = self.new_blob(())
        self.in_place = False

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        self.in_place = top[0] is bottom[0]
        if not self.in_place:
            top[0].reshape(shape)
        self.shape = shape
        if self.in_place and self.saves_bottom:
            self.saved.reshape(shape)

    def w(self, k=0):
        """Workspace k, shaped like the bottom: allocated on first use (the GPU's fused kernels
        need none, and CaffeNet's ReLUs would hold 630 MB of them)."""
        self.work[k].reshape(self.shape)
        return self.work[k].data

    def bottom_data(self, bottom):
        """The layer's input as forward saw it (the saved copy when running in place)."""
        return self.saved.data if self.in_place and self.saves_bottom else bottom[0].data

    def forward(self, bottom, top):
        if self.in_place and self.saves_bottom:
            self.saved.data[...] = bottom[0].data
        self.forward_values(bottom[0].data, top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.backward_values(self.bottom_data(bottom), top[0].data, top[0].diff, bottom[0].diff)

    def forward_values(self, x, y):
        raise NotImplementedError

    def backward_values(self, x, y, dy, dx):
        raise NotImplementedError


def _log_base(layer):
    """ln(base) for Exp/Log, where base -1 means e; Caffe's checks on base."""
    base = layer.p.base
    if base == -1:
        return 1.0
    if not base > 0:
        layer.fail(f"{layer.param}.base: must be > 0 (or -1 for e), got {base:g}")
    return math.log(base)


@register
class ReLULayer(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0). Honors relu_param: negative_slope, engine
    (accepted; it picks an implementation, not a result).

    In place, backward reads the shared blob (Caffe does too) and declares backward_reads_top
    False on purpose: the standard Caffe pattern ReLU -> Dropout in place stays correct, since
    Dropout only zeroes positions whose gradient it zeroes anyway (and keeps the sign of the
    rest).  A non-negative slope keeps the sign of x, so y > 0 exactly where x > 0.  A negative
    slope flips it: then the layer keeps a copy of its bottom when in place.
    """

    type = "ReLU"
    param = "relu_param"
    legacy = "RELU"
    temps = 1

    def setup(self, bottom, top):
        self.slope = self.p.negative_slope
        self.saves_bottom = self.slope < 0
        super().setup(bottom, top)

    def forward(self, bottom, top):
        if not self.fold:  # (else the layer that folds it in did its work too: Builder._fold_layers)
            super().forward(bottom, top)

    def forward_values(self, x, y):
        xp = self.xp
        if self.k.relu_forward is not None:  # the backend's fused kernel
            return self.k.relu_forward(x, y, self.slope)
        if self.slope == 0:
            xp.maximum(x, 0, out=y)
            return
        w = self.w()
        xp.minimum(x, 0, out=w)
        w *= self.slope
        xp.maximum(x, 0, out=y)
        y += w

    def backward_values(self, x, y, dy, dx):
        # dx = dy * (1 if x > 0 else negative_slope), as Caffe (x == 0 takes the slope)
        if self.k.relu_backward is not None:
            return self.k.relu_backward(x, dy, dx, self.slope)
        xp, w = self.xp, self.w()
        xp.less_equal(x, 0, out=w)
        w *= self.slope - 1
        w += 1
        xp.multiply(dy, w, out=dx)


@register
class PReLULayer(NeuronLayer):
    """ReLU with a learned slope per channel (axis 1). Honors prelu_param: filler (constant 0.25
    when unset, as Caffe), channel_shared.  The slope gradient sums over every position using it."""

    type = "PReLU"
    param = "prelu_param"
    saves_bottom = True  # Caffe's bottom_memory_
    temps = 1

    def setup(self, bottom, top):
        super().setup(bottom, top)
        if bottom[0].num_axes < 2:
            self.fail(f"bottom must have at least 2 axes (N, C, ...), got shape {bottom[0].shape}")
        self.channels = bottom[0].shape[1]
        filler = self.p.filler if self.p.HasField("filler") else caffe_pb2.FillerParameter(
            type="constant", value=0.25)
        # Caffe's shared slope is a 0-axis blob of one element
        shape = () if self.p.channel_shared else (self.channels,)
        self.blobs = [self.new_blob(shape, filler)]
        self.slope_sum = self.new_blob(shape)

    def reshape(self, bottom, top):
        if bottom[0].num_axes < 2 or bottom[0].shape[1] != self.channels:
            self.fail(f"bottom must have {self.channels} channels on axis 1, got shape {bottom[0].shape}")
        super().reshape(bottom, top)

    def _split(self, array):
        """(N, C, S) view of an array shaped like the bottom."""
        return array.reshape(array.shape[0], self.channels, -1)

    def _slope(self):
        return self.blobs[0].data.reshape(1, -1, 1)  # broadcasts over (N, C, S)

    def forward_values(self, x, y):
        xp, w = self.xp, self._split(self.w())
        xp.minimum(self._split(x), 0, out=w)
        w *= self._slope()
        xp.maximum(x, 0, out=y)
        y += w.reshape(y.shape)

    def backward(self, top, propagate_down, bottom):
        x, dy = self.bottom_data(bottom), top[0].diff
        if self.param_propagate_down[0]:
            self._slope_gradient(x, dy)  # first: in place, dy is overwritten below
        if propagate_down[0]:
            self._bottom_gradient(x, dy, bottom[0].diff)

    def _slope_gradient(self, x, dy):
        xp, w = self.xp, self.w()
        xp.minimum(x, 0, out=w)  # x where x <= 0: d y / d slope
        w *= dy
        axes = None if self.p.channel_shared else (0, 2)
        xp.sum(self._split(w), axis=axes, out=self.slope_sum.data)
        self.blobs[0].diff[...] += self.slope_sum.data

    def _bottom_gradient(self, x, dy, dx):
        # dx = dy + m * (slope - 1) with m = dy where x <= 0 (else 0), as Caffe's x <= 0 rule
        xp, w = self.xp, self.w()
        xp.less_equal(x, 0, out=w)
        w *= dy
        xp.subtract(dy, w, out=dx)
        ws = self._split(w)
        ws *= self._slope()
        dx += w


@register
class ELULayer(NeuronLayer):
    """y = x if x > 0 else alpha * (exp(x) - 1). Honors elu_param: alpha.  With alpha < 0 the sign
    of y no longer tells x > 0, so the layer then keeps a copy of its bottom when in place."""

    type = "ELU"
    param = "elu_param"
    backward_reads_top = True
    temps = 2

    def setup(self, bottom, top):
        self.alpha = self.p.alpha
        self.saves_bottom = self.alpha < 0
        super().setup(bottom, top)

    def forward_values(self, x, y):
        xp, w = self.xp, self.w()
        xp.minimum(x, 0, out=w)  # exp of the negative part only: no overflow
        xp.exp(w, out=w)
        w -= 1
        w *= self.alpha
        xp.maximum(x, 0, out=y)
        y += w

    def backward_values(self, x, y, dy, dx):
        # dx = dy * (1 if x > 0 else alpha + y), as Caffe: factor = 1 + [x <= 0] * (alpha + y - 1)
        xp, w, mask = self.xp, self.w(0), self.w(1)
        xp.less_equal(x, 0, out=mask)
        xp.add(y, self.alpha - 1, out=w)
        w *= mask
        w += 1
        xp.multiply(dy, w, out=dx)


@register
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(-x)), computed as Caffe's 0.5 * tanh(0.5 x) + 0.5 (no overflow).
    Honors sigmoid_param: engine (accepted; it picks an implementation, not a result)."""

    type = "Sigmoid"
    param = "sigmoid_param"
    legacy = "SIGMOID"
    backward_reads_top = True
    temps = 1

    def forward_values(self, x, y):
        xp = self.xp
        xp.multiply(x, 0.5, out=y)
        xp.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def backward_values(self, x, y, dy, dx):
        xp, w = self.xp, self.w()
        xp.subtract(1, y, out=w)
        w *= y
        xp.multiply(dy, w, out=dx)


@register
class TanHLayer(NeuronLayer):
    """y = tanh(x). Honors tanh_param: engine (accepted; it picks an implementation, not a result)."""

    type = "TanH"
    param = "tanh_param"
    legacy = "TANH"
    backward_reads_top = True
    temps = 1

    def forward_values(self, x, y):
        self.xp.tanh(x, out=y)

    def backward_values(self, x, y, dy, dx):
        xp, w = self.xp, self.w()
        xp.multiply(y, y, out=w)
        xp.subtract(1, w, out=w)
        xp.multiply(dy, w, out=dx)


@register
class AbsValLayer(NeuronLayer):
    """y = |x|; the gradient is sign(x) (0 at 0, as Caffe).  No parameters.  Caffe refuses to
    run it in place; Espresso allows it by keeping a copy of the bottom."""

    type = "AbsVal"
    legacy = "ABSVAL"
    saves_bottom = True
    temps = 1

    def forward_values(self, x, y):
        self.xp.abs(x, out=y)

    def backward_values(self, x, y, dy, dx):
        xp, w = self.xp, self.w()
        xp.sign(x, out=w)
        xp.multiply(dy, w, out=dx)


@register
class PowerLayer(NeuronLayer):
    """y = (shift + scale * x) ^ power. Honors power_param: power, scale, shift.

    The gradient is power * scale * (shift + scale * x) ^ (power - 1), computed directly; Caffe
    divides y by x (or by shift + scale * x) instead, which equals it except where that base is
    0: there Caffe gives NaN and Espresso the power's own value (0 for power > 1)."""

    type = "Power"
    param = "power_param"
    legacy = "POWER"
    temps = 1

    def setup(self, bottom, top):
        p = self.p
        self.power, self.scale, self.shift = p.power, p.scale, p.shift
        self.diff_scale = self.power * self.scale
        # the gradient is a constant when power == 1 or diff_scale == 0: no need for x then
        self.saves_bottom = not (self.power == 1 or self.diff_scale == 0)
        super().setup(bottom, top)

    def _affine(self, x, out):
        """out = shift + scale * x (Caffe skips the identity steps)."""
        self.xp.multiply(x, self.scale, out=out)
        if self.shift != 0:
            out += self.shift

    def forward_values(self, x, y):
        if self.diff_scale == 0:  # y does not depend on x, as Caffe
            with np.errstate(all="ignore"):  # Caffe's pow(shift, power) may be inf or NaN
                y[...] = 1.0 if self.power == 0 else np.power(self.dtype.type(self.shift), self.power)
            return
        self._affine(x, y)
        if self.power != 1:
            self.xp.power(y, self.power, out=y)

    def backward_values(self, x, y, dy, dx):
        xp = self.xp
        if self.diff_scale == 0:
            dx[...] = 0
            return
        if self.power == 1:
            xp.multiply(dy, self.diff_scale, out=dx)
            return
        w = self.w()
        self._affine(x, w)
        if self.power != 2:
            xp.power(w, self.power - 1, out=w)
        w *= self.diff_scale
        xp.multiply(dy, w, out=dx)


@register
class ExpLayer(NeuronLayer):
    """y = base ^ (shift + scale * x), base -1 meaning e. Honors exp_param: base, scale, shift.
    Computed as Caffe: base^shift * exp(ln(base) * scale * x)."""

    type = "Exp"
    param = "exp_param"
    legacy = "EXP"
    backward_reads_top = True

    def setup(self, bottom, top):
        log_base = _log_base(self)
        self.inner_scale = log_base * self.p.scale
        base, shift = self.p.base, self.p.shift
        self.outer_scale = 1.0 if shift == 0 else (math.exp(shift) if base == -1 else base ** shift)
        super().setup(bottom, top)

    def forward_values(self, x, y):
        xp = self.xp
        xp.multiply(x, self.inner_scale, out=y)
        xp.exp(y, out=y)
        if self.outer_scale != 1:
            y *= self.outer_scale

    def backward_values(self, x, y, dy, dx):
        self.xp.multiply(dy, y, out=dx)
        if self.inner_scale != 1:
            dx *= self.inner_scale


@register
class LogLayer(NeuronLayer):
    """y = log_base(shift + scale * x), base -1 meaning e. Honors log_param: base, scale, shift."""

    type = "Log"
    param = "log_param"
    saves_bottom = True
    temps = 1

    def setup(self, bottom, top):
        log_base = _log_base(self)
        if log_base == 0:
            self.fail("log_param.base: must not be 1")
        self.base_scale = 1.0 / log_base
        self.backward_scale = self.p.scale / log_base
        super().setup(bottom, top)

    def _affine(self, x, out):
        """out = shift + scale * x."""
        self.xp.multiply(x, self.p.scale, out=out)
        if self.p.shift != 0:
            out += self.p.shift

    def forward_values(self, x, y):
        self._affine(x, y)
        self.xp.log(y, out=y)
        if self.base_scale != 1:
            y *= self.base_scale

    def backward_values(self, x, y, dy, dx):
        # dy/dx = scale / (ln(base) * (shift + scale * x))
        xp, w = self.xp, self.w()
        self._affine(x, w)
        xp.reciprocal(w, out=w)
        if self.backward_scale != 1:
            w *= self.backward_scale
        xp.multiply(dy, w, out=dx)


@register
class BNLLLayer(NeuronLayer):
    """y = log(1 + e^x), computed stably as max(x, 0) + log1p(e^-|x|) (Caffe's two-branch form).
    The gradient e^x / (1 + e^x) uses e^min(x, 50), as Caffe.  No parameters."""

    type = "BNLL"
    legacy = "BNLL"
    saves_bottom = True
    temps = 1
    threshold = 50.0  # Caffe's kBNLL_THRESHOLD

    def forward_values(self, x, y):
        xp, w = self.xp, self.w()
        xp.abs(x, out=w)
        xp.negative(w, out=w)
        xp.exp(w, out=w)
        xp.log1p(w, out=w)
        xp.maximum(x, 0, out=y)
        y += w

    def backward_values(self, x, y, dy, dx):
        xp, w = self.xp, self.w()
        xp.minimum(x, self.threshold, out=w)
        xp.exp(w, out=w)
        xp.multiply(dy, w, out=dx)
        w += 1
        dx /= w


@register
class ThresholdLayer(NeuronLayer):
    """y = 1 if x > threshold else 0. Honors threshold_param: threshold.  No backward, as Caffe."""

    type = "Threshold"
    param = "threshold_param"
    legacy = "THRESHOLD"

    def forward_values(self, x, y):
        self.xp.greater(x, self.p.threshold, out=y)

    def backward(self, top, propagate_down, bottom):
        Layer.backward(self, top, propagate_down, bottom)  # refuses, as Caffe's NOT_IMPLEMENTED


@register
class ClipLayer(NeuronLayer):
    """y = max(min, min(x, max)). Honors clip_param: min, max (both required).  The gradient
    passes where min <= x <= max, as Caffe."""

    type = "Clip"
    param = "clip_param"
    saves_bottom = True
    temps = 1

    def setup(self, bottom, top):
        for name in ("min", "max"):
            if not self.p.HasField(name):
                self.fail(f"clip_param.{name} is required")
        super().setup(bottom, top)

    def forward_values(self, x, y):
        # min(x, max) first, then max with min: Caffe's order (decides min > max)
        self.xp.minimum(x, self.p.max, out=y)
        self.xp.maximum(y, self.p.min, out=y)

    def backward_values(self, x, y, dy, dx):
        xp, w = self.xp, self.w()
        xp.greater_equal(x, self.p.min, out=w)
        xp.multiply(dy, w, out=dx)
        xp.less_equal(x, self.p.max, out=w)
        dx *= w


@register
class SwishLayer(NeuronLayer):
    """y = x * sigmoid(beta * x). Honors swish_param: beta.  Backward, as Caffe:
    dy * (beta * y + s * (1 - beta * y)) with s = sigmoid(beta * x) kept from forward."""

    type = "Swish"
    param = "swish_param"
    backward_reads_top = True
    temps = 1

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.sigmoid = self.new_blob(())

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.sigmoid.reshape(bottom[0].shape)

    def forward_values(self, x, y):
        xp, s = self.xp, self.sigmoid.data
        xp.multiply(x, 0.5 * self.p.beta, out=s)  # Caffe's sigmoid: 0.5 * tanh(0.5 z) + 0.5
        xp.tanh(s, out=s)
        s *= 0.5
        s += 0.5
        xp.multiply(x, s, out=y)

    def backward_values(self, x, y, dy, dx):
        # beta*y + s*(1 - beta*y) = beta*y*(1 - s) + s
        xp, w, s = self.xp, self.w(), self.sigmoid.data
        xp.subtract(1, s, out=w)
        w *= y
        w *= self.p.beta
        w += s
        xp.multiply(dy, w, out=dx)
