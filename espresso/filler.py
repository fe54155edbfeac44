"""Caffe's weight fillers, by name.  Filling happens on the host; the blob then takes the values,
a large blob row block by row block (values drawn one after the other, so the same as in one
draw): VGG-16's fc6 (103 M weights) drawn whole took 1.2 GB of float64 and float32 temporaries.

fan_in = count / shape[0] and fan_out = count / shape[1], as in Caffe's filler.hpp, so a
convolution weight (num_output, C, kh, kw) has fan_in = C*kh*kw.
"""

import math

import numpy as np

from espresso.errors import LayerParamError
from espresso.runtime import host_rng


def _fan(shape, variance_norm, norm_enum):
    count = math.prod(shape)
    fan_in = count // shape[0] if shape and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    if variance_norm == norm_enum.Value("FAN_OUT"):
        return fan_out
    if variance_norm == norm_enum.Value("AVERAGE"):
        return (fan_in + fan_out) / 2.0
    return fan_in


CHUNK = 1 << 22  # values drawn at a time (32 MB of float64)


def _constant(p, shape, rng, rows=None):
    return np.full(_drawn(shape, rows), p.value)


def _uniform(p, shape, rng, rows=None):
    return rng.uniform(p.min, p.max, _drawn(shape, rows))


def _gaussian(p, shape, rng, rows=None):
    values = rng.normal(p.mean, p.std, _drawn(shape, rows))
    if p.sparse >= 0:
        if len(shape) < 1:
            raise LayerParamError("sparse gaussian filler needs a blob with at least one axis")
        keep = rng.random(shape) < p.sparse / shape[0]
        values *= keep
    return values


def _positive_unitball(p, shape, rng, rows=None):
    values = rng.random(_drawn(shape, rows))
    unit = values.reshape(len(values), -1)
    unit /= unit.sum(axis=1, keepdims=True)
    return values


def _xavier(p, shape, rng, rows=None):
    scale = math.sqrt(3.0 / _fan(shape, p.variance_norm, type(p).VarianceNorm))
    return rng.uniform(-scale, scale, _drawn(shape, rows))


def _msra(p, shape, rng, rows=None):
    std = math.sqrt(2.0 / _fan(shape, p.variance_norm, type(p).VarianceNorm))
    return rng.normal(0.0, std, _drawn(shape, rows))


def _drawn(shape, rows):
    """The shape of one draw: the blob's, or `rows` of its first axis."""
    return shape if rows is None else (rows,) + tuple(shape[1:])


def _bilinear(p, shape, rng):
    """Weights of a bilinear upsampling kernel (for Deconvolution), as Caffe's BilinearFiller."""
    if len(shape) != 4 or shape[2] != shape[3]:
        raise LayerParamError(f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
    f = math.ceil(shape[3] / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    y, x = np.meshgrid(np.arange(shape[2]), np.arange(shape[3]), indexing="ij")
    kernel = (1 - np.abs(x / f - c)) * (1 - np.abs(y / f - c))
    return np.broadcast_to(kernel, shape).copy()


_BY_ROWS = {_constant, _uniform, _positive_unitball, _xavier, _msra}  # (and gaussian without sparse)
FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def fill(blob, filler_param, rng=None):
    """Fill `blob.data` as `filler_param` (a caffe_pb2.FillerParameter) says."""
    make = FILLERS.get(filler_param.type)
    if make is None:
        raise LayerParamError(
            f"unknown filler type '{filler_param.type}' (known: {', '.join(FILLERS)})"
        )
    rng, shape = rng or host_rng(), tuple(blob.shape)
    by_rows = make in _BY_ROWS or (make is _gaussian and filler_param.sparse < 0)
    if not by_rows or len(shape) < 2 or math.prod(shape) <= CHUNK:
        blob.data[...] = blob.backend.to_device(make(filler_param, shape, rng), blob.dtype)
        return
    step = max(1, CHUNK // math.prod(shape[1:]))
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        blob.data[start:start + rows] = blob.backend.to_device(make(filler_param, shape, rng, rows), blob.dtype)
