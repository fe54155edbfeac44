"""WindowData: the R-CNN fine-tuning input (Caffe's window_data_layer.cpp).

A window file lists images and windows in them, as whitespace-separated tokens:
    # <image index> <path> <channels> <height> <width> <number of windows>
    <class> <overlap> <x1> <y1> <x2> <y2>      (one line per window, inclusive pixel corners)
A window overlapping an object by at least fg_threshold is a foreground example of its class;
one under bg_threshold a background example (class 0); the rest are unused.  Each batch holds
batch_size * fg_fraction foreground windows after the background ones, each drawn at random,
cropped with context_pad pixels of context (crop_mode "warp": stretched to the square crop;
"square": the window made square first), warped to crop_size by bilinear resizing, mirrored at
random with transform_param.mirror, then (pixel - mean) * window_data_param.scale, where the
mean is transform_param.mean_file's (its centre crop, shifted with the padding) or mean_value.
Context outside the image stays 0, as in Caffe.

Differs from Caffe: batches are read in forward (no prefetch thread); the window file's image
indices must count 0, 1, 2... (Caffe indexes its image list by them, out of bounds otherwise);
the draws come from NumPy's generator.  Fields Caffe's layer ignores (window_data_param's
crop_size, mirror, mean_file; transform_param.scale) are refused, naming the one it reads.
"""

import math

import numpy as np

from espresso import cursor as saved
from espresso.data import DatasetError
from espresso.data.image import decode_image, read_image, resize
from espresso.data.transformer import load_mean_file
from espresso.layer import register
from espresso.layers.data import _DataLayerBase, _seeded_rng


def _c_round(x):
    """C's round() of a float promoted to double: halves away from zero."""
    x = float(x)
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def read_window_file(path, root_folder, fg_threshold, bg_threshold):
    """([(image path, channels)], foreground windows, background windows); a window is
    (image position, class, x1, y1, x2, y2)."""
    try:
        with open(path) as f:
            tokens = f.read().split()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the window file: {e.strerror}") from None
    if not tokens:
        raise DatasetError(f"{path}: Window file is empty")
    images, fg, bg, pos = [], [], [], 0
    try:
        while pos < len(tokens):
            mark, index, name, channels, _, _, count = tokens[pos:pos + 7]
            if mark != "#" or int(index) != len(images):
                raise DatasetError(f"{path}: expected '# {len(images)}' (images numbered from 0), got '{mark} {index}'")
            images.append((root_folder + name, int(channels)))
            pos += 7
            for _ in range(int(count)):
                label, overlap, *corners = tokens[pos:pos + 6]
                pos += 6
                window = (len(images) - 1, int(label), *map(int, corners))
                if np.float32(overlap) >= np.float32(fg_threshold):
                    if window[1] <= 0:
                        raise DatasetError(f"{path}: image {index}: a foreground window has class {label}; "
                                           "classes of objects start at 1 (0 is background)")
                    fg.append(window)
                elif np.float32(overlap) < np.float32(bg_threshold):
                    bg.append((window[0], 0, *window[2:]))
    except ValueError:
        raise DatasetError(f"{path}: malformed window file near token {pos}") from None
    return images, fg, bg


@register
class WindowDataLayer(_DataLayerBase):
    """Foreground and background windows of images, cropped with context and warped; tops: data
    (batch_size, channels, crop_size, crop_size) and label (batch_size,)."""

    type = "WindowData"
    param = "window_data_param"
    legacy = "WINDOW_DATA"
    exact_tops = 2

    def setup(self, bottom, top):
        self.reject_deprecated({name: name for name in ("crop_size", "mirror", "mean_file")})
        t = self.lp.transform_param
        for field in ("scale", "force_color", "force_gray"):
            if t.HasField(field):
                self.fail(f"transform_param.{field} is unused by WindowData"
                          + ("; it scales by window_data_param.scale" if field == "scale" else ""))
        if t.crop_size <= 0:
            self.fail("transform_param.crop_size: WindowData needs a crop size > 0")
        if self.p.crop_mode not in ("warp", "square"):
            self.fail(f"window_data_param.crop_mode: 'warp' or 'square', got '{self.p.crop_mode}'")
        if 2 * self.p.context_pad >= t.crop_size:
            self.fail(f"window_data_param.context_pad {self.p.context_pad} leaves no window in crop {t.crop_size}")
        batch_size = self.positive_batch_size()
        try:
            self.images, self.fg, self.bg = read_window_file(self.p.source, self.p.root_folder,
                                                             self.p.fg_threshold, self.p.bg_threshold)
        except DatasetError as e:
            self.fail(f"window_data_param.source: {e}", DatasetError)
        if not self.fg or not self.bg:
            self.fail(f"window_data_param.source: needs foreground and background windows, got "
                      f"{len(self.fg)} and {len(self.bg)}", DatasetError)
        self.channels, self.crop = self.images[-1][1], t.crop_size  # Caffe takes the last image's channels
        self.mean = self._mean(t)
        self.cache = [self._read(path) for path, _ in self.images] if self.p.cache_images else None
        self.rng = _seeded_rng()
        top[0].reshape(batch_size, self.channels, self.crop, self.crop)
        top[1].reshape(batch_size)
        self.batch = np.zeros(top[0].shape, np.float32), np.zeros(batch_size, np.float32)  # host, refilled

    def _mean(self, t):
        """C x crop x crop + padding-shifted mean: a function (c, rows, cols) -> values, or None."""
        if t.HasField("mean_file") and len(t.mean_value):
            self.fail("transform_param: give mean_file or mean_value, not both")
        if t.HasField("mean_file"):
            mean = load_mean_file(t.mean_file, self.fail)
            offset = (mean.shape[2] - self.crop) // 2  # Caffe offsets both axes by the width's margin
            if mean.shape[0] != self.channels or offset < 0 or offset + self.crop > mean.shape[1]:
                self.fail(f"transform_param.mean_file: a {self.channels}-channel mean whose centre crop "
                          f"{self.crop} x {self.crop} (offset by the width's margin on both axes) fits, got "
                          f"{mean.shape} (Caffe would read past it)")
            return mean, offset
        values = list(t.mean_value)
        if values and len(values) not in (1, self.channels):
            self.fail(f"transform_param.mean_value: give 1 or {self.channels} values, got {len(values)}")
        return (np.array(values * (self.channels if len(values) == 1 else 1), np.float32), None) if values else None

    def _read(self, path):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            self.fail(f"Could not open or find file {path}: {e.strerror}", DatasetError)

    def _image(self, position):
        """The image as uint8 C x H x W, BGR (Caffe reads it with CV_LOAD_IMAGE_COLOR)."""
        if self.cache is not None:
            return decode_image(self.cache[position], True, self.images[position][0])
        try:
            return read_image(self.images[position][0], is_color=True)
        except DatasetError as e:
            self.fail(str(e), DatasetError)

    def forward(self, bottom, top):
        batch_size = self.p.batch_size
        data, labels = self.batch
        data[...] = 0  # context outside an image stays 0, as in Caffe
        num_fg = int(np.float32(batch_size) * np.float32(self.p.fg_fraction))
        item = 0
        for windows, count in ((self.bg, batch_size - num_fg), (self.fg, num_fg)):
            for _ in range(count):
                window = windows[self.rng.integers(len(windows))]
                mirror = bool(self.lp.transform_param.mirror and self.rng.integers(2))
                self.crop_window(window, mirror, data[item])
                labels[item] = window[1]
                item += 1
        top[0].data[...] = self.backend.to_device(data, self.dtype)
        top[1].data[...] = self.backend.to_device(labels, self.dtype)

    def crop_window(self, window, mirror, out):
        """Write one window, cropped, warped and normalized, into `out` (C x crop x crop zeros)."""
        image = self._image(window[0])
        x1, y1, x2, y2 = window[2:]
        height, width = self.crop, self.crop
        pad_h = pad_w = 0
        if self.p.context_pad > 0 or self.p.crop_mode == "square":
            box, pads, (height, width) = self._context_box(window[2:], image.shape[1:], mirror)
            x1, y1, x2, y2 = box
            pad_h, pad_w = pads
        if not (0 <= x1 <= x2 < image.shape[2] and 0 <= y1 <= y2 < image.shape[1]):
            self.fail(f"window ({x1}, {y1}, {x2}, {y2}) lies outside image {self.images[window[0]][0]} "
                      f"of {image.shape[2]} x {image.shape[1]}", DatasetError)
        pixels = resize(image[:, y1:y2 + 1, x1:x2 + 1], height, width).astype(np.float32)
        if mirror:
            pixels = pixels[:, :, ::-1]
        rows, cols = slice(pad_h, pad_h + height), slice(pad_w, pad_w + width)
        if self.mean is not None:
            mean, offset = self.mean
            if offset is None:
                pixels -= mean[:, None, None]
            else:
                pixels -= mean[:, offset + pad_h:offset + pad_h + height, offset + pad_w:offset + pad_w + width]
        out[:, rows, cols] = pixels * np.float32(self.p.scale)

    def _context_box(self, corners, image_hw, mirror):
        """Caffe's context padding, in its float arithmetic: the box grown by context_pad/crop
        each side (squared first in "square" mode), clipped to the image; the clipped box, the
        (top, left) padding in the crop, and the size the clipped box is warped to."""
        x1, y1, x2, y2 = corners
        f32, crop, pad = np.float32, self.crop, self.p.context_pad
        context_scale = f32(crop) / f32(crop - 2 * pad)
        half_h, half_w = f32((y2 - y1 + 1) / 2.0), f32((x2 - x1 + 1) / 2.0)
        centre_x, centre_y = f32(x1) + half_w, f32(y1) + half_h
        if self.p.crop_mode == "square":
            half_h = half_w = max(half_h, half_w)
        x1, x2 = _c_round(centre_x - half_w * context_scale), _c_round(centre_x + half_w * context_scale)
        y1, y2 = _c_round(centre_y - half_h * context_scale), _c_round(centre_y + half_h * context_scale)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - image_hw[1] + 1), max(0, y2 - image_hw[0] + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x, scale_y = f32(crop) / f32(unclipped_w), f32(crop) / f32(unclipped_h)
        width, height = _c_round(f32(x2 - x1 + 1) * scale_x), _c_round(f32(y2 - y1 + 1) * scale_y)
        pad_top = _c_round(f32(pad_y1) * scale_y)
        pad_left = _c_round(f32(pad_x2 if mirror else pad_x1) * scale_x)  # the far side, once flipped
        return (x1, y1, x2, y2), (pad_top, pad_left), (min(height, crop - pad_top), min(width, crop - pad_left))

    def dataset_size(self):
        return len(self.fg) + len(self.bg)

    def cursor(self):
        return {"n": self.dataset_size(), "rng": saved.generator_state(self.rng)}

    def go_to(self, cursor):
        saved.set_generator(self.rng, cursor.get("rng"))
