"""Caffe's HDF5 building blocks (util/hdf5.cpp) for the .caffemodel.h5 weights
(Net.save_hdf5/load_hdf5).

As Caffe writes them, a blob is a dataset of the blob's shape in the net's float type.  h5py is
imported only when used.
"""

import os
import tempfile

from espresso.data import require
from espresso.errors import ModelFileError


def h5py():
    return require("h5py", "HDF5 weights and snapshots (.h5)")


def write_file(path, fill):
    """Create an HDF5 file with `fill(file)`, through a temporary beside it and a rename, as
    every Espresso file is written: a crash never leaves half a snapshot."""
    h5 = h5py()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        with h5.File(tmp, "w") as f:
            fill(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def open_file(path):
    h5 = h5py()
    try:
        return h5.File(path, "r")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open as an HDF5 file ({e})") from None


def dataset(group, name, where):
    if not isinstance(group.get(name), h5py().Dataset):
        raise ModelFileError(f"{where}: no dataset '{name}'")
    return group[name]


def load_array(group, name, where):
    """A float or integer dataset as a NumPy array (Caffe's hdf5_load_nd_dataset refuses the rest)."""
    data = dataset(group, name, where)
    if data.dtype.kind not in "fiu":
        raise ModelFileError(f"{where}: dataset '{name}' holds {data.dtype}, not numbers")
    return data[()]
