"""espresso.demo.preprocess: photos made to look like Fashion-MNIST, on synthetic photos of the
embedded subset's items (its speed is measured in benchmarks/demo_preprocess.py, not here)."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from espresso.data.fmnist import EMBEDDED_DIR, idx_files
from espresso.data.idx import read_idx
from espresso.demo.preprocess import plain_input, to_input


@pytest.fixture(scope="module")
def items():
    return read_idx(idx_files(EMBEDDED_DIR)["test_images"])[:8]


def photo_of(item, seed):
    """A colour JPEG photo of a Fashion-MNIST item, as a phone takes it: dark garment on a light,
    unevenly lit, tinted table, somewhere in the frame, blurred and grainy."""
    rng = np.random.default_rng(seed)
    height, width = rng.integers(150, 260, size=2)
    side = int(rng.integers(70, 140))
    cover = np.asarray(Image.fromarray(item).resize((side, side), Image.BICUBIC), np.float32)[..., None] / 255
    cover = np.clip(cover, 0, 1)  # bicubic overshoots at edges
    y, x = np.mgrid[0:height, 0:width]
    table = (rng.uniform(170, 230) + 30 * (x / width - 0.5) + 20 * (y / height - 0.5))[..., None]
    photo = table * (1 - rng.uniform(0, 0.15, 3))  # a light colour tint
    top, left = rng.integers(0, height - side), rng.integers(0, width - side)
    spot = photo[top:top + side, left:left + side]
    spot[...] = spot * (1 - cover) + rng.uniform(0, 80, 3) * cover
    photo += rng.normal(0, 4, photo.shape)
    blurred = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    jpeg = io.BytesIO()
    blurred.save(jpeg, "JPEG", quality=70)
    return np.asarray(Image.open(jpeg))


def correlation(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def test_a_photo_comes_back_close_to_the_fashion_mnist_item(items):
    found = [correlation(to_input(photo_of(item, seed)), item) for seed, item in enumerate(items)]
    # a pixel's shift of a thin sole costs much correlation (item 5, a sneaker 70 pixels long: 0.67)
    assert np.mean(found) > 0.85 and sum(c > 0.8 for c in found) >= 7 and min(found) > 0.6, found


def test_the_naive_baseline_does_not(items):
    assert np.mean([correlation(plain_input(photo_of(item, seed)), item) for seed, item in enumerate(items)]) < 0.3


def test_a_fashion_mnist_item_itself_is_kept(items):
    for item in items:
        assert correlation(to_input(item), item) > 0.95


def test_a_bright_object_on_a_dark_background_is_not_inverted(items):
    canvas = np.random.default_rng(0).normal(20, 3, (120, 160)).clip(0, 255).astype(np.uint8)
    canvas[30:86, 50:106] = np.maximum(canvas[30:86, 50:106], np.asarray(Image.fromarray(items[0]).resize((56, 56))))
    out = to_input(canvas)
    assert correlation(out, items[0]) > 0.9
    assert out[0, 0, 0] == 0 and out.max() > 0.9  # black background, object stretched to full brightness


def test_shape_dtype_and_range(items):
    photo = photo_of(items[0], 0)
    for size in ((28, 28), (32, 20)):
        for out in (to_input(photo, size), plain_input(photo, size)):
            assert out.shape == (1, *size) and out.dtype == np.float32
            assert out.min() >= 0 and out.max() < 1
    assert to_input(photo).max() == 255 / 256  # contrast stretched as Fashion-MNIST's


def test_transparent_pixels_are_a_white_background(items):
    rgba = np.zeros((100, 100, 4), np.uint8)  # transparent black, as cut-out product images are stored
    rgba[20:76, 20:76, 3] = np.asarray(Image.fromarray(items[1]).resize((56, 56)))  # a black garment, opaque
    assert correlation(to_input(rgba), items[1]) > 0.9


@pytest.mark.parametrize("image", [
    np.zeros((1, 1), np.uint8), np.full((1, 1, 3), 200, np.uint8), np.zeros((2, 3), np.uint8),
    np.arange(700, dtype=np.uint8).reshape(1, 700), np.full((300, 200, 3), 180, np.uint8),
    np.random.default_rng(1).integers(0, 256, (40, 30, 1), dtype=np.uint8),
    np.random.default_rng(2).integers(0, 256, (40, 30, 2), dtype=np.uint8),
    np.random.default_rng(3).integers(0, 256, (40, 30, 4), dtype=np.uint8),
    Image.new("L", (30, 20), 90), Image.new("RGBA", (30, 20), (10, 200, 30, 128)), Image.new("P", (30, 20), 3),
    Image.new("I;16", (30, 20), 1000), Image.new("1", (30, 20), 1),
], ids=["1x1", "1x1x3", "2x3", "1x700", "uniform", "grey-1-channel", "grey-alpha", "rgba-noise", "pil-L",
        "pil-RGBA", "pil-P", "pil-I16", "pil-1"])
def test_odd_inputs(image):
    for out in (to_input(image), plain_input(image)):
        assert out.shape == (1, 28, 28) and out.dtype == np.float32 and 0 <= out.min() <= out.max() < 1


def test_a_uniform_image_is_black():
    assert not to_input(np.full((50, 80, 3), 128, np.uint8)).any()
    assert np.allclose(plain_input(np.full((50, 80, 3), 128, np.uint8)), 128 / 256, atol=1e-3)


def test_a_huge_photo(items):
    photo = np.full((3000, 4000, 3), 210, np.uint8)
    photo[1000:2200, 1500:2700] -= np.asarray(Image.fromarray(items[2]).resize((1200, 1200)))[..., None] // 2
    assert correlation(to_input(photo), items[2]) > 0.9


def test_an_empty_image_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        to_input(np.zeros((0, 5), np.uint8))
