"""Softmax, the losses, and Accuracy.

Loss layers follow Caffe's LossLayer: the loss top is a 0-d blob holding the *unweighted* loss;
its diff holds the loss weight (1 by default), which scales every gradient.  Labels arrive as
float blobs and are truncated to int, as Caffe's static_cast<int> does.  Label values are not
range-checked (Caffe only DCHECKs them; a check here would need a host sync).
"""

import numpy as np

from espresso.errors import LabelError, NetError, ShapeError
from espresso.layer import Layer, register
from espresso.proto import caffe_pb2
from espresso.proto.text import read_binary
from espresso.proto.weights import blob_array

FULL, VALID, BATCH_SIZE, NONE = (caffe_pb2.LossParameter.FULL, caffe_pb2.LossParameter.VALID,
                                 caffe_pb2.LossParameter.BATCH_SIZE, caffe_pb2.LossParameter.NONE)
FLT_MIN = float(np.finfo(np.float32).tiny)  # SoftmaxWithLoss clamps at FLT_MIN, even in double
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD (MultinomialLogisticLoss, InfogainLoss)
_LOSS_FIELDS = ("ignore_label", "normalization", "normalize")


def _workspace(layer, name, shape, dtype):
    """layer.<name> as a zeroed array of `shape`, reallocated only when the shape changes."""
    array = getattr(layer, name, None)
    if array is None or array.shape != tuple(shape) or array.dtype != dtype:
        array = layer.xp.zeros(shape, dtype)
        setattr(layer, name, array)
    return array


def _class_ids(layer, classes, shape):
    """layer.class_ids = arange(classes) reshaped to broadcast along the class axis."""
    ids = getattr(layer, "class_ids", None)
    if ids is None or ids.shape != shape:
        layer.class_ids = layer.xp.arange(classes).reshape(shape)


def _split_axis(blob, axis):
    """(outer, channels, inner) around a canonical `axis`, as Caffe's count(0, axis) etc."""
    return blob.count_range(0, axis), blob.shape[axis], blob.count_range(axis + 1)


class _Labels:
    """Integer labels of one shape (outer, inner), a mask of those != ignore_label, and ignored
    ones set to 0 (`safe`) so they can index; workspaces sized in reshape, filled in forward.

    A label outside [0, classes) that is not ignored is refused (Caffe reads out of bounds): at
    once where the arrays are host memory; on a device it is recorded in `problem` (position + 1,
    label), which Net.check_problems reads with the values it reads back anyway, so a CUDA graph
    needs no host sync per iteration."""

    def __init__(self, layer, ignore_label=None):
        self.layer, self.xp, self.ignore = layer, layer.xp, ignore_label
        self.shape, self.classes = None, None
        self.problem = None if layer.backend.host_arrays else layer.xp.zeros(2, np.int64)

    def reshape(self, shape, classes):
        self.classes = classes
        if shape == self.shape:
            return
        xp, self.shape = self.xp, shape
        self.value, self.safe = xp.zeros(shape, xp.int64), xp.zeros(shape, xp.int64)
        self.valid, self.bad, self.scratch = xp.ones(shape, bool), xp.zeros(shape, bool), xp.zeros(shape, bool)

    def load(self, data, check=True):
        """The labels from `data`; `check` False where a fused kernel checks them itself."""
        xp = self.xp
        xp.copyto(self.value, data.reshape(self.shape), casting="unsafe")  # truncates as static_cast<int>
        if self.ignore is not None:
            xp.not_equal(self.value, self.ignore, out=self.valid)
        else:
            self.valid.fill(True)
        if check:  # bad = valid & (value < 0 | value >= classes), in the buffers made in reshape
            xp.less(self.value, 0, out=self.bad)
            xp.greater_equal(self.value, self.classes, out=self.scratch)
            xp.logical_or(self.bad, self.scratch, out=self.bad)
            xp.logical_and(self.bad, self.valid, out=self.bad)
            self._check(self.bad)
            # (on a device, until the problem is raised) a bad label reads as ignored, never indexed
            xp.logical_not(self.bad, out=self.scratch)
            xp.logical_and(self.valid, self.scratch, out=self.valid)
        xp.multiply(self.value, self.valid, out=self.safe)

    def _check(self, bad):
        flat, xp = bad.ravel(), self.xp
        if self.problem is None:
            if flat.any():
                raise self.error(int(flat.argmax()) + 1, int(self.value.ravel()[flat.argmax()]))
            return
        # a few 0-d temporaries (from the graph's own pool under capture); the host path has none
        first = xp.argmax(flat)
        found = xp.stack([(first + 1) * flat[first], self.value.ravel()[first]])
        xp.copyto(self.problem, found, where=self.problem[0] == 0)  # the first one recorded stays

    def error(self, position, label):
        """The LabelError for the label at flat `position` - 1."""
        item, where = divmod(position - 1, self.shape[1])
        at = f"batch item {item}" + (f", position {where}" if self.shape[1] > 1 else "")
        ignored = "" if self.ignore is None else f" (nor its ignore_label {self.ignore})"
        return LabelError(f"{self.layer.where}: label {label} at {at} is not a class in [0, {self.classes}){ignored}")

    def device_problem(self):
        return None if self.problem is None else (self.problem, self.error)


@register
class SoftmaxLayer(Layer):
    """y = exp(x) / sum exp(x) over one axis, computed as exp(x - max). Honors softmax_param: axis
    (engine only picks an implementation in Caffe and is accepted)."""

    type = "Softmax"
    param = "softmax_param"
    legacy = "SOFTMAX"
    exact_bottoms = exact_tops = 1
    inplace = True
    backward_reads_top = True

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        self.axis = self.canonical_axis(bottom[0], self.p.axis, "softmax_param.axis")
        self.dims = _split_axis(bottom[0], self.axis)
        outer, _, inner = self.dims
        _workspace(self, "scale", (outer, 1, inner), self.dtype)  # per-position max, then sum

    def forward(self, bottom, top):
        xp, x, y = self.xp, bottom[0].data.reshape(self.dims), top[0].data.reshape(self.dims)
        if self.k.softmax_forward is not None:  # one kernel (GPU)
            return self.k.softmax_forward(x, y, self.dims)
        x.max(axis=1, keepdims=True, out=self.scale)  # methods: NumPy's wrappers cost 2 us a call
        xp.subtract(x, self.scale, out=y)
        xp.exp(y, out=y)
        y.sum(axis=1, keepdims=True, out=self.scale)
        xp.divide(y, self.scale, out=y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # dx = (dy - sum(dy * y)) * y, safe in place: the sum is taken before dx is written
        xp, y = self.xp, top[0].data.reshape(self.dims)
        dy, dx = top[0].diff.reshape(self.dims), bottom[0].diff.reshape(self.dims)
        xp.sum(dy * y, axis=1, keepdims=True, out=self.scale)
        xp.subtract(dy, self.scale, out=dx)
        dx *= y


class _LossLayer(Layer):
    """Caffe's LossLayer: two bottoms (data, labels) of one batch size, a 0-d loss top."""

    is_loss = True
    exact_bottoms, exact_tops = 2, 1
    loss_fields = ()  # the loss_param fields this layer honors; the others are refused
    labels = None  # _Labels, in the losses that read class labels

    def setup(self, bottom, top):
        self.reject_fields(self.lp.loss_param, "loss_param", [n for n in _LOSS_FIELDS if n not in self.loss_fields])

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1  # as Caffe: force_backward never reaches the labels

    def device_problem(self):
        return None if self.labels is None else self.labels.device_problem()

    def reshape_loss(self, bottom, top):
        a, b = bottom[0], bottom[1]
        if not a.num_axes or not b.num_axes or a.shape[0] != b.shape[0]:
            self.fail(f"the data and label should have the same first dimension, got {a.shape} "
                      f"and {b.shape}", ShapeError)
        top[0].reshape(())

    def refuse_label_backward(self, propagate_down):
        if propagate_down[1]:
            self.fail("cannot backpropagate to label inputs (bottom 1)", NetError)

    def read_normalization(self, default):
        """Caffe's rule: normalization if set, else the legacy normalize flag, else `default`."""
        p = self.lp.loss_param
        if p.HasField("normalization"):
            return p.normalization
        if p.HasField("normalize"):
            return VALID if p.normalize else BATCH_SIZE
        return default

    def normalizer(self, valid_count):
        """max(1, count) for the mode; valid_count is an array scalar (no host sync)."""
        if self.normalization == VALID:
            return self.xp.maximum(valid_count, 1)
        outer, inner = self.outer, self.inner
        return max(1, {FULL: outer * inner, BATCH_SIZE: outer, NONE: 1}[self.normalization])


class _SoftmaxLossBase(_LossLayer):
    """Shared by SoftmaxWithLoss and InfogainLoss: an internal Softmax over the class axis,
    labels with ignore_label, and an optional second top sharing the probabilities."""

    exact_tops = None
    min_tops, max_tops = 1, 2
    backward_reads_top = True  # top 1 is the probabilities backward reads
    loss_fields = _LOSS_FIELDS

    def make_softmax(self, bottom, axis):
        lp = caffe_pb2.LayerParameter()
        lp.CopyFrom(self.lp)
        lp.type = "Softmax"
        lp.softmax_param.axis = axis
        del lp.loss_weight[:]
        self.softmax = SoftmaxLayer(lp, self.backend, self.phase, self.dtype, self.source)
        self.prob = self.new_blob(bottom[0].shape)
        self.softmax.setup_all([bottom[0]], [self.prob])
        p = self.lp.loss_param
        self.labels = _Labels(self, p.ignore_label if p.HasField("ignore_label") else None)

    def reshape_softmax(self, bottom, top):
        self.reshape_loss(bottom, top)
        self.softmax.reshape([bottom[0]], [self.prob])
        self.dims = self.softmax.dims
        self.outer, self.classes, self.inner = self.dims
        if self.outer * self.inner != bottom[1].count:
            self.fail(f"number of labels must match number of predictions: prediction shape "
                      f"{bottom[0].shape} with class axis {self.softmax.axis} needs "
                      f"{self.outer * self.inner} labels, got {bottom[1].count}", ShapeError)
        self.labels.reshape((self.outer, self.inner), self.classes)
        _class_ids(self, self.classes, (1, self.classes, 1))
        if len(top) == 2:
            top[1].reshape(bottom[0].shape)
            top[1].share_data(self.prob)


@register
class SoftmaxWithLossLayer(_SoftmaxLossBase):
    """-log softmax(x)[label], clamped at FLT_MIN, normalized. Honors softmax_param.axis,
    loss_param: ignore_label, normalization (VALID), normalize; optional top 1 = probabilities."""

    type = "SoftmaxWithLoss"
    param = "loss_param"
    legacy = "SOFTMAX_LOSS"

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.normalization = self.read_normalization(self.p.normalization)
        self.make_softmax(bottom, self.lp.softmax_param.axis)

    def reshape(self, bottom, top):
        self.reshape_softmax(bottom, top)
        most = self.k.SOFTMAX_LOSS_MOST
        self.fused = self.k.softmax_loss_forward is not None and (most is None or bottom[0].count <= most)
        if self.fused:  # per-position scratch and the normalizer, for the fused kernels
            positions = self.outer * self.inner
            _workspace(self, "position_loss", (2, positions), self.dtype)
            _workspace(self, "norm", (), self.dtype)

    def forward(self, bottom, top):
        xp, labels = self.xp, self.labels
        if self.fused:
            fixed = None if self.normalization == VALID else self.normalizer(None)
            bad = self.k.softmax_loss_forward(bottom[0].data, bottom[1].data, self.prob.data, *self.position_loss,
                                              top[0].data, self.norm, self.dims, labels.ignore, fixed, labels.problem)
            if bad is not None:  # (a host backend's kernel returns it; a device's records it in labels.problem)
                raise labels.error(*bad)
            return
        self.softmax.forward([bottom[0]], [self.prob])
        labels.load(bottom[1].data)
        prob = self.prob.data.reshape(self.dims)
        picked = xp.take_along_axis(prob, labels.safe[:, None, :], axis=1)[:, 0, :]  # (outer, inner)
        loss = -(xp.log(xp.maximum(picked, FLT_MIN)) * labels.valid).sum()
        top[0].data[...] = loss / self.normalizer(labels.valid.sum())

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        labels, dx = self.labels, bottom[0].diff.reshape(self.dims)
        if self.fused:
            self.k.softmax_loss_backward(self.prob.data, bottom[1].data, top[0].diff, self.norm, dx, self.dims,
                                         labels.ignore)
            return
        # d/dx = prob - onehot(label), zero at ignored positions
        self.xp.subtract(self.prob.data.reshape(self.dims), self.class_ids == labels.safe[:, None, :], out=dx)
        dx *= labels.valid[:, None, :]
        dx *= top[0].diff / self.normalizer(labels.valid.sum())


@register
class InfogainLossLayer(_SoftmaxLossBase):
    """-sum_l H[label, l] log softmax(x)_l (clamped at 1e-20), normalized, as Caffe 1.0 master
    (softmax applied internally). H from bottom 2 or infogain_loss_param.source. Honors
    infogain_loss_param: source, axis; loss_param: ignore_label, normalization (VALID); optional
    top 1 = probabilities. H gets no gradient: backward with propagate_down[2] is an error."""

    type = "InfogainLoss"
    param = "infogain_loss_param"
    legacy = "INFOGAIN_LOSS"
    exact_bottoms = None
    min_bottoms, max_bottoms = 2, 3

    def setup(self, bottom, top):
        super().setup(bottom, top)
        if self.lp.loss_param.HasField("normalize"):
            self.fail("loss_param.normalize is deprecated for InfogainLoss; use normalization")
        if self.lp.softmax_param.HasField("axis"):
            self.fail("softmax_param.axis is not read by InfogainLoss; use infogain_loss_param.axis")
        self.normalization = self.lp.loss_param.normalization
        self.make_softmax(bottom, self.p.axis)
        self.infogain = None
        if len(bottom) < 3:
            self.infogain = self._read_infogain()

    def _read_infogain(self):
        if not self.p.source:
            self.fail("infogain_loss_param.source must be given when H is not bottom 2")
        array = blob_array(read_binary(self.p.source, caffe_pb2.BlobProto()), self.p.source)
        blob = self.new_blob(array.shape)
        blob.data[...] = self.backend.to_device(array, self.dtype)
        return blob

    def _h(self, bottom):
        return (bottom[2] if len(bottom) == 3 else self.infogain).data.reshape(self.classes, self.classes)

    def reshape(self, bottom, top):
        self.reshape_softmax(bottom, top)
        count = (bottom[2] if len(bottom) == 3 else self.infogain).count
        if count != self.classes ** 2:
            self.fail(f"H must be {self.classes}x{self.classes} (the class count squared), "
                      f"got {count} values", ShapeError)
        _workspace(self, "rows", (self.outer, self.inner, self.classes), self.dtype)  # H[label]
        _workspace(self, "row_sums", (self.classes,), self.dtype)

    def _gather_rows(self, bottom):
        """H[label, l] laid out as the predictions: (outer, classes, inner)."""
        self.xp.take(self._h(bottom), self.labels.safe, axis=0, out=self.rows)
        return self.rows.transpose(0, 2, 1)

    def forward(self, bottom, top):
        xp, labels = self.xp, self.labels
        self.softmax.forward([bottom[0]], [self.prob])
        labels.load(bottom[1].data)
        log_prob = xp.log(xp.maximum(self.prob.data.reshape(self.dims), LOG_THRESHOLD))
        loss = -(self._gather_rows(bottom) * log_prob * labels.valid[:, None, :]).sum()
        top[0].data[...] = loss / self.normalizer(labels.valid.sum())

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_backward(propagate_down)
        if len(propagate_down) > 2 and propagate_down[2]:
            self.fail("cannot backpropagate to the infogain matrix H (bottom 2); with "
                      "force_backward, give H through infogain_loss_param.source", NetError)
        if not propagate_down[0]:
            return
        # d/dx_l = p_l * sum_k H[label, k] - H[label, l] (the exact softmax gradient, no clamp)
        xp, labels, dx = self.xp, self.labels, bottom[0].diff.reshape(self.dims)
        xp.sum(self._h(bottom), axis=1, out=self.row_sums)
        xp.multiply(self.prob.data.reshape(self.dims), self.row_sums[labels.safe][:, None, :], out=dx)
        dx -= self._gather_rows(bottom)
        dx *= labels.valid[:, None, :]
        dx *= top[0].diff / self.normalizer(labels.valid.sum())


@register
class EuclideanLossLayer(_LossLayer):
    """sum (a - b)^2 / (2N); both bottoms get gradients (Caffe allows forcing either)."""

    type = "EuclideanLoss"
    legacy = "EUCLIDEAN_LOSS"

    def allow_force_backward(self, bottom_index):
        return True

    def reshape(self, bottom, top):
        self.reshape_loss(bottom, top)
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            self.fail(f"inputs must have the same dimension, got {bottom[0].shape} and "
                      f"{bottom[1].shape}", ShapeError)
        _workspace(self, "diff", (bottom[0].count,), self.dtype)  # a - b, flat

    def forward(self, bottom, top):
        xp = self.xp
        xp.subtract(bottom[0].data.ravel(), bottom[1].data.ravel(), out=self.diff)
        top[0].data[...] = xp.dot(self.diff, self.diff) / bottom[0].num / 2

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = sign * top[0].diff / bottom[0].num
                self.xp.multiply(self.diff.reshape(bottom[i].shape), alpha, out=bottom[i].diff)


@register
class SigmoidCrossEntropyLossLayer(_LossLayer):
    """-sum [t log s(x) + (1-t) log(1-s(x))] in its overflow-free form, normalized (BATCH_SIZE
    by default, as Caffe). Honors loss_param: ignore_label, normalization, normalize."""

    type = "SigmoidCrossEntropyLoss"
    param = "loss_param"
    legacy = "SIGMOID_CROSS_ENTROPY_LOSS"
    loss_fields = _LOSS_FIELDS

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.normalization = self.read_normalization(BATCH_SIZE)
        self.labels = _Labels(self, self.p.ignore_label if self.p.HasField("ignore_label") else None)

    def reshape(self, bottom, top):
        self.reshape_loss(bottom, top)
        if bottom[0].count != bottom[1].count:
            self.fail(f"inputs must have the same count, got {bottom[0].shape} and {bottom[1].shape}",
                      ShapeError)
        self.outer, self.inner = bottom[0].shape[0], bottom[0].count_range(1)
        self.labels.reshape(bottom[0].shape, None)  # targets in [0, 1], masked by ignore_label only
        _workspace(self, "sigmoid", bottom[0].shape, self.dtype)

    def forward(self, bottom, top):
        xp, x, t = self.xp, bottom[0].data, bottom[1].data.reshape(bottom[0].shape)
        self.labels.load(t, check=False)
        # x (t - [x >= 0]) - log(1 + exp(-|x|)) is the log-likelihood without overflow
        ll = x * (t - (x >= 0)) - xp.log1p(xp.exp(-xp.abs(x)))
        loss = -(ll * self.labels.valid).sum()
        top[0].data[...] = loss / self.normalizer(self.labels.valid.sum())
        xp.tanh(x * 0.5, out=self.sigmoid)  # sigmoid(x) = (1 + tanh(x/2)) / 2, never overflows
        self.sigmoid *= 0.5
        self.sigmoid += 0.5

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        self.xp.subtract(self.sigmoid, bottom[1].data.reshape(dx.shape), out=dx)
        dx *= self.labels.valid
        # the normalizer again, from forward's mask: an array kept from forward would be one a
        # CUDA graph capture made but had not yet written (see docs/adding_a_layer.md)
        dx *= top[0].diff / self.normalizer(self.labels.valid.sum())


@register
class HingeLossLayer(_LossLayer):
    """sum max(0, 1 - y x)^p / N with y = +1 at the label, -1 elsewhere. Honors
    hinge_loss_param.norm (L1, L2)."""

    type = "HingeLoss"
    param = "hinge_loss_param"
    legacy = "HINGE_LOSS"

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.labels = _Labels(self)

    def reshape(self, bottom, top):
        self.reshape_loss(bottom, top)
        n = bottom[0].num
        self.dims = (n, bottom[0].count // n)
        self.labels.reshape((n, 1), self.dims[1])
        _class_ids(self, self.dims[1], (1, self.dims[1]))
        _workspace(self, "sign", self.dims, self.dtype)  # -1 at the label, +1 elsewhere
        _workspace(self, "margin", self.dims, self.dtype)  # max(0, 1 + sign * x)

    def forward(self, bottom, top):
        xp, x = self.xp, bottom[0].data.reshape(self.dims)
        self.labels.load(bottom[1].data.ravel()[: self.dims[0]])  # Caffe: label[i] for sample i, from the flat blob
        xp.equal(self.class_ids, self.labels.safe, out=self.sign)
        self.sign *= -2
        self.sign += 1
        xp.multiply(x, self.sign, out=self.margin)
        self.margin += 1
        xp.maximum(self.margin, 0, out=self.margin)
        m = self.margin.ravel()
        total = m.sum() if self.p.norm == caffe_pb2.HingeLossParameter.L1 else xp.dot(m, m)
        top[0].data[...] = total / self.dims[0]

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        xp, dx = self.xp, bottom[0].diff.reshape(self.dims)
        xp.multiply(self.margin, self.sign, out=dx)
        if self.p.norm == caffe_pb2.HingeLossParameter.L1:
            xp.sign(dx, out=dx)  # sign(0) = 0: no gradient where the margin is met
        else:
            dx *= 2
        dx *= top[0].diff / self.dims[0]


@register
class MultinomialLogisticLossLayer(_LossLayer):
    """-sum log p[label] / N over given probabilities, clamped at 1e-20."""

    type = "MultinomialLogisticLoss"
    legacy = "MULTINOMIAL_LOGISTIC_LOSS"

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.labels = _Labels(self)

    def reshape(self, bottom, top):
        self.reshape_loss(bottom, top)
        b = bottom[1]
        if (b.channels, b.height, b.width) != (1, 1, 1):
            self.fail(f"labels must be (N, 1, 1, 1), got {b.shape}", ShapeError)
        n = bottom[0].num
        self.dims = (n, bottom[0].count // n)
        self.labels.reshape((n, 1), self.dims[1])
        _class_ids(self, self.dims[1], (1, self.dims[1]))
        _workspace(self, "picked", (n, 1), self.dtype)  # max(p[label], 1e-20)

    def forward(self, bottom, top):
        xp, p = self.xp, bottom[0].data.reshape(self.dims)
        self.labels.load(bottom[1].data)
        xp.maximum(xp.take_along_axis(p, self.labels.safe, axis=1), LOG_THRESHOLD, out=self.picked)
        top[0].data[...] = -xp.log(self.picked).sum() / self.dims[0]

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        # -1 / max(p, 1e-20) at the label (Caffe keeps it even where the clamp is active)
        dx = bottom[0].diff.reshape(self.dims)
        self.xp.equal(self.class_ids, self.labels.safe, out=dx)
        dx *= -top[0].diff / self.dims[0] / self.picked


@register
class ContrastiveLossLayer(_LossLayer):
    """sum [y d^2 + (1-y) max(margin - d, 0)^2] / 2N with d = ||a - b||; legacy_version uses
    max(margin - d^2, 0). Bottoms a, b (N, C, 1, 1), y (N, 1, 1, 1). Honors
    contrastive_loss_param: margin, legacy_version. As Caffe, force_backward reaches a and b
    (Caffe's ContrastiveLossLayer overrides LossLayer's rule for bottom 1); y never gets a gradient."""

    type = "ContrastiveLoss"
    param = "contrastive_loss_param"
    legacy = "CONTRASTIVE_LOSS"
    exact_bottoms = 3

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        self.reshape_loss(bottom, top)
        a, b, y = bottom
        if a.channels != b.channels or (a.height, a.width, b.height, b.width) != (1, 1, 1, 1):
            self.fail(f"a and b must be (N, C, 1, 1) alike, got {a.shape} and {b.shape}", ShapeError)
        if (y.num, y.channels, y.height, y.width) != (a.num, 1, 1, 1):
            self.fail(f"the similarity label must be (N, 1, 1, 1), got {y.shape}", ShapeError)
        _workspace(self, "diff", (a.num, a.channels), self.dtype)  # a - b
        _workspace(self, "dist_sq", (a.num, 1), self.dtype)
        _workspace(self, "similar", (a.num, 1), np.bool_)

    def forward(self, bottom, top):
        xp, n, margin = self.xp, bottom[0].num, self.p.margin
        xp.subtract(bottom[0].data.reshape(self.diff.shape), bottom[1].data.reshape(self.diff.shape),
                    out=self.diff)
        xp.sum(self.diff * self.diff, axis=1, keepdims=True, out=self.dist_sq)
        xp.not_equal(xp.trunc(bottom[2].data.reshape(n, 1)), 0, out=self.similar)  # (int)y != 0
        if self.p.legacy_version:
            apart = xp.maximum(margin - self.dist_sq, 0)
        else:
            apart = xp.maximum(margin - xp.sqrt(self.dist_sq), 0) ** 2
        top[0].data[...] = xp.where(self.similar, self.dist_sq, apart).sum() / n / 2

    def backward(self, top, propagate_down, bottom):
        xp, n, margin = self.xp, bottom[0].num, self.p.margin
        if self.p.legacy_version:
            mdist = margin - self.dist_sq
            beta = -1.0
        else:
            dist = xp.sqrt(self.dist_sq)
            mdist = margin - dist
            beta = -mdist / (dist + 1e-4)  # Caffe's eps keeps d = 0 finite
        # per-sample factor on (a - b): 1 if similar, beta where the margin is violated, else 0
        factor = xp.where(self.similar, 1.0, xp.where(mdist > 0, beta, 0.0))
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = sign * top[0].diff / n
                xp.multiply(self.diff, factor * alpha, out=bottom[i].diff.reshape(self.diff.shape))


@register
class AccuracyLayer(Layer):
    """Fraction of labels among the top_k scores (a tie counts against), over non-ignored
    positions. Honors accuracy_param: top_k, axis, ignore_label; optional top 1 = per-class
    accuracy. No backward."""

    type = "Accuracy"
    param = "accuracy_param"
    legacy = "ACCURACY"
    exact_bottoms = 2
    min_tops, max_tops = 1, 2

    def setup(self, bottom, top):
        ignore = self.p.ignore_label if self.p.HasField("ignore_label") else None
        self.labels = _Labels(self, ignore)

    def reshape(self, bottom, top):
        if not bottom[1].count or self.p.top_k > bottom[0].count // bottom[1].count:
            self.fail(f"accuracy_param.top_k must be <= the number of classes, got top_k "
                      f"{self.p.top_k} for predictions {bottom[0].shape} and labels {bottom[1].shape}")
        axis = self.canonical_axis(bottom[0], self.p.axis, "accuracy_param.axis")
        self.dims = _split_axis(bottom[0], axis)
        outer, classes, inner = self.dims
        if outer * inner != bottom[1].count:
            self.fail(f"number of labels must match number of predictions: prediction shape "
                      f"{bottom[0].shape} with class axis {axis} needs {outer * inner} labels, "
                      f"got {bottom[1].count}", ShapeError)
        self.labels.reshape((outer, inner), classes)
        _class_ids(self, classes, (1, classes, 1))
        top[0].reshape(())
        if len(top) == 2:
            top[1].reshape((classes,))
        # on a GPU, two kernels (and none to compile on a first run) instead of some twenty
        self.fused = self.k.accuracy_forward is not None and len(top) == 1
        if self.fused:  # per-position scratch (hits, valid) and the normalizer
            _workspace(self, "position_hits", (2, outer * inner), self.dtype)
            _workspace(self, "norm", (), self.dtype)

    def device_problem(self):
        return self.labels.device_problem()

    def forward(self, bottom, top):
        xp, labels = self.xp, self.labels
        if self.fused:
            return self.k.accuracy_forward(bottom[0].data, bottom[1].data, *self.position_hits, top[0].data,
                                           self.norm, self.dims, labels.ignore, self.p.top_k, labels.problem)
        labels.load(bottom[1].data)
        x = bottom[0].data.reshape(self.dims)
        truth = xp.take_along_axis(x, labels.safe[:, None, :], axis=1)  # (outer, 1, inner)
        better = (x >= truth).sum(axis=1) - 1  # other classes scoring at least the true one
        hit = (better < self.p.top_k) & labels.valid
        top[0].data[...] = hit.sum() / xp.maximum(labels.valid.sum(), 1)  # 0 when all are ignored
        if len(top) == 2:
            per_class = (self.class_ids == labels.safe[:, None, :]) & labels.valid[:, None, :]
            seen = per_class.sum(axis=(0, 2))
            right = (per_class & hit[:, None, :]).sum(axis=(0, 2))
            top[1].data[...] = right / xp.maximum(seen, 1)  # 0 for classes never seen
