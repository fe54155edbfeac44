"""Caffe's HDF5 building blocks (util/hdf5.cpp), shared by the .caffemodel.h5 weights
(Net.save_hdf5/load_hdf5) and the .solverstate.h5 snapshots (espresso/solver/state.py).

As Caffe writes them: an int is a 1-D dataset of one native int (H5LTmake_dataset_int); a
string a scalar, null-terminated ASCII string of its length + 1 (H5LTmake_dataset_string); a
blob a dataset of the blob's shape in the net's float type.  h5py is imported only when used.
"""

import contextlib
import math

import numpy as np

from espresso import backend
from espresso.data import require
from espresso.errors import MemoryLimitError, ModelFileError
from espresso.proto.text import atomic_write, require_regular
from espresso.runtime import format_bytes, memory_limit


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


@contextlib.contextmanager
def open_file(path):
    """The HDF5 file, read in the `with` block; what h5py raises on a corrupt file, there or
    in the block, ends as a ModelFileError naming the file."""
    h5 = h5py()
    require_regular(path)
    try:
        f = h5.File(path, "r")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open as an HDF5 file ({e})") from None
    try:
        with f:
            yield f
    except ModelFileError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py on damaged structures
        raise ModelFileError(f"{path}: corrupt HDF5 file ({type(e).__name__}: {e})") from None


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


def member(group, name, kind, where):
    """group[name] where it is a `kind` ("group" or "dataset") of this file: an external link is
    not followed, a link that resolves nowhere (or loops) is refused, as is the other kind."""
    h5 = h5py()
    link = group.get(name, getlink=True)
    if link is None:
        raise ModelFileError(f"{where}: no {kind} '{name}'")
    if isinstance(link, h5.ExternalLink):
        raise ModelFileError(f"{where}: '{name}' links to another file ({link.filename}); not followed")
    try:
        found = group[name]
    except (KeyError, RuntimeError, OSError) as e:  # a dangling or looping soft link
        raise ModelFileError(f"{where}: '{name}' cannot be resolved ({e})") from None
    if not isinstance(found, h5.Group if kind == "group" else h5.Dataset):
        raise ModelFileError(f"{where}: '{name}' is not a {kind}")
    return found


def dataset(group, name, where):
    return member(group, name, "dataset", where)


def load_array(group, name, where):
    """A float or integer dataset as a NumPy array (Caffe's hdf5_load_nd_dataset refuses the rest),
    refused before reading when it would not fit the memory limit (a small file may declare a
    huge dataset)."""
    data = dataset(group, name, where)
    if data.dtype.kind not in "fiu":
        raise ModelFileError(f"{where}: dataset '{name}' holds {data.dtype}, not numbers")
    nbytes, limit = math.prod(data.shape) * data.dtype.itemsize, memory_limit(backend.get("cpu"))
    if nbytes > limit:
        raise MemoryLimitError(f"{where}: dataset '{name}' of shape {data.shape} needs {format_bytes(nbytes)}, "
                               f"more than the {format_bytes(limit)} limit")
    return data[()]
