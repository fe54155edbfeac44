"""`.solverstate` files: Caffe's SolverState (iter, learned_net, history blobs, current_step),
as binary protobuf or, for snapshot_format HDF5, as `.solverstate.h5`.

Written as Caffe's SGDSolver::SnapshotSolverStateToBinaryProto writes them: one BlobProto per
history blob with its shape in `shape.dim` and float32 values in `data` (float64 nets use
`double_data`), in Caffe's order (every param of the first history set, then of the second for
AdaDelta and Adam).  Espresso adds `espresso_resume` (the data cursors, see resume.py), which
Caffe skips.  Files are written atomically (temporary file + rename).
"""

import os

import numpy as np

from espresso.errors import ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import atomic_write, read_binary
from espresso.proto.weights import blob_array, encode_blob

_HISTORY_FIELD = 3  # SolverState.history
_RESUME = "espresso_resume"


def write_state(path, iteration, learned_net, history, current_step, resume=b""):
    """Write a .solverstate; `history` is a list of host (NumPy) arrays in Caffe's order."""
    head = caffe_pb2.SolverState(iter=iteration, learned_net=learned_net).SerializeToString()
    tail = caffe_pb2.SolverState(current_step=current_step, espresso_resume=resume).SerializeToString()

    def write(f):
        f.write(head)
        for array in history:
            f.write(_length_delimited(_HISTORY_FIELD, encode_blob(np.asarray(array))))
        f.write(tail)

    atomic_write(path, write)


def read_state(path):
    """(iter, learned_net, [history arrays], current_step, espresso_resume bytes) from a
    .solverstate file."""
    state = read_binary(path, caffe_pb2.SolverState())
    history = [blob_array(blob, f"{path}: history {i}") for i, blob in enumerate(state.history)]
    return _checked(path, state.iter, state.learned_net, history, state.current_step, state.espresso_resume)


def _checked(path, iteration, learned_net, history, current_step, resume):
    """A state's fields as the solver may take them: counts not negative, the name a text."""
    if iteration < 0 or current_step < 0:
        raise ModelFileError(f"{path}: iter {iteration} and current_step {current_step} must not be negative")
    if not isinstance(learned_net, str):  # protobuf hands over a string field that is not UTF-8 as bytes
        raise ModelFileError(f"{path}: learned_net is not UTF-8 text ({learned_net[:40]!r})")
    return iteration, learned_net, history, current_step, resume


def write_state_hdf5(path, iteration, learned_net, history, current_step, resume=b""):
    """Write a .solverstate.h5 as SGDSolver::SnapshotSolverStateToHDF5: int datasets "iter" and
    "current_step", string "learned_net", and group "history" with "0", "1", ... in Caffe's order;
    and Espresso's "espresso_resume" (bytes), which Caffe does not read."""
    from espresso import hdf5

    def fill(f):
        hdf5.save_int(f, "iter", iteration)
        hdf5.save_string(f, "learned_net", learned_net)
        hdf5.save_int(f, "current_step", current_step)
        group = f.create_group("history")
        for i, array in enumerate(history):
            group.create_dataset(str(i), data=np.asarray(array))
        if resume:
            f.create_dataset(_RESUME, data=np.frombuffer(resume, np.uint8))

    hdf5.write_file(path, fill)


def read_state_hdf5(path):
    """(iter, learned_net or "", [history arrays], current_step, espresso_resume bytes) from a
    .solverstate.h5."""
    from espresso import hdf5

    where = os.fspath(path)
    with hdf5.open_file(path) as f:
        iteration = hdf5.load_int(f, "iter", where)
        learned_net = hdf5.load_string(f, "learned_net", where) if "learned_net" in f else ""
        current_step = hdf5.load_int(f, "current_step", where)
        group = hdf5.member(f, "history", "group", where)
        history = [hdf5.load_array(group, str(i), f"{where}: history") for i in range(len(group))]
        resume = hdf5.load_array(f, _RESUME, where).astype(np.uint8).tobytes() if _RESUME in f else b""
    return _checked(where, iteration, learned_net, history, current_step, resume)


def resolve_learned_net(state_path, learned_net):
    """The .caffemodel a state refers to: as written (Caffe), else beside the state file."""
    if os.path.exists(learned_net):
        return learned_net
    directory = os.path.dirname(os.fspath(state_path))
    for candidate in (os.path.join(directory, learned_net),
                      os.path.join(directory, os.path.basename(learned_net))):
        if os.path.exists(candidate):
            return candidate
    raise ModelFileError(f"{state_path}: learned_net '{learned_net}' not found "
                         f"(looked as given and in '{directory or '.'}')")


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _length_delimited(field, payload):
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload
