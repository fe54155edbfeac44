"""Blob: an N-D array of data and one of diff (gradient), on one backend.

Layers read and write `blob.data` / `blob.diff` in place: they are arrays of the backend's
`xp`.  Like Caffe's Blob::Reshape, `reshape` reallocates only when the element count grows past
the capacity, so shrinking and regrowing a batch never allocates.  The diff is allocated on
first use, so nets that never run backward never pay for it.
"""

import math

import numpy as np

from espresso import graphs
from espresso.backend import address
from espresso.errors import BackendError, MemoryLimitError, ShapeError
from espresso.runtime import current_backend, format_bytes, memory_limit


class Blob:
    """Changing a blob's shape or storage voids the graphs captured on its backend, which baked
    in every address and shape they touched (espresso/graphs.py)."""

    def __init__(self, shape=(), dtype=np.float32, backend=None, name=""):
        if backend is None:
            backend = current_backend()
        self.backend, self.dtype, self.name = backend, np.dtype(dtype), name
        self._shape = None
        self._data_buf = self._diff_buf = None
        self._data = self._diff = None
        self.reshape(*shape)

    # *** shape ***
    @property
    def shape(self):
        return self._shape

    @property
    def count(self):
        return math.prod(self._shape)

    @property
    def num_axes(self):
        return len(self._shape)

    def reshape(self, *shape):
        """Set a new shape; existing memory is reused when it is large enough."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(int(s) for s in shape)
        if shape == self._shape:
            return
        if any(s < 0 for s in shape):
            raise ShapeError(f"blob '{self.name}': negative dimension in shape {shape}")
        n = math.prod(shape)  # a Python integer: an absurd shape cannot overflow here
        grows = self._data_buf is None or n > self._data_buf.size
        if grows:
            self._check_size(shape, n * self.dtype.itemsize)
        self._shape = shape
        graphs.invalidate(self.backend)
        if grows:
            self._data_buf = self.backend.xp.zeros(n, dtype=self.dtype)
            self._diff_buf = None
        self._data = self._data_buf[:n].reshape(shape)
        self._diff = None

    def count_range(self, start, end=None):
        return math.prod(self._shape[start:end])

    def _check_size(self, shape, nbytes):
        """Refuse, before allocating, a blob larger than the memory limit (runtime.memory_limit)."""
        limit = memory_limit(self.backend)
        if nbytes > limit:
            what = f"blob '{self.name}'" if self.name else "a param or workspace blob"
            raise MemoryLimitError(f"{what} of shape {shape} needs {format_bytes(nbytes)}, more than the "
                                   f"{format_bytes(limit)} limit (the memory available; espresso.set_memory_limit "
                                   "or ESPRESSO_MEMORY_LIMIT sets another)")

    # legacy 4-D accessors (num, channels, height, width), 1 where the axis is missing
    def _legacy(self, i):
        return self._shape[i] if i < len(self._shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    # *** storage ***
    @property
    def data(self):
        return self._data

    @property
    def diff(self):
        if self._diff is None:
            n = self.count
            if self._diff_buf is None or n > self._diff_buf.size:
                self._diff_buf = self.backend.xp.zeros(max(n, self._data_buf.size), self.dtype)
                graphs.invalidate(self.backend)
            self._diff = self._diff_buf[:n].reshape(self._shape)
        return self._diff

    def bind(self, data, diff=None):
        """Make this blob a view of existing storage (parameter arena, shared weights)."""
        assert data.size == self.count, (data.shape, self._shape)
        graphs.invalidate(self.backend)
        self._data_buf, self._data = data.reshape(-1), data.reshape(self._shape)
        if diff is not None:
            self._diff_buf, self._diff = diff.reshape(-1), diff.reshape(self._shape)

    def share_data(self, other):
        """Caffe's ShareData: this blob's data *is* other's data (shapes must hold as many)."""
        if other.count != self.count:
            raise ShapeError(f"cannot share data of {other.shape} with {self._shape}")
        if self._data is None or address(self._data) != address(other.data):
            graphs.invalidate(self.backend)
        self._data_buf, self._data = other.data.reshape(-1), other.data.reshape(self._shape)

    def share_diff(self, other):
        if other.count != self.count:
            raise ShapeError(f"cannot share diff of {other.shape} with {self._shape}")
        graphs.invalidate(self.backend)
        self._diff_buf, self._diff = other.diff.reshape(-1), other.diff.reshape(self._shape)

    def release(self):
        """Keep the shape, give up the storage: the data reads as zeros held in no memory (a
        param kept in another form by an add-on, see Net.release_params)."""
        xp = self.backend.xp
        graphs.invalidate(self.backend)
        self._data_buf = self._data = xp.broadcast_to(xp.zeros((), self.dtype), self._shape)
        self._diff_buf = self._diff = None

    # pycaffe's _gpu_data_ptr / _gpu_diff_ptr: the device address, for code handing blobs to CUDA
    @property
    def _gpu_data_ptr(self):
        return self._device_address(self.data)

    @property
    def _gpu_diff_ptr(self):
        return self._device_address(self.diff)

    def _device_address(self, array):
        if self.backend.host_arrays:
            raise BackendError(f"blob {self.name!r} lives on the CPU: it has no GPU memory (set_mode_gpu first)")
        return address(array)

    def host_data(self):
        """The data as a NumPy array (a copy from the device when not on the CPU)."""
        return self.backend.to_host(self._data)

    def host_diff(self):
        return self.backend.to_host(self.diff)

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self._shape}, dtype={self.dtype})"


def allocate_diffs(blobs):
    """Give these blobs their diffs (allocated on first use) here: the threads of a split batch
    then all write into the same arrays, rather than each into one it made."""
    for blob in blobs:
        blob.diff  # noqa: B018 (the property allocates)
