"""Utility layers that move or regroup data: Split, Flatten, Reshape, Concat, Slice, Tile,
Silence, BatchReindex, Filter.

Where Caffe shares memory (Flatten, Reshape, Split, a one-bottom Concat/Slice) the top is a view
of the bottom's data and diff, set up in `reshape`.
"""

import math

from espresso.errors import NetError, ShapeError
from espresso.layer import Layer, register
from espresso.layers.common import index_blob, share, split3


@register
class SplitLayer(Layer):
    """One blob fed to several readers: tops share the bottom's data; gradients are summed."""

    type = "Split"
    legacy = "SPLIT"
    exact_bottoms = 1
    min_tops = 1

    def reshape(self, bottom, top):
        for blob in top:
            blob.reshape(bottom[0].shape)
            blob.share_data(bottom[0])  # Caffe's ShareData: no copy in forward

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        if len(top) == 1:
            diff[...] = top[0].diff
            return
        self.xp.add(top[0].diff, top[1].diff, out=diff)
        for blob in top[2:]:
            diff += blob.diff


@register
class FlattenLayer(Layer):
    """Merges axes axis..end_axis into one; the top shares the bottom's data and diff.
    Honors flatten_param: axis, end_axis."""

    type = "Flatten"
    param = "flatten_param"
    legacy = "FLATTEN"
    exact_bottoms = exact_tops = 1

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        start = self.canonical_axis(bottom[0], self.p.axis, "flatten_param.axis")
        end = self.canonical_axis(bottom[0], self.p.end_axis, "flatten_param.end_axis")
        if end < start:
            self.fail(f"flatten_param.end_axis ({end}) comes before axis ({start}) for shape {shape}")
        share(top[0], bottom[0], shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:])

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass  # the diff is shared


@register
class ReshapeLayer(Layer):
    """Replaces bottom axes [axis, axis + num_axes) by `shape` (0 copies a dim, one -1 is inferred);
    the top shares the bottom's data and diff. Honors reshape_param: shape, axis, num_axes."""

    type = "Reshape"
    param = "reshape_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        dims = [int(d) for d in self.p.shape.dim]
        if dims.count(-1) > 1 or any(d < -1 for d in dims):
            self.fail(f"reshape_param.shape: dims must be >= -1 with at most one -1, got {dims}")
        if self.p.num_axes < -1:
            self.fail(f"reshape_param.num_axes: must be >= -1, got {self.p.num_axes}")
        self.dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        self.inferred = dims.index(-1) if -1 in dims else None
        self.constant = math.prod(d for d in dims if d > 0)

    def _replaced_range(self, blob):
        """[start, end) of the bottom axes the new shape replaces; a negative axis counts from after
        the last axis (-1 appends), as in Caffe."""
        n, axis, num_axes = blob.num_axes, self.p.axis, self.p.num_axes
        start = axis if axis >= 0 else n + axis + 1
        end = n if num_axes == -1 else start + num_axes
        if not 0 <= start <= end <= n:
            self.fail(f"reshape_param axis {axis} / num_axes {num_axes} out of range for shape {blob.shape}")
        return start, end

    def reshape(self, bottom, top):
        b = bottom[0]
        start, end = self._replaced_range(b)
        shape = list(b.shape[:start]) + self.dims + list(b.shape[end:])
        for i in self.copy_axes:
            if start + i >= b.num_axes:
                self.fail(f"reshape_param.shape: dim {i} is 0 but the bottom {b.shape} has no axis "
                          f"{start + i} to copy")
            shape[start + i] = b.shape[start + i]
        if self.inferred is not None:
            known = math.prod(shape[:start + self.inferred]) * math.prod(shape[start + self.inferred + 1:])
            if known == 0 or b.count % known:
                self.fail(f"bottom count {b.count} (shape {b.shape}) is not divisible by the product "
                          f"{known} of the other dims of {shape}", ShapeError)
            shape[start + self.inferred] = b.count // known
        if math.prod(shape) != b.count:
            self.fail(f"reshape_param.shape gives {shape} ({math.prod(shape)} values) for a bottom of "
                      f"shape {b.shape} ({b.count})", ShapeError)
        share(top[0], b, tuple(shape))

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass  # the diff is shared


@register
class ConcatLayer(Layer):
    """Joins bottoms along one axis; one bottom is passed through (shared).
    Honors concat_param: axis or the legacy concat_dim."""

    type = "Concat"
    param = "concat_param"
    legacy = "CONCAT"
    min_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        if self.p.HasField("axis") and self.p.HasField("concat_dim"):
            self.fail("give concat_param.axis or concat_dim, not both")

    def reshape(self, bottom, top):
        b0 = bottom[0]
        if self.p.HasField("concat_dim"):
            self.axis = self.p.concat_dim
            if self.axis >= b0.num_axes:
                self.fail(f"concat_param.concat_dim {self.axis} out of range for shape {b0.shape}")
        else:
            self.axis = self.canonical_axis(b0, self.p.axis, "concat_param.axis")
        shape = list(b0.shape)
        for k, b in enumerate(bottom[1:], 1):
            rest = [d for j, d in enumerate(b.shape) if j != self.axis]
            if b.num_axes != b0.num_axes or rest != [d for j, d in enumerate(b0.shape) if j != self.axis]:
                self.fail(f"bottom {k} of shape {b.shape} does not match bottom 0 of shape {b0.shape} "
                          f"except along axis {self.axis}", ShapeError)
            shape[self.axis] += b.shape[self.axis]
        if len(bottom) == 1:
            share(top[0], b0, tuple(shape))
        else:
            top[0].reshape(shape)

    def forward(self, bottom, top):
        if len(bottom) == 1:
            return
        y, offset = split3(top[0].data, self.axis), 0
        for b in bottom:
            n = b.shape[self.axis]
            y[:, offset:offset + n] = split3(b.data, self.axis)
            offset += n

    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        dy, offset = split3(top[0].diff, self.axis), 0
        for b, down in zip(bottom, propagate_down, strict=True):
            n = b.shape[self.axis]
            if down:
                split3(b.diff, self.axis)[...] = dy[:, offset:offset + n]
            offset += n


@register
class SliceLayer(Layer):
    """Cuts the bottom along one axis at slice_point (or into equal parts); one top is shared.
    Honors slice_param: axis or the legacy slice_dim, slice_point."""

    type = "Slice"
    param = "slice_param"
    legacy = "SLICE"
    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom, top):
        if self.p.HasField("axis") and self.p.HasField("slice_dim"):
            self.fail("give slice_param.axis or slice_dim, not both")
        points = list(self.p.slice_point)
        if points and len(points) != len(top) - 1:
            self.fail(f"slice_param.slice_point: needs {len(top) - 1} values (one fewer than the tops), "
                      f"got {len(points)}")
        if any(b <= a for a, b in zip([0] + points, points, strict=False)):
            self.fail(f"slice_param.slice_point: must be > 0 and strictly increasing, got {points}")

    def _axis(self, blob):
        if self.p.HasField("slice_dim"):
            if self.p.slice_dim >= blob.num_axes:
                self.fail(f"slice_param.slice_dim {self.p.slice_dim} out of range for shape {blob.shape}")
            return self.p.slice_dim
        return self.canonical_axis(blob, self.p.axis, "slice_param.axis")

    def _sizes(self, dim, n_tops):
        points = list(self.p.slice_point)
        if points:
            if n_tops > dim or points[-1] > dim:
                self.fail(f"slice_param.slice_point {points} out of range for {n_tops} tops from an axis "
                          f"of size {dim}", ShapeError)
            return [b - a for a, b in zip([0] + points, points + [dim], strict=True)]
        if dim % n_tops:
            self.fail(f"{n_tops} tops do not evenly divide the slice axis of size {dim}", ShapeError)
        return [dim // n_tops] * n_tops

    def reshape(self, bottom, top):
        self.axis = self._axis(bottom[0])
        shape = list(bottom[0].shape)
        for t, size in zip(top, self._sizes(shape[self.axis], len(top)), strict=True):
            shape[self.axis] = size
            t.reshape(shape)
        if len(top) == 1:
            share(top[0], bottom[0], tuple(shape))

    def forward(self, bottom, top):
        if len(top) == 1:
            return
        x, offset = split3(bottom[0].data, self.axis), 0
        for t in top:
            n = t.shape[self.axis]
            split3(t.data, self.axis)[...] = x[:, offset:offset + n]
            offset += n

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or len(top) == 1:
            return
        dx, offset = split3(bottom[0].diff, self.axis), 0
        for t in top:
            n = t.shape[self.axis]
            dx[:, offset:offset + n] = split3(t.diff, self.axis)
            offset += n


@register
class TileLayer(Layer):
    """Repeats the block of axes axis.. `tiles` times along `axis`. Honors tile_param: axis, tiles."""

    type = "Tile"
    param = "tile_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        if not self.p.HasField("tiles") or self.p.tiles <= 0:
            self.fail(f"tile_param.tiles: must be given and > 0, got {self.p.tiles}")

    def reshape(self, bottom, top):
        axis = self.canonical_axis(bottom[0], self.p.axis, "tile_param.axis")
        shape = list(bottom[0].shape)
        shape[axis] *= self.p.tiles
        top[0].reshape(shape)
        self.outer, self.inner = bottom[0].count_range(0, axis), bottom[0].count_range(axis)

    def forward(self, bottom, top):
        # top (outer, tiles, inner) = bottom (outer, 1, inner), broadcast
        y = top[0].data.reshape(self.outer, self.p.tiles, self.inner)
        y[...] = bottom[0].data.reshape(self.outer, 1, self.inner)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.p.tiles, self.inner)
            self.xp.sum(dy, axis=1, out=bottom[0].diff.reshape(self.outer, self.inner))


@register
class SilenceLayer(Layer):
    """Consumes blobs so they are not net outputs; backward zeroes their diffs."""

    type = "Silence"
    legacy = "SILENCE"
    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for blob, down in zip(bottom, propagate_down, strict=True):
            if down:
                blob.diff[...] = 0


@register
class BatchReindexLayer(Layer):
    """top[i] = bottom0[int(bottom1[i])]: gathers items of the batch; no gradient to the indices.
    An index >= the batch size is an error on the CPU; negative ones are not checked."""

    type = "BatchReindex"
    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom, top):
        self.index = index_blob(self.backend)

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            self.fail(f"bottom 1 (the indices) must be 1-D, got shape {bottom[1].shape}", ShapeError)
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])
        self.index.reshape(bottom[1].count)

    def _indices(self, bottom):
        index = self.index.data
        index[...] = bottom[1].data  # float -> int
        return index

    def forward(self, bottom, top):
        try:
            self.xp.take(bottom[0].data, self._indices(bottom), axis=0, out=top[0].data)
        except IndexError as e:
            self.fail(f"index out of range for a batch of {bottom[0].shape[0]}: {e}", ShapeError)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to its indices (bottom 1)", NetError)
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            self.xp.add.at(dx, self._indices(bottom), top[0].diff)  # repeated indices accumulate


@register
class FilterLayer(Layer):
    """Keeps the items (along axis 0) whose selector (the last bottom, shape (N, 1, ...)) is nonzero,
    one top per data bottom; backward scatters and zeroes the rest. The kept count depends on the
    data, so forward (not reshape) sizes the tops: the one layer that reshapes, and on a GPU
    synchronizes, inside forward. Before the first forward the tops have the full batch, as Caffe's."""

    type = "Filter"
    min_bottoms = 2
    min_tops = 1

    def setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            self.fail(f"needs one top per data bottom ({len(bottom) - 1}), got {len(top)}", NetError)
        self.selector_index = len(bottom) - 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != self.selector_index

    def reshape(self, bottom, top):
        selector = bottom[-1]
        if any(d != 1 for d in selector.shape[1:]):
            self.fail(f"the selector (last bottom) must have shape (N, 1, ...), got {selector.shape}",
                      ShapeError)
        for k, (t, b) in enumerate(zip(top, bottom, strict=False)):  # the selector has no top
            if b.shape[:1] != selector.shape[:1]:
                self.fail(f"bottom {k} of shape {b.shape} and the selector of shape {selector.shape} "
                          "differ in their first dimension", ShapeError)
            t.reshape(b.shape)

    def forward(self, bottom, top):
        self.selected = self.xp.nonzero(bottom[-1].data.reshape(-1))[0]
        n = self.selected.shape[0]
        for t, b in zip(top, bottom, strict=False):
            t.reshape((n,) + b.shape[1:])
            self.xp.take(b.data, self.selected, axis=0, out=t.data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            self.fail("cannot backpropagate to its selector (last bottom)", NetError)
        for t, b, down in zip(top, bottom, propagate_down, strict=False):
            if down:
                dx = b.diff
                dx[...] = 0
                dx[self.selected] = t.diff
