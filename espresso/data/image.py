"""Image files and encoded Datums as Caffe's OpenCV helpers see them (util/io.cpp), via Pillow.

Caffe's arrays are OpenCV's: colour images are BGR, uint8, laid out C x H x W in a Datum.
Differences, deliberate: decoding is Pillow's (JPEG decoders and the colour-to-grey rounding
may differ from OpenCV's by one grey level); resizing is bilinear with half-pixel centres and
edge clamping, OpenCV's INTER_LINEAR rule, computed in floating point and rounded.
"""

import io

import numpy as np

from espresso.data import DatasetError, require
from espresso.proto.text import require_regular


def _image_module():
    return require("PIL.Image", "reading images")


def _to_chw(im, color):
    """A PIL image -> uint8 C x H x W; color True: 3 channels BGR, False: 1 grey, None: as stored."""
    if color is None:
        color = im.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    im = im.convert("RGB" if color else "L")
    hwc = np.asarray(im, dtype=np.uint8)
    if color:
        return np.ascontiguousarray(hwc[:, :, ::-1].transpose(2, 0, 1))  # RGB -> BGR, as OpenCV
    return hwc[np.newaxis].copy()


def decode_image(data, color=None, what="image"):
    """Compressed image bytes (PNG, JPEG, ...) -> uint8 C x H x W (Caffe's DecodeDatumToCVMat)."""
    Image = _image_module()
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _to_chw(im, color)
    except Exception as e:  # Pillow raises OSError, SyntaxError, EOFError, struct.error... on damaged data
        raise DatasetError(f"{what}: cannot decode image: {type(e).__name__}: {e}") from None


def read_image(path, height=0, width=0, is_color=True):
    """Caffe's ReadImageToCVMat: the file as uint8 C x H x W (BGR when is_color), resized to
    height x width when both are > 0."""
    Image = _image_module()
    require_regular(path, DatasetError)
    try:
        with Image.open(path) as im:
            chw = _to_chw(im, bool(is_color))
    except Exception as e:  # (as decode_image)
        raise DatasetError(f"could not load image {path}: {type(e).__name__}: {e}") from None
    if height > 0 and width > 0 and chw.shape[1:] != (height, width):
        chw = resize(chw, height, width)
    return chw


def resize(chw, height, width):
    """OpenCV's INTER_LINEAR resize of a uint8 C x H x W image, rounded back to uint8."""
    out = _resize_axis(chw.astype(np.float64), height, 1)
    out = _resize_axis(out, width, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize_axis(im, n_out, axis):
    """Linear interpolation along `axis` at half-pixel centres, clamped at the edges."""
    n_in = im.shape[axis]
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).reshape((-1,) + (1,) * (im.ndim - axis - 1))  # broadcast along `axis`
    return np.take(im, lo, axis=axis) * (1 - w) + np.take(im, hi, axis=axis) * w


def encode_image(chw, fmt):
    """uint8 C x H x W (BGR or grey) -> compressed bytes in format `fmt` ('png', 'jpg', ...)."""
    Image = _image_module()
    hwc = chw.transpose(1, 2, 0)
    im = Image.fromarray(np.ascontiguousarray(hwc[:, :, ::-1]) if hwc.shape[2] == 3 else hwc[:, :, 0])
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG"}.get(fmt.lower(), fmt.upper()))
    return buf.getvalue()


def read_image_list(path, keep_blank=False):
    """[(file name, label)] from a Caffe image list: one "<file> <label>" per line, the label
    after the last space (so names may contain spaces); blank lines are skipped, or with
    keep_blank kept as ("", 0), an entry no image answers (convert_imageset's keys count it)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image list: {e.strerror}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            if keep_blank:
                entries.append(("", 0))
            continue
        name, _, label = line.rstrip().rpartition(" ")
        try:
            entries.append((name, int(label)))
        except ValueError:
            raise DatasetError(f"{path}:{number}: expected '<file> <integer label>', got {line!r}") from None
    if not any(name for name, _ in entries):
        raise DatasetError(f"{path}: the image list is empty")
    return entries
