"""espresso.io: pycaffe's caffe.io (proto/datum conversions, Transformer, image helpers)."""

import sys

import numpy as np
import pytest

import espresso
from espresso import io as eio
from espresso.errors import EspressoError, ModelFileError
from espresso.proto import caffe_pb2


# *** Transformer ***
def _transformer(shape=(1, 3, 4, 5)):
    t = eio.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_input_scale("data", 0.5)
    return t


def test_preprocess_order_and_deprocess_round_trip(rng):
    img = rng.random((4, 5, 3)).astype(np.float32)
    before = img.copy()
    t = _transformer()
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    out = t.preprocess("data", img)
    expected = np.empty((3, 4, 5))
    for c in range(3):  # channel c of the input is channel 2 - c of the RGB image
        for y in range(4):
            for x in range(5):
                expected[c, y, x] = (img[y, x, 2 - c] * 255.0 - [10.0, 20.0, 30.0][c]) * 0.5
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(img, before)  # the caller's image is left alone
    np.testing.assert_allclose(t.deprocess("data", out[np.newaxis]), img, atol=1e-5)


def test_full_mean_and_round_trip(rng):
    img = rng.random((4, 5, 3)).astype(np.float32)
    mean = rng.random((3, 4, 5)) * 100
    t = _transformer()
    t.set_mean("data", mean)
    out = t.preprocess("data", img)
    expected = (img[:, :, ::-1].transpose(2, 0, 1) * 255.0 - mean) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", out), img, atol=1e-5)


def test_preprocess_resizes_to_input_dims(rng):
    t = eio.Transformer({"data": (2, 1, 3, 4)})
    t.set_transpose("data", (2, 0, 1))
    out = t.preprocess("data", rng.random((6, 8, 1)))
    assert out.shape == (1, 3, 4) and out.dtype == np.float32


def test_grayscale_hw_mean_is_accepted():
    t = eio.Transformer({"data": (1, 1, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.array([[1.0, 2.0], [3.0, 4.0]]))
    out = t.preprocess("data", np.full((2, 2, 1), 5.0))
    np.testing.assert_allclose(out, [[[4.0, 3.0], [2.0, 1.0]]])


@pytest.mark.parametrize("call, message", [
    (lambda t: t.preprocess("nope", np.zeros((4, 5, 3))), "not one of the net inputs"),
    (lambda t: t.set_transpose("data", (1, 0)), "Transpose order"),
    (lambda t: t.set_channel_swap("data", (1, 0)), "Channel swap"),
    (lambda t: t.set_mean("data", np.zeros(4)), "Mean channels incompatible"),
    (lambda t: t.set_mean("data", np.zeros((2, 4, 5))), "Mean shape incompatible"),
    (lambda t: t.set_mean("data", np.zeros((1, 3, 4, 5))), "Mean shape invalid"),
    (lambda t: t.set_mean("data", np.zeros((4, 5))), "Mean shape incompatible"),  # H x W needs 1 channel
])
def test_transformer_errors(call, message):
    with pytest.raises(eio.TransformerError, match=message) as info:
        call(eio.Transformer({"data": (1, 3, 4, 5)}))
    assert isinstance(info.value, EspressoError) and isinstance(info.value, ValueError)


# *** Datum and BlobProto ***
def test_datum_uint8_round_trip():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    datum = eio.array_to_datum(arr, label=7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (2, 3, 4, 7)
    assert datum.data == bytes(range(24)) and len(datum.float_data) == 0
    back = eio.datum_to_array(caffe_pb2.Datum.FromString(datum.SerializeToString()))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, arr)


def test_datum_float_round_trip_and_default_label():
    arr = np.linspace(-1, 1, 12).reshape(3, 2, 2).astype(np.float32)
    datum = eio.array_to_datum(arr)
    assert not datum.data and len(datum.float_data) == 12 and datum.label == 0
    back = eio.datum_to_array(datum)
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, arr, rtol=1e-7)


def test_datum_needs_three_axes():
    with pytest.raises(eio.ArrayShapeError, match="Incorrect array shape"):
        eio.array_to_datum(np.zeros((2, 2)))


def test_blobproto_round_trip_with_diff(rng):
    arr, diff = rng.random((2, 3, 5)), rng.random((2, 3, 5))
    blob = eio.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 5] and not blob.HasField("num")
    blob = caffe_pb2.BlobProto.FromString(blob.SerializeToString())
    np.testing.assert_allclose(eio.blobproto_to_array(blob), arr, rtol=1e-6)  # stored as float32
    np.testing.assert_allclose(eio.blobproto_to_array(blob, return_diff=True), diff, rtol=1e-6)


def test_blobproto_legacy_dims_win():
    blob = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    arr = eio.blobproto_to_array(blob)
    assert arr.shape == (1, 2, 1, 3) and arr.dtype == np.float64
    assert arr[0, 1, 0, 2] == 6


def test_blobprotovector_str_round_trip():
    arrays = [np.arange(6.0).reshape(1, 2, 3), np.ones(4)]
    data = eio.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(data, bytes)
    back = eio.blobprotovector_str_to_arraylist(data)
    assert [a.shape for a in back] == [(1, 2, 3), (4,)]
    np.testing.assert_array_equal(back[0], arrays[0])
    assert eio.arraylist_to_blobprotovecor_str is eio.arraylist_to_blobprotovector_str


def test_mean_file_pycaffe_idiom_and_helpers(tmp_path):
    # as written by Caffe's compute_image_mean: legacy 1 x C x H x W
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2, data=list(range(12)))
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(blob.SerializeToString())
    caffe = espresso
    with open(path, "rb") as f:
        parsed = caffe.proto.caffe_pb2.BlobProto.FromString(f.read())
    arr = np.array(eio.blobproto_to_array(parsed))
    assert arr.shape == (1, 3, 2, 2)
    assert eio.read_blobproto(path).shape == (1, 3, 2, 2)
    mean = eio.load_mean(path)
    assert mean.shape == (3, 2, 2) and mean[2, 1, 1] == 11
    t = eio.Transformer({"data": (1, 3, 2, 2)})
    t.set_mean("data", mean)  # fits a Transformer as is


def test_corrupt_mean_file(tmp_path):
    path = tmp_path / "bad.binaryproto"
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ModelFileError):
        eio.load_mean(path)


# *** oversample ***
def test_oversample_crops_in_pycaffe_order():
    images = [np.arange(5 * 6 * 2, dtype=np.float64).reshape(5, 6, 2) + 100 * n for n in range(2)]
    crops = eio.oversample(images, (3, 4))
    assert crops.shape == (20, 3, 4, 2) and crops.dtype == np.float32
    # (top, left): corners row by row, then the centre (5x6 image, 3x4 crop: rows 1:4, cols 1:5)
    starts = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for n, im in enumerate(images):
        for c, (i, j) in enumerate(starts):
            np.testing.assert_array_equal(crops[10 * n + c], im[i:i + 3, j:j + 4])
            np.testing.assert_array_equal(crops[10 * n + 5 + c], im[i:i + 3, j:j + 4][:, ::-1])


def test_oversample_centre_with_odd_margin():
    im = np.arange(36.0).reshape(6, 6, 1)
    centre = eio.oversample([im], (3, 3))[4]
    np.testing.assert_array_equal(centre, im[1:4, 1:4])  # 3 +- 1.5 truncates to 1:4, as pycaffe


def test_oversample_crop_too_large():
    with pytest.raises(eio.ArrayShapeError):
        eio.oversample([np.zeros((2, 2, 1))], (3, 3))


# *** resize ***
def _caffe_resize(im, new_dims, interp_order):
    """Caffe's io.resize_image, as python/caffe/io.py computes it (scikit-image, SciPy's zoom)."""
    transform, ndimage = pytest.importorskip("skimage.transform"), pytest.importorskip("scipy.ndimage")
    if im.shape[-1] not in (1, 3):
        return ndimage.zoom(im, (new_dims[0] / im.shape[0], new_dims[1] / im.shape[1], 1),
                            order=interp_order).astype(np.float32)
    low, high = im.min(), im.max()
    if high == low:
        return np.full(tuple(new_dims) + im.shape[-1:], low, np.float32)
    unit = transform.resize((im - low) / (high - low), new_dims, order=interp_order, mode="constant")
    return (unit * (high - low) + low).astype(np.float32)


def test_an_image_mean_of_another_size_is_resized_as_caffes(rng):
    """classify.py's ImageNet mean (256 x 256) against a 227 input: Caffe's set_mean resizes it."""
    mean = rng.random((3, 8, 10)) * 100 + 50
    t = eio.Transformer({"data": (1, 3, 4, 5)})
    t.set_mean("data", mean)
    low, high = mean.min(), mean.max()
    expected = _caffe_resize(((mean - low) / (high - low)).transpose(1, 2, 0), (4, 5), 1)
    np.testing.assert_allclose(t.mean["data"], expected.transpose(2, 0, 1) * (high - low) + low, rtol=1e-6)
    t.set_mean("data", np.full((3, 8, 10), 7.0))
    np.testing.assert_array_equal(t.mean["data"], 7.0)


@pytest.mark.parametrize("order", range(6))
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_resize_is_caffes_for_every_order_up_and_down(rng, order, channels):
    for dtype in (np.float32, np.float64, np.uint8):
        im = (rng.random((6, 9, channels)) * 255).astype(dtype)
        for dims in ((13, 4), (3, 3), (6, 9), (17, 20)):
            out = eio.resize_image(im, dims, interp_order=order)
            assert out.shape == dims + (channels,) and out.dtype == np.float32
            np.testing.assert_array_equal(out, _caffe_resize(im, dims, order))


def test_resize_blends_towards_the_minimum_at_the_borders():
    """mode='constant', as Caffe asks scikit-image: outside the image counts as its minimum, so
    an upsampled border is darker than the border pixel (OpenCV would clamp to it)."""
    im = np.array([[1.0, 2.0], [3.0, 4.0]])[:, :, np.newaxis]
    out = eio.resize_image(im, (4, 4))[:, :, 0]
    np.testing.assert_allclose(out[1:3, 1:3], [[1.75, 2.25], [2.75, 3.25]], atol=1e-6)  # inside: bilinear
    assert out[0, 0] < 1.75 and out[0, 0] == out.min() >= 1.0  # the corner blends towards min, clipped
    nearest = eio.resize_image(im, (4, 4), interp_order=0)[:, :, 0]
    np.testing.assert_array_equal(nearest, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


def test_resize_constant_same_size_and_bad_input(rng):
    const = eio.resize_image(np.full((3, 4, 3), 7.0), (5, 9))
    assert const.shape == (5, 9, 3) and const.dtype == np.float32
    np.testing.assert_array_equal(const, 7.0)
    im = rng.random((3, 5, 3))
    np.testing.assert_allclose(eio.resize_image(im, (3, 5)), im, atol=1e-6)  # same size: unchanged
    with pytest.raises(EspressoError, match="interp_order must be 0 to 5"):
        eio.resize_image(im, (3, 3), interp_order=6)
    with pytest.raises(eio.ArrayShapeError, match="cannot resize"):
        eio.resize_image(im[:, :, 0], (3, 3))


# *** load_image ***
def test_load_image_without_pillow_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(EspressoError, match=r"pip install espresso-nn\[image\]"):
        eio.load_image(tmp_path / "x.png")


def test_load_image_modes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    out = eio.load_image(tmp_path / "rgb.png")
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, rgb / 255.0, rtol=1e-6)
    grey = eio.load_image(tmp_path / "rgb.png", color=False)  # made grey, as skimage's rgb2gray for Caffe
    assert grey.shape == (2, 3, 1) and grey.dtype == np.float32
    np.testing.assert_allclose(grey[:, :, 0], rgb / 255.0 @ [0.2125, 0.7154, 0.0721], rtol=1e-5)

    gray = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    g = eio.load_image(tmp_path / "gray.png", color=False)
    assert g.shape == (2, 2, 1)
    np.testing.assert_allclose(g[:, :, 0], gray / 255.0, rtol=1e-6)
    c = eio.load_image(tmp_path / "gray.png")
    assert c.shape == (2, 2, 3) and np.all(c == g)

    rgba = np.dstack([rgb, np.full((2, 3), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(eio.load_image(tmp_path / "rgba.png"), rgb / 255.0, rtol=1e-6)


def test_pycaffe_process_names_answer_truthfully():
    import espresso as caffe

    assert (caffe.solver_count(), caffe.solver_rank(), caffe.has_nccl()) == (1, 0, False)
    caffe.set_solver_count(1)
    caffe.set_multiprocess(False)
    with pytest.raises(caffe.EspressoError, match="ranks go from 0 to solver_count"):
        caffe.set_solver_rank(1)  # one rank: parallel.start() sets both
    types = caffe.layer_type_list()
    assert types == sorted(types) and {"Convolution", "Python", "Permute"} <= set(types)
    timer = caffe.Timer()
    assert timer.ms == 0.0
    timer.start()
    sum(range(10000))
    timer.stop()
    first = timer.ms
    assert first > 0 and timer.ms == first  # stopped: it stays
