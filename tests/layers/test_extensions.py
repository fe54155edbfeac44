"""Permute, Pad and Upsample (the layers Espresso adds for ONNX ops) against NumPy float64
references, with gradient checks."""

import numpy as np
import pytest

from espresso.errors import LayerParamError
from espresso.testing import LayerRun, check_layer


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_permute_moves_axes_and_sends_gradients_back():
    check_layer('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', [randn(2, 3, 4, 5)],
                reference=lambda b, p: [b[0].transpose(0, 2, 3, 1)], reshape_batch=3)
    check_layer('type: "Permute" permute_param { order: 0 order: 2 }', [randn(2, 3, 4, 5)],  # the rest keep order
                reference=lambda b, p: [b[0].transpose(0, 2, 1, 3)])
    with pytest.raises(LayerParamError, match="each axis of the rank-3 bottom at most once"):
        LayerRun('type: "Permute" permute_param { order: 0 order: 0 order: 1 }', [randn(2, 3, 4)])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_is_numpys_pad(mode):
    pads = [0, 1, 2, 1, 0, 2, 0, 3]  # begins then ends, one per axis
    widths = list(zip(pads[:4], pads[4:]))
    extra = {"constant": "value: -1.5", "reflect": 'mode: "reflect"', "edge": 'mode: "edge"'}[mode]
    expected = {"constant_values": -1.5} if mode == "constant" else {}
    check_layer(f'type: "Pad" pad_param {{ pad: {pads} {extra} }}', [randn(2, 3, 4, 5)],
                reference=lambda b, p: [np.pad(b[0], widths, mode=mode, **expected)], reshape_batch=3)


def test_pad_refuses_what_it_cannot_do():
    with pytest.raises(LayerParamError, match="8 values for a rank-4 bottom, got 2"):
        LayerRun('type: "Pad" pad_param { pad: [1, 1] }', [randn(2, 3, 4, 5)])
    with pytest.raises(LayerParamError, match="reflect pads must be smaller than the axis"):
        LayerRun('type: "Pad" pad_param { pad: [0, 0, 0, 5, 0, 0, 0, 0] mode: "reflect" }', [randn(2, 3, 4, 5)])
    with pytest.raises(LayerParamError, match="constant, reflect or edge"):
        LayerRun('type: "Pad" pad_param { pad: [0, 0, 0, 1, 0, 0, 0, 0] mode: "wrap" }', [randn(2, 3, 4, 5)])


def nearest(x, h, w, scale_h=None, scale_w=None):
    rows = np.minimum((np.arange(h) / (scale_h or h / x.shape[-2])).astype(int), x.shape[-2] - 1)
    cols = np.minimum((np.arange(w) / (scale_w or w / x.shape[-1])).astype(int), x.shape[-1] - 1)
    return x[..., rows[:, None], cols]


def bilinear(x, h, w, align_corners):
    """Per output pixel, the four neighbours weighted, as ONNX's Resize (linear) defines it."""
    H, W = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (h, w))
    for i in range(h):
        for j in range(w):
            if align_corners:
                y, z = i * (H - 1) / max(h - 1, 1), j * (W - 1) / max(w - 1, 1)
            else:
                y, z = (i + 0.5) * H / h - 0.5, (j + 0.5) * W / w - 0.5
            y, z = min(max(y, 0), H - 1), min(max(z, 0), W - 1)
            y0, z0 = int(y), int(z)
            y1, z1 = min(y0 + 1, H - 1), min(z0 + 1, W - 1)
            dy, dz = y - y0, z - z0
            out[..., i, j] = ((1 - dy) * (1 - dz) * x[..., y0, z0] + (1 - dy) * dz * x[..., y0, z1]
                              + dy * (1 - dz) * x[..., y1, z0] + dy * dz * x[..., y1, z1])
    return out


@pytest.mark.parametrize("size", [(8, 10), (7, 3), (4, 5)])
def test_upsample_nearest(size):
    h, w = size
    check_layer(f'type: "Upsample" upsample_param {{ height: {h} width: {w} }}', [randn(2, 3, 4, 5)],
                reference=lambda b, p: [nearest(b[0], h, w)], reshape_batch=1)
    check_layer(f'type: "Upsample" upsample_param {{ height: {h} width: {w} scale_h: 1.9 scale_w: 2.1 }}',
                [randn(1, 2, 4, 5)], reference=lambda b, p: [nearest(b[0], h, w, 1.9, 2.1)])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(8, 10), (7, 3), (1, 1)])
def test_upsample_bilinear(size, align_corners):
    h, w = size
    check_layer(f'type: "Upsample" upsample_param {{ height: {h} width: {w} mode: "linear" '
                f'align_corners: {str(align_corners).lower()} }}', [randn(2, 3, 4, 5)],
                reference=lambda b, p: [bilinear(b[0], h, w, align_corners)], rtol=1e-12, atol=1e-12)


def test_upsample_refuses_bad_parameters():
    with pytest.raises(LayerParamError, match="nearest or linear"):
        LayerRun('type: "Upsample" upsample_param { height: 2 width: 2 mode: "cubic" }', [randn(1, 1, 2, 2)])
    with pytest.raises(LayerParamError, match="height and width must be > 0"):
        LayerRun('type: "Upsample" upsample_param { height: 2 }', [randn(1, 1, 2, 2)])
