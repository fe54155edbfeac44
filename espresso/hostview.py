"""pycaffe's `blob.data` / `blob.diff` as host (NumPy) arrays when the net lives on a GPU.

Layers work on device arrays (`Blob.data` is an array of the backend's `xp`).  Python code that
uses pycaffe's surface (`net.blobs[...]`, `net.params[...]`) gets these views instead, which
behave like Caffe's SyncedMemory as pycaffe sees it: reading `.data` hands out a host copy
(kept until the net next runs, so repeated accesses see one array), and whatever the user
changed in it reaches the device before the net's next use.  One HostSync serves every net on
a backend, so a write through one net's view of weights shared with another (the solver's test
nets share the train net's) reaches the device before either runs.  On the CPU backend nets
hand out their Blobs directly and none of this runs.
"""

import numpy as np

_SYNCS = {}  # backend -> its HostSync


def host_sync(backend):
    """The HostSync of every net on `backend`."""
    return _SYNCS.setdefault(backend, HostSync())


class HostSync:
    """The host copies handed out since a net last ran; changed ones are written back."""

    def __init__(self):
        self.pending = {}  # (id(blob), "data"/"diff") -> (blob, which, host array, original)

    def host(self, blob, which):
        key = (id(blob), which)
        if key not in self.pending:
            array = np.array(blob.backend.to_host(getattr(blob, which)))
            self.pending[key] = (blob, which, array, array.copy())
        return self.pending[key][2]

    def drop(self, blob):
        for which in ("data", "diff"):
            self.pending.pop((id(blob), which), None)

    def flush(self):
        """Copy user changes to the device; later reads download fresh values."""
        for blob, which, array, original in self.pending.values():
            if not np.array_equal(array, original, equal_nan=True):
                getattr(blob, which)[...] = blob.backend.to_device(array, blob.dtype)
        self.pending.clear()


class HostView:
    """A device Blob as pycaffe shows it: `.data`/`.diff` are NumPy arrays (see HostSync)."""

    def __init__(self, blob, sync):
        self.blob, self._sync = blob, sync

    @property
    def data(self):
        return self._sync.host(self.blob, "data")

    @property
    def diff(self):
        return self._sync.host(self.blob, "diff")

    def reshape(self, *shape):
        self._sync.drop(self.blob)  # host copies of the old shape are void
        self.blob.reshape(*shape)

    def __getattr__(self, name):  # shape, count, num, channels, host_data, ...
        return getattr(self.blob, name)

    def __repr__(self):
        return f"HostView({self.blob!r})"
