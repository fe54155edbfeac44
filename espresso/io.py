"""pycaffe's `caffe.io`: arrays <-> BlobProto / Datum, the input Transformer, and image helpers.

Same names, arguments and results as BVLC Caffe 1.0's python/caffe/io.py.  Differences, all
deliberate: errors are EspressoError subclasses (still ValueErrors, so pycaffe's `except
ValueError` keeps working); `resize_image` is NumPy bilinear/nearest with half-pixel centres
and edge clamping for any channel count (pycaffe used skimage or scipy, order 0 and 1 only
here); `load_image` reads with Pillow instead of skimage; `Transformer.preprocess` never
writes into the caller's array.
"""

import numpy as np

from espresso.errors import EspressoError, ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import read_binary
from espresso.proto.weights import blob_array


class ArrayShapeError(EspressoError, ValueError):
    """An array has the wrong number of axes or size for the conversion asked of it."""


class TransformerError(EspressoError, ValueError):
    """A Transformer was given an unknown input or a setting whose shape does not fit it."""


# *** proto / datum / ndarray conversion ***
def blobproto_to_array(blob, return_diff=False):
    """The data (or diff) of a BlobProto as a float64 array of the blob's shape.

    Old files carry num/channels/height/width instead of `shape`; as in Caffe, those win.
    """
    try:
        with np.errstate(invalid="ignore"):  # a signalling NaN stays a NaN
            return blob_array(blob, "BlobProto", return_diff).astype(np.float64)
    except ModelFileError as e:  # pycaffe's callers catch ValueError
        raise ArrayShapeError(str(e)) from None


def array_to_blobproto(arr, diff=None):
    """A BlobProto with `shape` = arr.shape and float data (and diff, if given)."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(np.float64).ravel().tolist())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise ArrayShapeError(f"diff shape {diff.shape} differs from data shape {arr.shape}")
        blob.diff.extend(diff.astype(np.float64).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    """A list of arrays serialized as one BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vec.SerializeToString()


# pycaffe before 1.0 spelled it this way; old scripts still call it.
arraylist_to_blobprotovecor_str = arraylist_to_blobprotovector_str


def blobprotovector_str_to_arraylist(data):
    """The arrays of a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label=None):
    """A Datum from a C x H x W array: uint8 goes to `data` (bytes), anything else to `float_data`."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ArrayShapeError(f"Incorrect array shape: a Datum needs C x H x W, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float64).ravel().tolist())
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum):
    """A Datum's values as C x H x W: uint8 from `data`, else float64 from `float_data` (no label)."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data, dtype=np.float64).reshape(shape)


def read_blobproto(path, return_diff=False):
    """The array stored in a .binaryproto file (e.g. a mean image), of the blob's own shape."""
    with np.errstate(invalid="ignore"):  # a signalling NaN in the file stays a NaN
        return blob_array(read_binary(path, caffe_pb2.BlobProto()), path, return_diff).astype(np.float64)


def load_mean(path):
    """A .binaryproto mean file as the C x H x W array Transformer.set_mean expects.

    Caffe's compute_image_mean writes a 1 x C x H x W blob; the leading 1 is dropped.
    """
    mean = read_blobproto(path)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    return mean


# *** pre-processing ***
class Transformer:
    """Turns H x W x K images into a net input blob's K x H x W layout, and back.

    `inputs` maps each input blob name to its shape (N, K, H, W), e.g.
    `{name: net.blobs[name].data.shape for name in net.inputs}`.
    """

    def __init__(self, inputs):
        self.inputs = {name: tuple(shape) for name, shape in inputs.items()}
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _check_input(self, in_):
        if in_ not in self.inputs:
            raise TransformerError(f"{in_} is not one of the net inputs: {sorted(self.inputs)}")

    def preprocess(self, in_, data):
        """H' x W' x K image -> K x H x W float32 input, in pycaffe's order: resize to the
        input's H x W, transpose, channel swap, * raw_scale, - mean, * input_scale."""
        self._check_input(in_)
        out = np.array(data, dtype=np.float32)  # a copy: the steps below work in place
        in_dims = self.inputs[in_][2:]
        if out.shape[:2] != in_dims:
            out = resize_image(out, in_dims)
        if in_ in self.transpose:
            out = out.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            out = out[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            out *= self.raw_scale[in_]
        if in_ in self.mean:
            out -= self.mean[in_]
        if in_ in self.input_scale:
            out *= self.input_scale[in_]
        return out

    def deprocess(self, in_, data):
        """Undo preprocess (except the resize); singleton axes of `data` are squeezed first."""
        self._check_input(in_)
        out = np.array(data).squeeze()
        if in_ in self.input_scale:
            out /= self.input_scale[in_]
        if in_ in self.mean:
            out += self.mean[in_]
        if in_ in self.raw_scale:
            out /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            out = out[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            out = out.transpose(np.argsort(self.transpose[in_]))
        return out

    def set_transpose(self, in_, order):
        """Axis order taking the H x W x K image to K x H x W, usually (2, 0, 1)."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise TransformerError("Transpose order needs to have the same number of dimensions as the "
                                   f"input: got {len(order)} axes for input shape {self.inputs[in_]}")
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """Channel order applied after the transpose, e.g. (2, 1, 0) for RGB -> BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise TransformerError("Channel swap needs to have the same number of dimensions as the input "
                                   f"channels: got {len(order)} for {self.inputs[in_][1]} channels")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Scale applied before the mean: 255 for models trained on [0, 255] images."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """Mean to subtract: per channel (shape (K,)) or elementwise (K x H x W, or H x W for K = 1)."""
        self._check_input(in_)
        mean = np.asarray(mean)
        shape = self.inputs[in_]
        if mean.ndim == 1:
            if mean.shape[0] != shape[1]:
                raise TransformerError(f"Mean channels incompatible with input: {mean.shape[0]} values "
                                       f"for {shape[1]} channels")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            mean = mean[np.newaxis] if mean.ndim == 2 else mean
            if mean.ndim != 3:
                raise TransformerError(f"Mean shape invalid: {mean.shape} (give K, K x H x W or H x W)")
            if mean.shape[0] != shape[1]:
                raise TransformerError(f"Mean shape incompatible with input shape: {mean.shape} vs {shape[1:]}")
            if mean.shape != shape[1:]:  # Caffe resizes an image mean to the input (e.g. 256 -> 227)
                mean = _resize_mean(mean, shape[2:])
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        """Scale applied last, after the mean (raw_scale comes before it)."""
        self._check_input(in_)
        self.input_scale[in_] = scale


# *** image IO ***
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise EspressoError("espresso.io.load_image needs Pillow: pip install espresso-nn[image]") from None
    return Image


# Pillow mode -> (mode to convert to, divisor taking its integers to [0, 1]) as skimage's img_as_float
_MODES = {"1": ("L", 255.0), "L": ("L", 255.0), "RGB": ("RGB", 255.0), "RGBA": ("RGBA", 255.0),
          "LA": ("L", 255.0), "P": ("RGBA", 255.0), "CMYK": ("RGB", 255.0), "YCbCr": ("RGB", 255.0),
          "I;16": (None, 65535.0), "I;16B": (None, 65535.0), "I;16L": (None, 65535.0),
          "I": (None, 65535.0), "F": (None, 1.0)}


def load_image(filename, color=True):
    """An image file as float32 H x W x 3 (RGB) in [0, 1]; with `color` False, H x W x 1 grey, a
    colour image made grey as scikit-image's rgb2gray does for Caffe (0.2125 R + 0.7154 G +
    0.0721 B).  An alpha channel is dropped.  16-bit images are scaled by 1/65535."""
    Image = _pil()
    with Image.open(filename) as im:
        target, divisor = _MODES.get(im.mode, ("RGB", 255.0))
        if target is not None and target != im.mode:
            im = im.convert(target)
        img = np.asarray(im, dtype=np.float32) / np.float32(divisor)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if not color and img.shape[2] == 3:
        img = (img @ np.array([0.2125, 0.7154, 0.0721], np.float32))[:, :, np.newaxis]
    return np.ascontiguousarray(img)


def _resize_mean(mean, dims):
    """A K x H x W mean resized to dims as Caffe's set_mean does it: scaled to [0, 1], resized,
    scaled back (a constant mean stays constant; Caffe's would divide by zero)."""
    low, high = mean.min(), mean.max()
    if high == low:
        return np.full((mean.shape[0], *dims), low, np.float64)
    unit = resize_image(((mean - low) / (high - low)).transpose(1, 2, 0), dims)
    return unit.transpose(2, 0, 1) * (high - low) + low


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError:
        raise EspressoError("resize_image needs SciPy: pip install espresso-nn[image]") from None
    return ndimage


def resize_image(im, new_dims, interp_order=1):
    """Caffe's resize_image: H x W x K -> new_dims[0] x new_dims[1] x K float32, by spline
    interpolation of order 0 (nearest) to 5.  As Caffe's: an image of 1 or 3 channels is scaled
    to [0, 1] and resized as scikit-image's resize(mode='constant') does (Gaussian smoothing
    first along axes that shrink; outside the image counts as the minimum; the result clipped to
    the input's range), a constant image stays constant; any other channel count goes through
    SciPy's zoom with its defaults."""
    im, (new_h, new_w) = np.asarray(im), (int(d) for d in new_dims)
    if interp_order not in range(6):
        raise EspressoError(f"resize_image: interp_order must be 0 to 5, got {interp_order}")
    if im.ndim != 3 or new_h < 1 or new_w < 1 or min(im.shape) < 1:
        raise ArrayShapeError(f"resize_image: cannot resize shape {im.shape} to {tuple(new_dims)}")
    ndimage = _ndimage()
    if im.shape[-1] not in (1, 3):
        scale = (new_h / im.shape[0], new_w / im.shape[1], 1)
        return ndimage.zoom(im, scale, order=interp_order).astype(np.float32)
    low, high = im.min(), im.max()
    if high <= low:
        return np.full((new_h, new_w, im.shape[-1]), low, np.float32)
    unit = (im - low) / (high - low)
    if unit.dtype == np.float16:
        unit = unit.astype(np.float32)
    factors = np.array(unit.shape, float) / (new_h, new_w, unit.shape[-1])
    if (factors > 1).any():  # scikit-image's anti-aliasing when any axis shrinks
        unit = ndimage.gaussian_filter(unit, np.maximum(0, (factors - 1) / 2), mode="grid-constant")
    out = ndimage.zoom(unit, 1 / factors, order=interp_order, mode="grid-constant", grid_mode=True)
    return (np.clip(out, 0, 1) * (high - low) + low).astype(np.float32)


def _crop_corners(im_hw, crop_hw):
    """(top, left) of pycaffe's 5 crops: the four corners row by row, then the centre."""
    (h, w), (ch, cw) = im_hw, crop_hw
    corners = [(i, j) for i in (0, h - ch) for j in (0, w - cw)]
    return corners + [((h - ch) // 2, (w - cw) // 2)]


def oversample(images, crop_dims):
    """10 crops per H x W x K image: 4 corners and centre, then the same 5 mirrored left-right.

    Returns float32 (10 * N) x crop_h x crop_w x K, image by image.
    """
    images = [np.asarray(im) for im in images]
    ch, cw = (int(d) for d in crop_dims)
    h, w, k = images[0].shape
    if ch > h or cw > w:
        raise ArrayShapeError(f"oversample: crop {ch} x {cw} is larger than the image {h} x {w}")
    crops = np.empty((10 * len(images), ch, cw, k), dtype=np.float32)
    for n, im in enumerate(images):
        if im.shape != (h, w, k):
            raise ArrayShapeError(f"oversample: image {n} has shape {im.shape}, image 0 has {(h, w, k)}")
        for c, (i, j) in enumerate(_crop_corners((h, w), (ch, cw))):
            crops[10 * n + c] = im[i:i + ch, j:j + cw, :]
        crops[10 * n + 5:10 * n + 10] = crops[10 * n:10 * n + 5, :, ::-1, :]
    return crops
