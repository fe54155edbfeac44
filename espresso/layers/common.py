"""Common layers that compute: InnerProduct, Dropout, Embed, Eltwise, Reduction, ArgMax,
Parameter.  The layers that only move or regroup data live in utility.py."""

import math

import numpy as np

from espresso.blob import Blob
from espresso.errors import NetError, ShapeError
from espresso.layer import Layer, register
from espresso.proto import caffe_pb2

ELTWISE = caffe_pb2.EltwiseParameter
REDUCTION = caffe_pb2.ReductionParameter
# InnerProduct splits its batch over a CPU's threads from this many multiply-adds (M*N*K), with
# weights of at most this many bytes
SPLIT_MULTIPLY_ADDS = 1 << 22
SPLIT_WEIGHT_BYTES = 8 << 20


def share(top, bottom, shape):
    """Caffe's ShareData + ShareDiff: `top` becomes a `shape`-shaped view of `bottom`."""
    top.reshape(shape)
    top.share_data(bottom)
    top.share_diff(bottom)


def split3(array, axis):
    """View a contiguous array as (outer, array.shape[axis], inner)."""
    shape = array.shape
    return array.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))


def accumulate(blob, grad):
    """Param diffs accumulate (Caffe's GEMM with beta = 1); the solver clears them."""
    diff = blob.diff
    diff += grad


def index_blob(backend):
    """A workspace of integer indices (Embed, BatchReindex): float data is cast into it."""
    return Blob((0,), np.intp, backend)


@register
class InnerProductLayer(Layer):
    """y = x W^T + b, x flattened from `axis` on to (M, K). Honors inner_product_param: num_output,
    bias_term, weight_filler, bias_filler, axis, transpose (W stored as (K, num_output))."""

    type = "InnerProduct"
    param = "inner_product_param"
    legacy = "INNER_PRODUCT"
    exact_bottoms = exact_tops = 1
    parts_read_whole_top_diff = True

    def setup(self, bottom, top):
        p = self.p
        if p.num_output <= 0:
            self.fail(f"inner_product_param.num_output: must be > 0, got {p.num_output}")
        axis = self.canonical_axis(bottom[0], p.axis, "inner_product_param.axis")
        self.N, self.K = p.num_output, bottom[0].count_range(axis)
        shape = (self.K, self.N) if p.transpose else (self.N, self.K)
        self.blobs = [self.new_blob(shape, p.weight_filler)]
        if p.bias_term:
            self.blobs.append(self.new_blob((self.N,), p.bias_filler))

    def reshape(self, bottom, top):
        axis = self.canonical_axis(bottom[0], self.p.axis, "inner_product_param.axis")
        K = bottom[0].count_range(axis)
        if K != self.K:
            self.fail(f"bottom shape {bottom[0].shape} gives {K} inputs from axis {axis}, "
                      f"but the weights were made for {self.K}", ShapeError)
        self.M = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.N,))
        self.ones(self.M)  # sized here: not first made by work put aside (backward)
        # a large product with weights that stay in cache may join a chain of layers that split
        # the batch over a CPU's threads (Layer.batch_parts): LeNet's ip1 ends the convolutions'.
        # Each part reads all the weights (CaffeNet's fc6, 151 MB, keeps OpenBLAS's threads, each
        # of which reads a share).  Alone (forward, backward) it runs whole, on OpenBLAS's threads
        ranges = self.backend.batch_ranges(self.M)
        split = self.M * self.N * self.K >= SPLIT_MULTIPLY_ADDS and self.blobs[0].data.nbytes <= SPLIT_WEIGHT_BYTES
        self.batch_parts = ranges if len(ranges) > 1 and split else None

    def forward(self, bottom, top):
        self.forward_part(bottom, top, 0, 0, self.M)

    def forward_part(self, bottom, top, part, lo, hi):
        x = bottom[0].data.reshape(self.M, self.K)[lo:hi]
        y = top[0].data.reshape(self.M, self.N)[lo:hi]
        w = self.blobs[0].data if self.p.transpose else self.blobs[0].data.T
        if self.fold:  # and the in-place ReLU after it (Builder._fold_layers)
            self.k.matmul_bias_relu(x, w, self.blobs[1].data, y, self.folded_slope)
        elif self.p.bias_term:
            self.k.matmul_bias(x, w, self.blobs[1].data, y)  # (one kernel on a GPU)
        else:
            self.k.matmul(x, w, out=y)

    def backward(self, top, propagate_down, bottom):
        dy, x = top[0].diff.reshape(self.M, self.N), bottom[0].data.reshape(self.M, self.K)
        # param grads aside while the main stream computes the bottom gradient; with none, the
        # weights' on the main stream and the bias aside, queued first (as in Convolution's backward)
        with self.backend.aside():
            self._bias_grad(dy)
        with self.backend.aside(when=propagate_down[0]):
            self._weight_grad(dy, x)
        if propagate_down[0]:
            self._data_grad(dy, bottom[0].diff.reshape(self.M, self.K))

    def backward_part(self, top, propagate_down, bottom, part, lo, hi):
        """The bottom gradient of images lo..hi, and the param gradients of this part's share
        of the outputs, over the whole batch: the parts write apart, and each sum keeps the
        order of an unsplit backward (parts_read_whole_top_diff)."""
        dy, x = top[0].diff.reshape(self.M, self.N), bottom[0].data.reshape(self.M, self.K)
        parts = len(self.batch_parts)
        outputs = slice(self.N * part // parts, self.N * (part + 1) // parts)
        if outputs.start < outputs.stop:  # (more parts than outputs leave some without a share)
            self._bias_grad(dy, outputs)
            self._weight_grad(dy, x, outputs)
        if propagate_down[0]:
            self._data_grad(dy[lo:hi], bottom[0].diff.reshape(self.M, self.K)[lo:hi])

    def _bias_grad(self, dy, outputs=slice(None)):
        if self.p.bias_term and self.param_propagate_down[1]:
            self.add_row_sums(dy[:, outputs], self.blobs[1].diff[outputs])

    def _weight_grad(self, dy, x, outputs=slice(None)):
        """diff += the weights' gradient in the outputs' rows (columns when transposed), in
        the GEMM (beta = 1) as Caffe."""
        if not self.param_propagate_down[0]:
            return
        diff = self.blobs[0].diff
        if self.p.transpose:
            self.k.matmul(x.T, dy[:, outputs], out=diff[:, outputs], accumulate=True)  # (K, N)
        else:
            self.k.matmul(dy[:, outputs].T, x, out=diff[outputs], accumulate=True)  # (N, K)

    def _data_grad(self, dy, dx):
        w = self.blobs[0].data
        self.k.matmul(dy, w.T if self.p.transpose else w, out=dx)


@register
class DropoutLayer(Layer):
    """TRAIN: y = x * mask / (1 - ratio), mask ~ Bernoulli(1 - ratio) drawn from the backend's
    generator (so the masks differ from Caffe's random stream); TEST: y = x. Honors
    dropout_param.dropout_ratio, in [0, 1) (Caffe only DCHECKs it), and scale_train (Intel
    Caffe's extension: false gives TRAIN y = x * mask and TEST y = x * (1 - ratio))."""

    type = "Dropout"
    param = "dropout_param"
    legacy = "DROPOUT"
    exact_bottoms = exact_tops = 1
    inplace = True

    def setup(self, bottom, top):
        ratio = self.p.dropout_ratio
        if not 0 <= ratio < 1:
            self.fail(f"dropout_param.dropout_ratio: must be in [0, 1), got {ratio}")
        self.train = self.phase == caffe_pb2.TRAIN
        self.mask = self.new_blob(())  # 0 or 1/(1 - ratio): the scale is folded into the mask

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        if self.train:
            self.mask.reshape(bottom[0].shape)

    @property
    def test_scale(self):
        return 1.0 if self.p.scale_train else 1.0 - self.p.dropout_ratio

    def forward(self, bottom, top):
        if not self.train:
            self.xp.multiply(bottom[0].data, self.test_scale, out=top[0].data)
            return
        ratio, mask = self.p.dropout_ratio, self.mask.data
        self.backend.rng.random(out=mask, dtype=mask.dtype)  # uniform [0, 1)
        self.xp.greater_equal(mask, ratio, out=mask)  # kept with probability 1 - ratio
        if self.p.scale_train:
            mask *= 1.0 / (1.0 - ratio)
        self.xp.multiply(bottom[0].data, mask, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.train:
            self.xp.multiply(top[0].diff, self.mask.data, out=bottom[0].diff)
        else:
            self.xp.multiply(top[0].diff, self.test_scale, out=bottom[0].diff)


@register
class EmbedLayer(Layer):
    """y[..., :] = W[index] + b for float indices in [0, input_dim). Honors embed_param: num_output,
    input_dim, bias_term, weight_filler, bias_filler. W is (input_dim, num_output); no gradient to
    the indices. An index >= input_dim is an error on the CPU; negative ones are not checked."""

    type = "Embed"
    param = "embed_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        p = self.p
        for field in ("num_output", "input_dim"):
            if getattr(p, field) <= 0:
                self.fail(f"embed_param.{field}: must be > 0, got {getattr(p, field)}")
        self.blobs = [self.new_blob((p.input_dim, p.num_output), p.weight_filler)]
        if p.bias_term:
            self.blobs.append(self.new_blob((p.num_output,), p.bias_filler))
        self.index = index_blob(self.backend)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.p.num_output,))
        self.index.reshape(bottom[0].count)

    def allow_force_backward(self, bottom_index):
        return False

    def _indices(self, bottom):
        index = self.index.data
        index[...] = bottom.data.reshape(-1)  # float -> int, truncating as Caffe's static_cast
        return index

    def forward(self, bottom, top):
        y = top[0].data.reshape(-1, self.p.num_output)
        try:
            self.xp.take(self.blobs[0].data, self._indices(bottom[0]), axis=0, out=y)
        except IndexError as e:
            self.fail(f"index out of range for input_dim {self.p.input_dim}: {e}", ShapeError)
        if self.p.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.fail("cannot backpropagate to its indices (bottom 0)", NetError)
        dy = top[0].diff.reshape(-1, self.p.num_output)
        if self.param_propagate_down[0]:
            # repeated indices accumulate: an unbuffered scatter-add
            self.xp.add.at(self.blobs[0].diff, self._indices(bottom[0]), dy)
        if self.p.bias_term and self.param_propagate_down[1]:
            self.add_row_sums(dy, self.blobs[1].diff)


@register
class EltwiseLayer(Layer):
    """Element-wise PROD, SUM (weighted by coeff) or MAX of the bottoms. Honors eltwise_param:
    operation, coeff (SUM only; Caffe also accepts and ignores it for MAX, Espresso refuses it),
    stable_prod_grad. MAX keeps Caffe's tie rule: bottom 0 wins only if strictly larger than
    bottom 1, later bottoms only if strictly larger than the running max. SUM can run in place."""

    type = "Eltwise"
    param = "eltwise_param"
    legacy = "ELTWISE"
    min_bottoms = 2
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.p
        self.op, coeffs = p.operation, list(p.coeff)
        if coeffs and self.op != ELTWISE.SUM:
            self.fail("eltwise_param.coeff: only the SUM operation takes coefficients")
        if coeffs and len(coeffs) != len(bottom):
            self.fail(f"eltwise_param.coeff: needs one per bottom ({len(bottom)}), got {len(coeffs)}")
        self.coeffs = coeffs or [1.0] * len(bottom)
        self.inplace = self.op == ELTWISE.SUM  # SUM scales bottom 0 into the top before reading others
        self.backward_reads_top = self.op == ELTWISE.PROD and not p.stable_prod_grad
        self.mask = Blob((), np.int32, self.backend)  # MAX: which bottom won
        self.better = Blob((), np.bool_, self.backend)  # MAX: where a later bottom beats the max
        self.scaled = self.new_blob(())  # SUM: coeff * bottom
        self.adds_two = self.op == ELTWISE.SUM and self.coeffs == [1, 1]
        self.folded_slope = None  # where the net folds the in-place ReLU after it in (adds_two only)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        for k, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                self.fail(f"bottom {k} has shape {b.shape}, bottom 0 has {shape}", ShapeError)
        top[0].reshape(shape)
        if self.op == ELTWISE.MAX:
            self.mask.reshape(shape)
            self.better.reshape(shape)
        elif self.op == ELTWISE.SUM and any(c != 1 for c in self.coeffs[1:]):
            self.scaled.reshape(shape)

    def forward(self, bottom, top):
        xs, y = [b.data for b in bottom], top[0].data
        if self.op == ELTWISE.PROD:
            self._prod(xs, y)
        elif self.op == ELTWISE.SUM:
            self._sum(xs, y)
        else:
            self._max(xs, y)

    def _prod(self, xs, y):
        self.xp.multiply(xs[0], xs[1], out=y)
        for x in xs[2:]:
            y *= x

    def _sum(self, xs, y):
        if self.fold:  # and the ReLU after it, in one pass
            self.k.add_relu(xs[0], xs[1], y, self.folded_slope)
            return
        # the first bottom goes into the top first: in place, y is xs[0]; unweighted, it is added
        # to the second in one pass (ResNet's shortcuts), Caffe's 0 + 1 * a + 1 * b to the bit
        first = 2 if self.coeffs[:2] == [1, 1] else 1  # (adds_two, or more bottoms)
        if first == 2:
            self.xp.add(xs[0], xs[1], out=y)
        else:
            self.xp.multiply(xs[0], self.coeffs[0], out=y)
        for x, c in zip(xs[first:], self.coeffs[first:], strict=True):
            if c == 1:
                y += x
            else:
                self.xp.multiply(x, c, out=self.scaled.data)
                y += self.scaled.data

    def _max(self, xs, y):
        xp, mask, better = self.xp, self.mask.data, self.better.data
        xp.greater_equal(xs[1], xs[0], out=mask)  # 0 or 1: a tie goes to bottom 1, as in Caffe
        xp.maximum(xs[0], xs[1], out=y)
        for k, x in enumerate(xs[2:], 2):
            xp.greater(x, y, out=better)  # strictly: a tie keeps the earlier bottom
            xp.copyto(mask, k, where=better)
            xp.maximum(y, x, out=y)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        # last to first: in place, bottom 0's diff is the top diff, which the others read first
        for i in reversed(range(len(bottom))):
            if not propagate_down[i]:
                continue
            dx = bottom[i].diff
            if self.op == ELTWISE.SUM:
                if not (bottom[i] is top[0] and self.coeffs[i] == 1):  # (in place, unweighted: dx is dy)
                    self.xp.multiply(dy, self.coeffs[i], out=dx)
                continue
            self._local_grad(i, top[0], bottom, dx)
            dx *= dy

    def _local_grad(self, i, top, bottom, dx):
        """d top / d bottom i for PROD and MAX, written into dx."""
        xp = self.xp
        if self.op == ELTWISE.MAX:
            xp.equal(self.mask.data, i, out=dx)  # the gradient goes to the winning bottom only
        elif self.p.stable_prod_grad:
            others = [b.data for j, b in enumerate(bottom) if j != i]  # product of the other inputs
            dx[...] = others[0]
            for x in others[1:]:
                dx *= x
        else:
            xp.divide(top.data, bottom[i].data, out=dx)  # Caffe's fast path: inf/nan where bottom is 0


@register
class ReductionLayer(Layer):
    """coeff * SUM / ASUM / SUMSQ / MEAN over the axes axis..end; top shape bottom.shape[:axis].
    Honors reduction_param: operation, axis, coeff."""

    type = "Reduction"
    param = "reduction_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        self.op = self.p.operation
        self.work = self.new_blob(())  # ASUM |x|, SUMSQ x*x

    def reshape(self, bottom, top):
        axis = self.canonical_axis(bottom[0], self.p.axis, "reduction_param.axis")
        top[0].reshape(bottom[0].shape[:axis])  # 0-d when axis is 0
        self.num, self.dim = bottom[0].count_range(0, axis), bottom[0].count_range(axis)
        self.scale = self.p.coeff / self.dim if self.op == REDUCTION.MEAN else self.p.coeff
        if self.op in (REDUCTION.ASUM, REDUCTION.SUMSQ):
            self.work.reshape(self.num, self.dim)

    def forward(self, bottom, top):
        xp = self.xp
        x, y = bottom[0].data.reshape(self.num, self.dim), top[0].data.reshape(self.num)
        if self.op == REDUCTION.ASUM:
            x = xp.abs(x, out=self.work.data)
        elif self.op == REDUCTION.SUMSQ:
            x = xp.multiply(x, x, out=self.work.data)
        xp.sum(x, axis=1, out=y)
        y *= self.scale

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data.reshape(self.num, self.dim)
        dx = bottom[0].diff.reshape(self.num, self.dim)
        dy = top[0].diff.reshape(self.num, 1)
        if self.op == REDUCTION.ASUM:
            self.xp.sign(x, out=dx)  # 0 at 0, as caffe_cpu_sign
            dx *= dy
        elif self.op == REDUCTION.SUMSQ:
            self.xp.multiply(x, dy, out=dx)
            dx *= 2
        else:
            dx[...] = dy
        dx *= self.scale


@register
class ArgMaxLayer(Layer):
    """Indices (as float) of the top_k largest values per item, or along `axis`. Honors argmax_param:
    out_max_val, top_k, axis. Shapes as Caffe's: without axis (N, 1 or 2, top_k) padded with 1s to the
    bottom's rank, indices then values; with axis the bottom's shape with top_k there, values only
    when out_max_val. Ties go to the larger index (Caffe sorts (value, index) pairs descending).
    top_k > 1 sorts with temporaries (ArgMax is an output layer, not in the training hot path)."""

    type = "ArgMax"
    param = "argmax_param"
    legacy = "ARGMAX"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        if self.p.top_k < 1:
            self.fail(f"argmax_param.top_k: must be >= 1, got {self.p.top_k}")
        self.best = Blob((), np.intp, self.backend)

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        b, k = bottom[0], self.p.top_k
        if self.p.HasField("axis"):
            axis = self.canonical_axis(b, self.p.axis, "argmax_param.axis")
            self.outer, self.dim, self.inner = b.count_range(0, axis), b.shape[axis], b.count_range(axis + 1)
            shape = list(b.shape)
            shape[axis] = k
        else:
            self.outer, self.dim, self.inner = b.shape[0], b.count_range(1), 1
            shape = [1] * max(3, b.num_axes)
            shape[0], shape[1], shape[2] = b.shape[0], 2 if self.p.out_max_val else 1, k
        if k > self.dim:
            self.fail(f"argmax_param.top_k ({k}) exceeds the {self.dim} values searched in shape {b.shape}")
        top[0].reshape(shape)
        self.best.reshape(self.outer, self.inner)

    def _outputs(self, top):
        """Views (outer, top_k, inner) of the top for the indices and for the values (or None)."""
        k = self.p.top_k
        if self.p.HasField("axis"):
            y = top.data.reshape(self.outer, k, self.inner)
            return (None, y) if self.p.out_max_val else (y, None)
        rows = 2 if self.p.out_max_val else 1
        y = top.data.reshape(self.outer, rows, k)[..., None]  # (N, rows, k, 1): indices, then values
        return y[:, 0], (y[:, 1] if self.p.out_max_val else None)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data.reshape(self.outer, self.dim, self.inner)
        reverse = x[:, ::-1]  # searching the reversed axis makes ties go to the larger index
        indices, values = self._outputs(top[0])
        if self.p.top_k == 1:
            if indices is not None:
                xp.argmax(reverse, axis=1, out=self.best.data)
                xp.subtract(self.dim - 1, self.best.data, out=indices[:, 0])
            if values is not None:
                xp.max(x, axis=1, out=values[:, 0])
            return
        order = xp.argsort(-reverse, axis=1, kind="stable")[:, :self.p.top_k]
        if indices is not None:
            indices[...] = self.dim - 1 - order
        if values is not None:
            values[...] = xp.take_along_axis(reverse, order, axis=1)


@register
class ParameterLayer(Layer):
    """Outputs one learned blob of parameter_param.shape (zero-initialised, as Caffe's). Honors
    parameter_param.shape. Forward copies the blob into the top (sharing it there would leave a
    Split or Reshape after this layer holding the top's old storage); unlike Caffe (which shares
    the diff) backward accumulates the top diff into the blob's diff, so iter_size > 1 adds up."""

    type = "Parameter"
    param = "parameter_param"
    exact_bottoms = 0
    exact_tops = 1

    def setup(self, bottom, top):
        shape = tuple(int(d) for d in self.p.shape.dim)
        if any(d < 0 for d in shape):
            self.fail(f"parameter_param.shape: dims must be >= 0, got {list(shape)}")
        self.blobs = [self.new_blob(shape)]

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0]:
            accumulate(self.blobs[0], top[0].diff)
