"""Make a photo look like Fashion-MNIST before LeNet sees it.

Fashion-MNIST's items were made from product photos on white (Xiao, Rasul and Vollgraf 2017,
section 2): trimmed to the product, the longest edge resized to 28, sharpened, centred on a 28x28
canvas, negated.  So a garment is bright on an exact black background, its longer side spans all
28 pixels, and (the data show) its brightest pixel is 255.  `to_input` repeats those steps on an
ordinary photo, less the sharpening (an unsharp mask took accuracy on the photos of
benchmarks/demo_preprocess.py from 0.870 to 0.860); `plain_input` is the naive baseline (grey,
squashed to 28x28).  Both return what the LeNet deploy net takes: (1, H, W) float32 pixels / 256,
the scale LeNet was trained with.
"""

import numpy as np
from PIL import Image

WORK = 256  # the longer side a photo is reduced to before it is analysed: plenty for a 28-pixel result
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as PIL's convert("L")


def plain_input(image, size=(28, 28)):
    """The baseline: `image` grey and resized to size = (height, width), nothing else."""
    grey = Image.fromarray(_grey(_array(image)))
    return np.clip(np.asarray(grey.resize(size[::-1], Image.BILINEAR)), 0, 255)[None] / 256


def to_input(image, size=(28, 28)):
    """`image` (a PIL image, or an HxW or HxWxC uint8 array: grey, grey + alpha, RGB or RGBA) as a
    Fashion-MNIST-like (1, height, width) float32 input in [0, 1): the object bright on black,
    cropped to it, its longer side filling size = (height, width), centred."""
    grey = _reduce(_grey(_array(image)))
    level, noise = _background(grey)
    signal = grey - level
    if _object_is_darker(signal, noise):  # a product on a light table: negate it, as Fashion-MNIST did
        signal = -signal
    signal = np.maximum(signal, 0)
    top, bottom, left, right = _bbox(_object_mask(signal, noise))
    crop = np.maximum(signal[top:bottom, left:right] - 2 * noise, 0)  # the table's grain becomes exact black
    return _fit(crop, size)[None] / 256


def _array(image):
    """`image` as an array; PIL modes other than L, LA, RGB and RGBA (palette, 16-bit, CMYK...) via RGBA."""
    if isinstance(image, Image.Image) and image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA")
    a = np.asarray(image)
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"expected an HxW or HxWxC image, got an array of shape {a.shape}")
    return a


def _grey(a):
    """The luma (float32) of an HxW, HxWx1, HxWx2 (grey + alpha), HxWx3 or HxWx4 array, only every
    step-th pixel of a large one; transparent pixels count as white, the product photos' background."""
    a = a[..., None] if a.ndim == 2 else a
    step = max(1, max(a.shape[:2]) // (2 * WORK))  # a 12 MP photo is 36 MB: read no more than _reduce keeps
    a = a[::step, ::step].astype(np.float32)
    grey = a[..., :3] @ LUMA if a.shape[2] >= 3 else a[..., 0]
    if a.shape[2] in (2, 4):
        alpha = a[..., -1] / 255
        grey = grey * alpha + 255 * (1 - alpha)
    return grey


def _reduce(grey):
    """`grey` shrunk by block means until its longer side is at most about WORK."""
    k = min(-(-max(grey.shape) // WORK), min(grey.shape))
    h, w = grey.shape[0] // k * k, grey.shape[1] // k * k
    return grey[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def _background(grey):
    """(level, noise): the table as a plane (light falls off across a photo) fitted to the border
    pixels, leaving out those of the object where it touches the border; and the border's robust
    spread around that plane, at least 1 grey level."""
    h, w = grey.shape
    ring = np.ones((h, w), bool)
    ring[1:-1, 1:-1] = False
    ys, xs = np.nonzero(ring)
    basis = np.stack([np.ones(ys.size), ys / h, xs / w], axis=1)
    values = grey[ring]
    # start from the border's commonest shade (bins of 8 levels), the table's even where the object
    # covers half the border (Fashion-MNIST items touch two sides); then refit to what agrees
    counts, edges = np.histogram(values, bins=32, range=(0, 256))
    keep = np.abs(values - edges[np.argmax(counts)] - 4) < 12
    for _ in range(3):
        coef = np.linalg.lstsq(basis[keep], values[keep], rcond=None)[0]
        residual = values - basis @ coef
        noise = max(1.4826 * np.median(np.abs(residual)), 1.0)  # over the whole border: not cut short by `keep`
        keep = np.abs(residual) < 3 * noise
    plane = coef[0] + coef[1] * np.arange(h)[:, None] / h + coef[2] * np.arange(w) / w
    return plane.astype(np.float32), noise


def _object_is_darker(signal, noise):
    """Whether the pixels well away from the table's level are darker than it, on balance."""
    return signal[np.abs(signal) > 4 * noise].sum() < 0


def _object_mask(signal, noise):
    """The object: its clear pixels (above Otsu's threshold), less specks under 3 pixels across,
    and the faint pixels (above 5 x noise) joined to them, so that a pale sleeve or a thin strap
    counts and a blotch on the table apart from the object does not."""
    faint = signal > 5 * noise
    clear = faint & (signal > _otsu(signal))
    opened = _spread(~_spread(~clear)) & clear  # an opening with a 3x3 cross
    return _grow(opened if opened.any() else clear, faint)


def _otsu(values):
    """Otsu's threshold: the level splitting `values` into two classes of greatest between-class variance."""
    counts, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    below, below_sum = np.cumsum(counts)[:-1], np.cumsum(counts * centres)[:-1]  # per candidate split
    n, total = counts.sum(), (counts * centres).sum()
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 where a class is empty
        between = (below_sum * n - below * total) ** 2 / (below * (n - below))
    return edges[1:-1][np.nanargmax(between)] if np.isfinite(between).any() else edges[-1]


def _spread(region):
    """`region` and its 4-neighbours."""
    out = region.copy()
    out[1:] |= region[:-1]
    out[:-1] |= region[1:]
    out[:, 1:] |= region[:, :-1]
    out[:, :-1] |= region[:, 1:]
    return out


def _grow(region, allowed):
    """`region` grown through 4-neighbours inside `allowed` until it stops changing."""
    region = region & allowed
    while True:
        grown = _spread(region) & allowed
        if np.array_equal(grown, region):
            return region
        region = grown


def _bbox(mask):
    """(top, bottom, left, right) of `mask`, or of the whole image when `mask` is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _fit(crop, size):
    """`crop` resized so that its longer side fills size = (height, width), centred on black, its
    brightest pixel stretched to 255."""
    (h, w), (height, width) = crop.shape, size
    scale = min(height / h, width / w)
    nh, nw = min(max(round(h * scale), 1), height), min(max(round(w * scale), 1), width)
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.LANCZOS))
    out = np.zeros(size, np.float32)
    top, left = (height - nh + 1) // 2, (width - nw + 1) // 2  # an odd pixel left over goes first, as Fashion-MNIST's
    out[top:top + nh, left:left + nw] = np.maximum(small, 0)  # Lanczos rings below zero at edges
    peak = out.max()
    return np.minimum(out * (255 / peak), 255) if peak > 0 else out
