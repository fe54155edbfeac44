"""Image files and encoded Datums as Caffe's OpenCV helpers see them (util/io.cpp), via Pillow.

Caffe's arrays are OpenCV's: colour images are BGR, uint8, laid out C x H x W in a Datum.
Differences, deliberate: decoding is Pillow's (JPEG decoders and the colour-to-grey rounding
may differ from OpenCV's by one grey level); resizing is OpenCV's INTER_LINEAR in its own
fixed-point arithmetic.
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
    """OpenCV's cv::resize(INTER_LINEAR) of a uint8 C x H x W image, in its 8-bit fixed point:
    an exact halving averages 2 x 2 blocks (OpenCV's INTER_AREA shortcut); otherwise weights in
    1/2048ths (columns clamped at the edges, rows by clamping the source row), the horizontal
    pass in integers, the vertical one as OpenCV's SIMD path rounds it.  Equal to
    cv2.resize (OpenCV 5.1) array for array (tests/test_data.py)."""
    c, h, w = chw.shape
    if (h, w) == (2 * height, 2 * width):
        s = chw.astype(np.int32)
        return ((s[:, 0::2, 0::2] + s[:, 0::2, 1::2] + s[:, 1::2, 0::2] + s[:, 1::2, 1::2] + 2) >> 2).astype(np.uint8)
    x0, x1, a0, a1 = _linear_weights(w, width, clamp=True)
    y0, y1, b0, b1 = _linear_weights(h, height, clamp=False)
    rows = chw[:, :, x0].astype(np.int64) * a0 + chw[:, :, x1].astype(np.int64) * a1  # C x H x width
    b0, b1 = b0[:, None], b1[:, None]
    out = ((((rows[:, y0] >> 4) * b0) >> 16) + (((rows[:, y1] >> 4) * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def _linear_weights(n_in, n_out, clamp):
    """OpenCV's source indices and fixed-point weights (float32 arithmetic, rounded to 1/2048):
    columns outside the image take the edge with weight 1 (clamp), rows keep their weights and
    read the clamped row."""
    f = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    first = np.floor(f).astype(np.int64)
    f = (f - first.astype(np.float32)).astype(np.float32)
    if clamp:
        outside = (first < 0) | (first >= n_in - 1)
        f[outside] = 0
        first = np.clip(first, 0, n_in - 1)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(f * np.float32(2048)).astype(np.int64)
    return np.clip(first, 0, n_in - 1), np.clip(first + 1, 0, n_in - 1), w0, w1


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
