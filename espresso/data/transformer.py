"""Caffe's DataTransformer (data_transformer.cpp), applied to a whole batch at once.

    out[n, c, h, w] = (x[n, c, h_off + h, w_off + w'] - mean[c, h_off + h, w_off + w']) * scale

with w' = w, or crop_w - 1 - w for a mirrored item.  As in Caffe: the crop is random in TRAIN
and central in TEST; mirroring (mirror: true) is a coin flip per item in *both* phases
(Caffe 1.0 draws `mirror() && Rand(2)` whatever the phase); a mean_file mean is indexed at the
source pixel, so it is cropped and mirrored with the data.  Random numbers come from a
generator seeded from espresso.runtime.host_rng() at construction, so set_random_seed
reproduces every batch.
"""

import numpy as np

from espresso.errors import LayerParamError
from espresso.proto import caffe_pb2
from espresso.runtime import host_rng

TRAIN = caffe_pb2.TRAIN


def _raise(message, error=LayerParamError):
    raise error(message)


def load_mean_file(path, fail=_raise):
    """A .binaryproto mean image (compute_image_mean's 1 x C x H x W blob) as float32 C x H x W."""
    from espresso.proto.text import read_binary
    from espresso.proto.weights import blob_array

    mean = blob_array(read_binary(path, caffe_pb2.BlobProto()), path).astype(np.float32)
    while mean.ndim > 3 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        fail(f"transform_param.mean_file {path}: expected a 1 x C x H x W blob, got shape {mean.shape}")
    return mean


class DataTransformer:
    """Honors transform_param: scale, mirror, crop_size, mean_file, mean_value, force_color,
    force_gray (the last two for encoded Datums only)."""

    def __init__(self, param, phase, backend, dtype, fail=_raise):
        self.p, self.phase, self.backend, self.xp = param, phase, backend, backend.xp
        self.dtype, self.fail = np.dtype(dtype), fail
        if param.HasField("mean_file") and len(param.mean_value):
            fail("transform_param: cannot specify mean_file and mean_value at the same time")
        if param.force_color and param.force_gray:
            fail("transform_param: cannot set both force_color and force_gray")
        self.mean_image = load_mean_file(param.mean_file, fail) if param.HasField("mean_file") else None
        self.scale = self.dtype.type(param.scale)
        self.rng = None
        if param.mirror or (param.crop_size and phase == TRAIN):  # Caffe's InitRand condition
            self.rng = np.random.default_rng(int(host_rng().integers(2**63)))
        self.item_shape = self.mean = None

    @property
    def color(self):
        """How encoded images decode: True BGR, False grey, None as stored."""
        return True if self.p.force_color else False if self.p.force_gray else None

    def out_shape(self, item_shape):
        """The transformed shape of one C x H x W item (Caffe's InferBlobShape); checks fit."""
        C, H, W = item_shape
        crop = self.p.crop_size
        if crop > H or crop > W:
            self.fail(f"transform_param.crop_size {crop} is larger than the {H} x {W} input")
        if self.mean_image is not None and self.mean_image.shape != tuple(item_shape):
            self.fail(f"transform_param.mean_file: mean of shape {self.mean_image.shape} does not "
                      f"match data of shape {tuple(item_shape)}")
        if len(self.p.mean_value) not in (0, 1, C):
            self.fail(f"transform_param.mean_value: specify either 1 mean_value or as many as channels "
                      f"({C}), got {len(self.p.mean_value)}")
        if tuple(item_shape) != self.item_shape:
            self.item_shape = tuple(item_shape)
            self.mean = self._device_mean(C)
        return (C, crop, crop) if crop else (C, H, W)

    def _device_mean(self, channels):
        if self.mean_image is not None:
            return self.backend.to_device(self.mean_image, self.dtype)
        if len(self.p.mean_value):
            values = np.broadcast_to(np.array(self.p.mean_value, np.float32), (channels,))
            return self.backend.to_device(values.reshape(channels, 1, 1), self.dtype)
        return None

    # *** transforming ***
    def __call__(self, batch, out):
        """Transform `batch` (N, C, H, W; uint8 or float) into `out` (N, C, h, w) in place."""
        self.out_shape(batch.shape[1:])
        n, (_, H, W), (h, w) = len(batch), batch.shape[1:], out.shape[2:]
        mirror = self.rng.integers(0, 2, n).astype(bool) if self.p.mirror else None
        if self.p.crop_size and self.phase == TRAIN:
            h_off = self.rng.integers(0, H - h + 1, n)
            w_off = self.rng.integers(0, W - w + 1, n)
        else:  # the centre crop (offset 0 when not cropping): one window for the whole batch
            h0, w0 = (H - h) // 2, (W - w) // 2
            if mirror is None or not mirror.any():
                mean = self.mean[:, h0:h0 + h, w0:w0 + w] if self.mean_image is not None else self.mean
                return self._write(batch[:, :, h0:h0 + h, w0:w0 + w], mean, out)
            h_off, w_off = np.full(n, h0), np.full(n, w0)
        self._gather(batch, h_off, w_off, mirror, out)

    def _gather(self, batch, h_off, w_off, mirror, out):
        """Per-item windows and flips as one fancy-indexed gather (no loop over items)."""
        xp, (h, w) = self.xp, out.shape[2:]
        rows = h_off[:, None] + np.arange(h)  # (N, h) source rows
        cols = w_off[:, None] + np.arange(w)  # (N, w) source columns
        if mirror is not None:
            cols = np.where(mirror[:, None], cols[:, ::-1], cols)
        n_idx = xp.arange(len(batch))[:, None, None, None]
        c_idx = xp.arange(batch.shape[1])[None, :, None, None]
        r_idx = xp.asarray(rows)[:, None, :, None]
        w_idx = xp.asarray(cols)[:, None, None, :]
        mean = self.mean[c_idx, r_idx, w_idx] if self.mean_image is not None else self.mean
        self._write(batch[n_idx, c_idx, r_idx, w_idx], mean, out)

    def _write(self, source, mean, out):
        out[...] = source
        if mean is not None:
            out -= mean
        if self.scale != 1:
            out *= self.scale
