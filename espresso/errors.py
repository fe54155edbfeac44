"""One exception hierarchy for everything a user can get wrong.

Every message says where (file:line, layer name and type, field or blob), what (expected vs
actual) and, where cheap, a hint.  Internal invariants use `assert`, never these.
"""

import difflib


class EspressoError(Exception):
    """Base of every error Espresso raises for bad input."""


class PrototxtError(EspressoError):
    """A prototxt file does not parse (carries file, line and column)."""


class NetError(EspressoError):
    """A net definition is inconsistent (unknown bottom, duplicate top, bad in-place use...)."""


class LayerParamError(NetError):
    """A layer's parameters are invalid or unsupported."""


class ShapeError(NetError):
    """Blob shapes do not fit together."""


class LabelError(NetError):
    """A label is not a class of the layer that reads it."""


class MemoryLimitError(ShapeError):
    """Blobs would need more memory than the limit (espresso.set_memory_limit)."""


class ModelFileError(EspressoError, OSError):
    """A model file (prototxt, .caffemodel, .binaryproto, .solverstate) is missing, truncated or
    corrupt.  An OSError too, as pycaffe's IOError for a file it cannot open."""


class BackendError(EspressoError):
    """A backend (device) was asked for that is not available."""


class GraphCaptureError(BackendError):
    """Work could not be captured as a CUDA graph (callers run it eagerly instead)."""


def did_you_mean(name, choices):
    """'; did you mean 'x'?' for the closest of `choices`, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
