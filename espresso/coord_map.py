"""pycaffe's coord_map: how coordinates of one NetSpec top relate to another's, for FCN's `crop`.

A layer's map is (axis, a, b): input coordinate x lands at a * x + b in its output, along the
axes from `axis` on (None: any axis).  Convolution-like layers give
(1/stride, (pad - (k_eff - 1)/2) / stride), with the effective kernel
k_eff = (k - 1) * dilation + 1; Deconvolution the inverse, (stride, (k_eff - 1)/2 - pad);
Crop (1, -offset); element-wise layers the identity (None, 1, 0).  `crop(a, b)` walks both
tops back to a common ancestor, composes the maps, and returns the L.Crop that aligns a to b.
"""

import numpy as np

from espresso.net_spec import layers as L

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN", "Exp",
                       "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH", "Threshold"]
IDENTITY = (None, 1, 0)


class UndefinedMapException(Exception):
    """The layer's output coordinates have no fixed relation to its input's."""


class AxisMismatchException(Exception):
    """Two maps act on different axes."""


def conv_params(fn):
    """(axis, stride, effective kernel, pad) of a Convolution, Deconvolution, Im2col or Pooling
    NetSpec function, as arrays (one value or one per spatial axis)."""
    params = fn.params.get("convolution_param", fn.params)
    if {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"} & set(params):
        raise AssertionError("cropping does not support legacy _h/_w params")
    kernel = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (params.get("axis", 1), np.array(params.get("stride", 1), ndmin=1),
            (kernel - 1) * dilation + 1, np.array(params.get("pad", 0), ndmin=1))


def crop_params(fn):
    """(axis, offsets) of a Crop NetSpec function, with Caffe's defaults (axis 2, offset 0)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn):
    """The (axis, scale, shift) of one NetSpec function; UndefinedMapException when it has none."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return IDENTITY
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the axis before the first cropped one, as the others count
    raise UndefinedMapException(fn.type_name)


def compose(base_map, next_map):
    """base_map followed by next_map: scales multiply, next's shift is scaled by base's scale."""
    (ax1, a1, b1), (ax2, a2, b2) = base_map, next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"axis {ax1} against axis {ax2}")
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map back: scale 1/a, shift -b/a."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _mappable_bottoms(top):
    """The inputs a top's coordinates come from (Crop's second input only gives the size)."""
    inputs = top.fn.inputs
    return inputs[:1] if top.fn.type_name == "Crop" else inputs


def _walk(start, visit):
    """Maps from `start` to each of its ancestors reached through mappable layers (depth first;
    Caffe pops a set, in no set order: with consistent maps every path gives the same answer);
    visit(top, map) returning a value ends the walk with it."""
    maps, frontier = {start: IDENTITY}, [start]
    while frontier:
        top = frontier.pop()
        found = visit(top, maps[top])
        if found is not None:
            return maps, found
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            maps[bottom] = compose(maps[top], step)
            frontier.append(bottom)
    return maps, None


def coord_map_from_to(top_from, top_to):
    """The (axis, scale, shift) taking top_from's coordinates to top_to's, through their
    nearest common ancestor."""
    from_maps, _ = _walk(top_from, lambda top, m: None)
    _, found = _walk(top_to, lambda top, m: compose(m, inverse(from_maps[top])) if top in from_maps else None)
    if found is None:
        raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")
    return found


def crop(top_from, top_to):
    """An L.Crop of top_from to top_to's size, its offsets from the coordinate map between them."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    if not (np.asarray(a) == 1).all():
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not (np.asarray(b) <= 0).all():
        raise AssertionError(f"cannot crop negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise AssertionError(f"cannot crop noninteger offset (b = {b})")
    return L.Crop(top_from, top_to, crop_param=dict(axis=ax + 1, offset=list(-np.round(b).astype(int))))
