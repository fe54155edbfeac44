"""The backend contract and registry.

A backend is one device's way of doing math.  It owns:
  xp            the array module layer code is written against (NumPy, CuPy, ...)
  k             the named primitives (im2col, col2im, pooling, ...) with one signature per backend
  rng           a NumPy-compatible random Generator living on the device (dropout masks)
  synchronize() wait for queued device work
  to_device(a)  a host array copied to (or viewed on) the device
  to_host(a)    a device array as a NumPy array
Everything else (layers, net, solver) only talks to these, so a new device is one module.
"""

import importlib

from espresso.errors import BackendError

_CACHE = {}
_MODULES = {"cpu": "espresso.backend.cpu", "cuda": "espresso.backend.cuda"}


def get(name="cpu"):
    """The backend for `name` ('cpu', 'cuda' or 'cuda:N'), created once and cached."""
    if name not in _CACHE:
        kind, _, index = name.partition(":")
        if kind not in _MODULES:
            raise BackendError(f"unknown backend '{name}' (known: {', '.join(_MODULES)})")
        try:
            module = importlib.import_module(_MODULES[kind])
        except ImportError as e:
            raise BackendError(f"backend '{name}' is not available: {e}") from None
        _CACHE[name] = module.create(int(index or 0))
    return _CACHE[name]


def address(array):
    """Where an array's data starts (NumPy or CuPy): equal addresses mean shared storage."""
    data = array.data
    return data.ptr if hasattr(data, "ptr") else array.ctypes.data


def reseed(seed):
    """Re-seed the device generators of every backend created so far.  The new generators hold
    their state in new memory, so captured CUDA graphs (which baked in the old) are void."""
    from espresso.blob import Blob

    for backend in _CACHE.values():
        backend.seed(seed)
    Blob.layout += 1
