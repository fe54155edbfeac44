"""Caffe's HDF5 building blocks (util/hdf5.cpp), shared by the .caffemodel.h5 weights
(Net.save_hdf5/load_hdf5) and the .solverstate.h5 snapshots (espresso/solver/state.py).

As Caffe writes them: an int is a 1-D dataset of one native int (H5LTmake_dataset_int); a
string a scalar, null-terminated ASCII string of its length + 1 (H5LTmake_dataset_string); a
blob a dataset of the blob's shape in the net's float type.  h5py is imported only when used.
"""

import numpy as np

from espresso.data import require
from espresso.errors import ModelFileError
from espresso.proto.text import atomic_write, require_regular


def h5py():
    return require("h5py", "HDF5 weights and snapshots (.h5)")


def write_file(path, fill):
    """Create an HDF5 file with `fill(file)`, through a temporary beside it and a rename, as
    every Espresso file is written: a crash never leaves half a snapshot."""
    h5 = h5py()

    def write(stream):
        with h5.File(stream, "w") as f:
            fill(f)

    atomic_write(path, write)


def open_file(path):
    h5 = h5py()
    require_regular(path)
    try:
        return h5.File(path, "r")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open as an HDF5 file ({e})") from None


def save_int(group, name, value):
    group.create_dataset(name, data=np.array([value], np.int32))


def save_string(group, name, text):
    h5, raw = h5py(), text.encode() + b"\0"
    # h5py's own strings are null-padded; Caffe's reader wants its null terminator
    kind = h5.h5t.C_S1.copy()
    kind.set_size(len(raw))
    kind.set_strpad(h5.h5t.STR_NULLTERM)
    dataset = h5.h5d.create(group.id, name.encode(), kind, h5.h5s.create(h5.h5s.SCALAR))
    dataset.write(h5.h5s.ALL, h5.h5s.ALL, np.array(raw, f"S{len(raw)}"))


def load_int(group, name, where):
    return int(np.asarray(dataset(group, name, where)).ravel()[0])


def load_string(group, name, where):
    return dataset(group, name, where)[()].split(b"\0")[0].decode()  # h5py gives bytes, fixed or variable


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
