"""Normalization layers: BatchNorm, Scale, Bias, MVN."""

from espresso.errors import ShapeError
from espresso.layer import Layer, register
from espresso.proto import caffe_pb2


def _channels(blob):
    """Caffe's BatchNorm channel count: axis 1, or 1 for a 1-D bottom."""
    return 1 if blob.num_axes == 1 else blob.shape[1]


FUSED_CELLS = 32  # the fewest cells a channel for Scale's and Bias's sums by channel_sums


def _per_channel(array, channels):
    """(N, C, S) view of an (N, C, ...) array, S = product of the remaining axes."""
    return array.reshape(array.shape[0], channels, -1) if array.ndim else array.reshape(1, 1, 1)


def _col(vector):
    """A (C,) vector as (1, C, 1), to broadcast over (N, C, S)."""
    return vector.reshape(1, -1, 1)


@register
class BatchNormLayer(Layer):
    """(x - mean) / sqrt(var + eps) per channel (axis 1), no affine part (that is a Scale layer).
    Honors batch_norm_param: use_global_stats (default: TEST phase), moving_average_fraction, eps.

    blobs: running sum of means, of (unbiased) variances, and their weight s, shape (1,); the
    statistics used in global mode are blob / s (0 when s == 0).  As Caffe, the three blobs get
    lr_mult 0 (added to this layer's `param` specs); a non-zero lr_mult on them is an error.
    Where the net runs its backward with batch statistics it keeps its own copy of the
    normalized values, so it may run in place and later in-place layers (Scale, ReLU) may
    overwrite its top."""

    type = "BatchNorm"
    param = "batch_norm_param"
    exact_bottoms = exact_tops = 1
    inplace = True

    def setup(self, bottom, top):
        p = self.p
        test = self.phase == caffe_pb2.TEST
        self.use_global = p.use_global_stats if p.HasField("use_global_stats") else test
        self.fraction, self.eps = p.moving_average_fraction, p.eps
        if bottom[0].num_axes < 1:
            self.fail("bottom must have at least 1 axis")
        self.channels = c = _channels(bottom[0])
        self.blobs = [self.new_blob((c,)), self.new_blob((c,)), self.new_blob((1,))]  # zeros
        self._freeze_statistics()
        # workspaces: per-channel mean, var, std, two gradient sums; 1/s and its mask
        self.mean, self.var, self.std = self.new_blob((c,)), self.new_blob((c,)), self.new_blob((c,))
        self.dy_sum, self.dyy_sum = self.new_blob((c,)), self.new_blob((c,))
        self.factor, self.nonzero = self.new_blob((1,)), self.new_blob((1,))
        # sized by forward, where needed: a TEST net keeps no copy, a GPU no temporary
        self.x_norm, self.temp, self.work = self.new_blob(()), self.new_blob(()), self.new_blob(())
        # where the net folds the next Scale in: its scale (and bias) blobs; and a ReLU's slope
        self.folded_params, self.folded_slope = [], None
        self.fused = self.k.channel_sums is not None

    def _freeze_statistics(self):
        """Caffe masks the statistics from the solver by giving them lr_mult 0."""
        specs = self.lp.param
        for i in range(len(self.blobs)):
            if i == len(specs):
                specs.add(lr_mult=0)
            elif specs[i].lr_mult != 0:
                self.fail(f"param {i}: lr_mult must be 0 (the statistics are not learned), "
                          f"got {specs[i].lr_mult:g}")

    def reshape(self, bottom, top):
        if bottom[0].num_axes < 1 or _channels(bottom[0]) != self.channels:
            self.fail(f"bottom must have {self.channels} channels on axis 1, got shape {bottom[0].shape}",
                      ShapeError)
        top[0].reshape(bottom[0].shape)
        self.dims = _per_channel(bottom[0].data, self.channels).shape
        if self.fused:
            self.work.reshape(self.k.channel_sums_workspace_size(self.dims))

    def forward(self, bottom, top):
        c = self.channels
        x, y = _per_channel(bottom[0].data, c), _per_channel(top[0].data, c)
        x_norm = None
        if self.backward_runs and not self.use_global:  # backward reads the normalized values
            self.x_norm.reshape(bottom[0].shape)
            x_norm = self.x_norm.data
        if self.use_global:
            self._global_statistics()
        (self._forward_fused if self.fused else self._forward_xp)(x, y, x_norm, bottom[0].count // c)

    def _forward_fused(self, x, y, x_norm, m):
        """Two channel sums (mean, then the variance about it) and one pass that normalizes."""
        k, work = self.k, self.work.data
        if not self.use_global:
            k.channel_sums(x, self.dims, work, sums=self.mean.data, scale=1 / m)
            k.channel_sums(x, self.dims, work, dots=self.var.data, shift=self.mean.data, scale=1 / m)
            self._update_statistics(m)
        self._std()
        folded = [blob.data for blob in self.folded_params] if self.fold else []  # its Scale's, folded in
        slope = self.folded_slope if self.fold > 1 else None  # the ReLU's after that
        k.batch_norm_forward(x, self.mean.data, self.std.data, y, x_norm, self.dims, *folded, slope=slope)

    def _forward_xp(self, x, y, x_norm, m):
        xp = self.xp
        if not self.use_global:
            xp.mean(x, axis=(0, 2), out=self.mean.data)
        xp.subtract(x, _col(self.mean.data), out=y)  # in place too: x is read first
        if not self.use_global:
            self.temp.reshape(x.shape)
            xp.multiply(y, y, out=self.temp.data)
            xp.mean(self.temp.data, axis=(0, 2), out=self.var.data)  # biased batch variance
            self._update_statistics(m)
        self._std()
        y /= _col(self.std.data)
        if x_norm is not None:
            x_norm.reshape(y.shape)[...] = y

    def _std(self):
        self.xp.add(self.var.data, self.eps, out=self.std.data)
        self.xp.sqrt(self.std.data, out=self.std.data)

    def _global_statistics(self):
        """mean = blob0 / s and var = blob1 / s, with 1/s taken as 0 when s == 0 (as Caffe)."""
        xp, s = self.xp, self.blobs[2].data
        f, nonzero = self.factor.data, self.nonzero.data
        xp.equal(s, 0, out=f)
        f += s  # s, or 1 where s == 0: no division by zero
        xp.reciprocal(f, out=f)
        xp.not_equal(s, 0, out=nonzero)
        f *= nonzero
        xp.multiply(self.blobs[0].data, f, out=self.mean.data)
        xp.multiply(self.blobs[1].data, f, out=self.var.data)

    def _update_statistics(self, m):
        """s <- s*lambda + 1, blob0 <- blob0*lambda + mean, blob1 <- blob1*lambda + var*m/(m-1)."""
        lam = self.fraction
        mean_sum, var_sum, s = (b.data for b in self.blobs)
        s *= lam
        s += 1
        mean_sum *= lam
        mean_sum += self.mean.data
        var_sum *= lam
        self.xp.multiply(self.var.data, m / (m - 1) if m > 1 else 1, out=self.std.data)  # std: scratch
        var_sum += self.std.data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp, c = self.xp, self.channels
        dy, dx = _per_channel(top[0].diff, c), _per_channel(bottom[0].diff, c)
        std = _col(self.std.data)
        if self.use_global:
            xp.divide(dy, std, out=dx)
            return
        # Caffe's steps: dx = (dy - (y * sum(dy * y) + sum(dy)) / m) / sqrt(var + eps), sums over
        # (N, S) per channel, both taken before dx is written (dx may be dy)
        y, m = _per_channel(self.x_norm.data, c), bottom[0].count // c
        if self.fused:
            self.k.channel_sums(dy, self.dims, self.work.data, sums=self.dy_sum.data, dots=self.dyy_sum.data, y=y)
            self.k.batch_norm_backward(dy, y, self.dy_sum.data, self.dyy_sum.data, self.std.data, dx, self.dims)
            return
        t = self.temp.data.reshape(dy.shape)
        xp.multiply(dy, y, out=t)
        xp.sum(t, axis=(0, 2), out=self.dyy_sum.data)
        xp.sum(dy, axis=(0, 2), out=self.dy_sum.data)
        xp.multiply(y, _col(self.dyy_sum.data), out=t)
        t += _col(self.dy_sum.data)
        t *= self.dtype.type(-1.0 / m)  # Caffe's axpby: dy + (-1/m) t
        xp.add(dy, t, out=dx)
        dx /= std


class _Broadcast(Layer):
    """Shared by Scale and Bias: a second operand, from bottom[1] or a learned blob, whose shape
    matches bottom[0]'s axes [axis, axis + its num_axes), broadcast over the others."""

    min_bottoms, max_bottoms, exact_tops = 1, 2, 1
    inplace = True

    def _axis(self, blob):
        axis, n = self.p.axis, blob.num_axes
        if not -n <= axis < n:
            self.fail(f"{self.param}.axis: {axis} is out of range for bottom shape {blob.shape}", ShapeError)
        return axis % n

    def _param_shape(self, bottom0, num_axes):
        """bottom0's shape over the axes the learned blob covers (num_axes -1: to the end)."""
        if num_axes < -1:
            self.fail(f"{self.param}.num_axes: must be >= -1, got {num_axes}")
        axis = self._axis(bottom0)
        if num_axes >= 0 and bottom0.num_axes < axis + num_axes:
            self.fail(f"{self.param}: axis {axis} + num_axes {num_axes} extends past bottom shape "
                      f"{bottom0.shape}")
        return bottom0.shape[axis:] if num_axes == -1 else bottom0.shape[axis:axis + num_axes]

    def _dims(self, bottom0, operand):
        """(outer, dim, inner) of bottom0 around the operand's axes; a scalar operand starts at 0."""
        axis = 0 if operand.num_axes == 0 else self._axis(bottom0)
        end = axis + operand.num_axes
        if bottom0.shape[axis:end] != operand.shape:
            self.fail(f"operand shape {operand.shape} does not match bottom shape {bottom0.shape} "
                      f"at axis {axis}", ShapeError)
        return bottom0.count_range(0, axis), operand.count, bottom0.count_range(end)

    def _operand(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def _reshape_sums(self):
        """The per-channel sums' buffers: the GPU's channel_sums workspace, else a (dim,) sum.
        channel_sums gives each channel a block: for few cells a channel (an elementwise operand)
        the xp code's reduction does better."""
        self.fused_sums = self.k.channel_sums is not None and self.dims[0] * self.dims[2] >= FUSED_CELLS
        if self.fused_sums:
            self.sum.reshape(self.k.channel_sums_workspace_size(self.dims))
        else:
            self.sum.reshape(self.dims[1])

    def _reduce(self, array, out, accumulate, times=None):
        """Sum an (outer, dim, inner) array (times another, unless None) over outer and inner into
        the (dim,) `out`."""
        if self.fused_sums:
            which = {"sums": out} if times is None else {"dots": out, "y": times}
            self.k.channel_sums(array, self.dims, self.sum.data, accumulate=accumulate, **which)
            return
        if times is not None:  # the product into temp, which may hold `times` (the bottom's copy)
            self.temp.reshape(self.dims)
            array = self.xp.multiply(array, times, out=self.temp.data)
        if accumulate:
            self.xp.sum(array, axis=(0, 2), out=self.sum.data)
            out += self.sum.data
        else:
            self.xp.sum(array, axis=(0, 2), out=out)

    def _split(self, array):
        return array.reshape(self.dims)


@register
class ScaleLayer(_Broadcast):
    """y = x * scale (+ bias), scale from bottom[1] or learned. Honors scale_param: axis, num_axes,
    filler (constant 1 when unset, as Caffe), bias_term, bias_filler.

    Keeps a copy of its bottom when in place (as Caffe) for the scale gradient.  The learned
    scale's gradient always accumulates; Caffe overwrites it when the scale covers the whole
    bottom (a bug under iter_size > 1)."""

    type = "Scale"
    param = "scale_param"

    def setup(self, bottom, top):
        p = self.p
        if len(bottom) == 1:
            filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(type="constant", value=1)
            self.blobs = [self.new_blob(self._param_shape(bottom[0], p.num_axes), filler)]
        self.bias_index = None
        if p.bias_term:
            # Caffe's inner Bias layer covers as many axes as the scale
            num_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
            self.bias_index = len(self.blobs)
            self.blobs.append(self.new_blob(self._param_shape(bottom[0], num_axes), p.bias_filler))
        self.temp, self.sum = self.new_blob(()), self.new_blob(())  # sized where needed

    def reshape(self, bottom, top):
        self.dims = self._dims(bottom[0], self._operand(bottom))
        if self.bias_index is not None:
            self._dims(bottom[0], self.blobs[self.bias_index])
        self.in_place = top[0] is bottom[0]
        top[0].reshape(bottom[0].shape)
        self._reshape_sums()

    def forward(self, bottom, top):
        if self.fold:  # the BatchNorm before did this layer's work too
            return
        if self.in_place and self.backward_runs and self.bottom_copy is None:  # the scale gradient reads it
            self.temp.reshape(self.dims)
            self.temp.data[...] = self._split(bottom[0].data)
        scale = self._operand(bottom).data
        bias = None if self.bias_index is None else self.blobs[self.bias_index].data
        if self.k.scale_forward is not None:
            self.k.scale_forward(bottom[0].data, scale, bias, top[0].data, self.dims)
            return
        y = self._split(top[0].data)
        self.xp.multiply(self._split(bottom[0].data), _col(scale), out=y)
        if bias is not None:
            y += _col(bias)

    def _bottom_values(self, bottom):
        """The bottom's values as forward read them (in place, later layers overwrite the bottom)."""
        if not self.in_place:
            return self._split(bottom[0].data)
        return self._split((self.temp if self.bottom_copy is None else self.bottom_copy).data)

    def backward(self, top, propagate_down, bottom):
        dy, learned = self._split(top[0].diff), len(bottom) == 1
        if self.bias_index is not None and self.param_propagate_down[self.bias_index]:
            self._reduce(dy, self.blobs[self.bias_index].diff.reshape(-1), accumulate=True)
        if self.param_propagate_down[0] if learned else propagate_down[1]:
            x = self._bottom_values(bottom)
            self._reduce(dy, self._operand(bottom).diff.reshape(-1), accumulate=learned, times=x)
        if propagate_down[0]:
            self.xp.multiply(dy, _col(self._operand(bottom).data), out=self._split(bottom[0].diff))


@register
class BiasLayer(_Broadcast):
    """y = x + bias, bias from bottom[1] or learned. Honors bias_param: axis, num_axes, filler
    (constant 0 by default)."""

    type = "Bias"
    param = "bias_param"

    def setup(self, bottom, top):
        if len(bottom) == 1:
            self.blobs = [self.new_blob(self._param_shape(bottom[0], self.p.num_axes), self.p.filler)]
        self.sum = self.new_blob(())

    def reshape(self, bottom, top):
        self.dims = self._dims(bottom[0], self._operand(bottom))
        top[0].reshape(bottom[0].shape)
        self._reshape_sums()

    def forward(self, bottom, top):
        y = self._split(top[0].data)
        self.xp.add(self._split(bottom[0].data), _col(self._operand(bottom).data), out=y)

    def backward(self, top, propagate_down, bottom):
        dy = self._split(top[0].diff)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
        learned = len(bottom) == 1
        if self.param_propagate_down[0] if learned else propagate_down[1]:
            self._reduce(dy, self._operand(bottom).diff.reshape(-1), accumulate=learned)


@register
class MVNLayer(Layer):
    """Subtract the mean and, optionally, divide by the standard deviation + eps (eps on the
    deviation, not the variance, as Caffe), per (sample, channel) or per sample.
    Honors mvn_param: normalize_variance, across_channels, eps.  Statistics run over every axis
    after 1 (or after 0 with across_channels); Caffe limits the bottom to 4 axes, Espresso does
    not.  The gradient is Caffe's (exact up to a relative O(eps / std))."""

    type = "MVN"
    param = "mvn_param"
    legacy = "MVN"
    exact_bottoms = exact_tops = 1
    inplace = True

    def setup(self, bottom, top):
        self.backward_reads_top = self.p.normalize_variance
        self.mean, self.std, self.dyy_mean = self.new_blob(()), self.new_blob(()), self.new_blob(())
        self.temp = self.new_blob(())

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if not shape:
            self.fail("bottom must have at least 1 axis", ShapeError)
        self.rows = shape[0] * (1 if self.p.across_channels or len(shape) == 1 else shape[1])
        top[0].reshape(shape)
        self.temp.reshape(shape)
        for blob in (self.mean, self.std, self.dyy_mean):
            blob.reshape(self.rows, 1)

    def _rows(self, array):
        """(rows, dim) view: one row per normalized group."""
        return array.reshape(self.rows, -1)

    def forward(self, bottom, top):
        xp = self.xp
        x, y, mean = self._rows(bottom[0].data), self._rows(top[0].data), self.mean.data
        xp.mean(x, axis=1, keepdims=True, out=mean)
        xp.subtract(x, mean, out=y)
        if self.p.normalize_variance:
            t, std = self._rows(self.temp.data), self.std.data
            xp.multiply(y, y, out=t)
            xp.mean(t, axis=1, keepdims=True, out=std)
            xp.sqrt(std, out=std)
            std += self.p.eps
            y /= std

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        dy, dx, dy_mean = self._rows(top[0].diff), self._rows(bottom[0].diff), self.mean.data
        xp.mean(dy, axis=1, keepdims=True, out=dy_mean)  # mean: free after forward
        if not self.p.normalize_variance:
            xp.subtract(dy, dy_mean, out=dx)
            return
        # dx = (dy - mean(dy) - mean(dy * y) * y) / (std + eps), means taken before dx is written
        y, t = self._rows(top[0].data), self._rows(self.temp.data)
        xp.multiply(dy, y, out=t)
        xp.mean(t, axis=1, keepdims=True, out=self.dyy_mean.data)
        xp.multiply(y, self.dyy_mean.data, out=t)
        xp.subtract(dy, t, out=dx)
        dx -= dy_mean
        dx /= self.std.data
