"""Layers Espresso adds for ONNX ops that Caffe has no layer for: Permute (SSD Caffe's name and
field number), Pad and Upsample.  Their parameters are Espresso's fields of LayerParameter
(caffe.proto), which real Caffe does not know: a net using them runs in Espresso only.

Pad (reflect, edge) and Upsample move values along an axis by a fixed (output x input) matrix:
forward gathers (or, bilinear, multiplies), backward multiplies by the transpose, which sums
the gradients of every output a value went to.
"""

import numpy as np

from espresso.layer import Layer, register


@register
class PermuteLayer(Layer):
    """Top axis i is bottom axis order[i] (ONNX's Transpose).  Honors permute_param.order;
    axes not listed keep their order after the listed ones, as in SSD Caffe."""

    type = "Permute"
    param = "permute_param"
    exact_bottoms = exact_tops = 1

    def reshape(self, bottom, top):
        rank, order = bottom[0].num_axes, list(self.p.order)
        if len(set(order)) != len(order) or any(a >= rank for a in order):
            self.fail(f"permute_param.order {order}: each axis of the rank-{rank} bottom at most once")
        self.order = order + [a for a in range(rank) if a not in order]
        self.inverse = list(np.argsort(self.order))
        top[0].reshape([bottom[0].shape[a] for a in self.order])

    def forward(self, bottom, top):
        top[0].data[...] = self.xp.transpose(bottom[0].data, self.order)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.xp.transpose(top[0].diff, self.inverse)


def _one_hot(sources, size):
    """The (len(sources) x size) matrix that picks input sources[i] for output i."""
    matrix = np.zeros((len(sources), size))
    matrix[np.arange(len(sources)), sources] = 1
    return matrix


class _AxisMaps(Layer):
    """A layer whose output along some axes is a fixed matrix times its input along them."""

    def set_maps(self, maps):
        """maps: {axis: (source indices or None, matrix)}; the matrix is (out x in)."""
        self.maps = {axis: (None if index is None else self.backend.to_device(index.astype(np.int64)),
                            self.backend.to_device(matrix, self.dtype)) for axis, (index, matrix) in maps.items()}

    def apply(self, x, out):
        for axis, (index, matrix) in self.maps.items():
            if index is not None:
                x = self.xp.take(x, index, axis=axis)
            else:
                x = self.xp.moveaxis(self.xp.moveaxis(x, axis, -1) @ matrix.T, -1, axis)
        out[...] = x

    def apply_transposed(self, g, out):
        for axis, (_, matrix) in reversed(self.maps.items()):
            g = self.xp.moveaxis(self.xp.moveaxis(g, axis, -1) @ matrix, -1, axis)
        out[...] = g


@register
class PadLayer(_AxisMaps):
    """Pads every axis (ONNX's Pad).  Honors pad_param: pad ([begins..., ends...], one pair per
    axis), value (constant mode) and mode: constant, reflect (mirrored, the edge not repeated)
    or edge (the edge value repeated)."""

    type = "Pad"
    param = "pad_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        if self.p.mode not in ("constant", "reflect", "edge"):
            self.fail(f"pad_param.mode '{self.p.mode}': constant, reflect or edge")
        if len(self.p.pad) != 2 * bottom[0].num_axes:
            self.fail(f"pad_param.pad: {2 * bottom[0].num_axes} values for a rank-{bottom[0].num_axes} bottom, "
                      f"got {len(self.p.pad)}")

    def reshape(self, bottom, top):
        rank, shape = bottom[0].num_axes, bottom[0].shape
        begins, ends = list(self.p.pad[:rank]), list(self.p.pad[rank:])
        if self.p.mode == "reflect" and any(max(b, e) >= n for b, e, n in zip(begins, ends, shape) if b or e):
            self.fail(f"pad_param.pad {list(self.p.pad)}: reflect pads must be smaller than the axis {shape}")
        top[0].reshape([n + b + e for n, b, e in zip(shape, begins, ends)])
        self.inside = tuple(slice(b, b + n) for b, n in zip(begins, shape))
        if self.p.mode != "constant":
            indices = {axis: np.pad(np.arange(n), (b, e), mode=self.p.mode)  # numpy's modes are ONNX's
                       for axis, (b, e, n) in enumerate(zip(begins, ends, shape)) if b or e}
            self.set_maps({axis: (index, _one_hot(index, shape[axis])) for axis, index in indices.items()})

    def forward(self, bottom, top):
        if self.p.mode == "constant":
            top[0].data.fill(self.p.value)
            top[0].data[self.inside] = bottom[0].data
        else:
            self.apply(bottom[0].data, top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.p.mode == "constant":
            bottom[0].diff[...] = top[0].diff[self.inside]
        else:
            self.apply_transposed(top[0].diff, bottom[0].diff)


@register
class UpsampleLayer(_AxisMaps):
    """Resizes the last two axes (ONNX's Resize and Upsample).  Honors upsample_param: height,
    width, mode (nearest: asymmetric coordinates, rounded down; linear: bilinear, half-pixel
    or align_corners coordinates), scale_h and scale_w (the scales ONNX gave, else out / in)."""

    type = "Upsample"
    param = "upsample_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        if self.p.mode not in ("nearest", "linear"):
            self.fail(f"upsample_param.mode '{self.p.mode}': nearest or linear")
        if self.p.height <= 0 or self.p.width <= 0 or bottom[0].num_axes < 2:
            self.fail("upsample_param: height and width must be > 0, the bottom of rank 2 or more")

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        top[0].reshape(shape[:-2] + (self.p.height, self.p.width))
        rank = len(shape)
        sizes = ((shape[-2], self.p.height, self.p.scale_h), (shape[-1], self.p.width, self.p.scale_w))
        self.set_maps({rank - 2 + i: self._map(n_in, n_out, scale) for i, (n_in, n_out, scale) in enumerate(sizes)})

    def _map(self, n_in, n_out, scale):
        dst, scale = np.arange(n_out, dtype=np.float64), scale or n_out / n_in
        if self.p.mode == "nearest":
            index = np.minimum(np.floor(dst / scale).astype(np.int64), n_in - 1)
            return index, _one_hot(index, n_in)
        if self.p.align_corners:
            src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
        else:
            src = (dst + 0.5) / scale - 0.5
        src = np.clip(src, 0, n_in - 1)
        low = np.floor(src).astype(np.int64)
        high, frac = np.minimum(low + 1, n_in - 1), src - low
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
        np.add.at(matrix, (np.arange(n_out), high), frac)
        return None, matrix

    def forward(self, bottom, top):
        self.apply(bottom[0].data, top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.apply_transposed(top[0].diff, bottom[0].diff)
