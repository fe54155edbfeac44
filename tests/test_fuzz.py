"""A fuzz target per reader: mutated copies of a valid file (bytes flipped, cut out, put in)
are read or refused, and only with the project's own errors (EspressoError and its subclasses,
among them ModelFileError, PrototxtError, DatasetError).  Deterministic (seeded), CASES
mutations a reader; ESPRESSO_FUZZ_EXAMPLES raises the count for a long local run.  The
.caffemodel's fuzzing (with hypothesis) is in test_files.py, the compressed model's in
test_compress_file.py."""

import io
import os
from pathlib import Path

import numpy as np
import pytest

import espresso
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.proto.weights import encode_blob

ROOT = Path(__file__).resolve().parents[1]
CASES = int(os.environ.get("ESPRESSO_FUZZ_EXAMPLES", 150))


def mutations(data, seed, count=CASES):
    """`count` mutated copies of `data`: one to three byte flips, cuts or insertions each."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        out = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            at, kind = int(rng.integers(max(len(out), 1))), rng.integers(3)
            if kind == 0 and out:
                out[at] ^= 1 << int(rng.integers(8))
            elif kind == 1:
                del out[at:at + int(rng.integers(1, 16))]
            else:
                out[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        yield bytes(out)


def fuzz(tmp_path, name, valid, read, seed):
    """Every mutation of `valid`, written to tmp_path/name, is read or refused with an EspressoError."""
    path, refused = tmp_path / name, 0
    read_ok = read(_write(path, valid))  # the valid file reads
    assert read_ok is not False
    for data in mutations(valid, seed):
        try:
            read(_write(path, data))
        except EspressoError:
            refused += 1
    return refused


def _write(path, data):
    path.write_bytes(data)
    return path


def _state():
    state = caffe_pb2.SolverState(iter=100, learned_net="lenet_iter_100.caffemodel", current_step=1)
    state.history.add().ParseFromString(encode_blob(np.arange(6, dtype=np.float32).reshape(2, 3)))
    return state.SerializeToString()


def _mean():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 3, 2, 2])
    blob.data.extend(np.linspace(0, 1, 12).tolist())
    return blob.SerializeToString()


def test_prototxt_reader(tmp_path):
    valid = (ROOT / "examples" / "lenet" / "lenet_deploy.prototxt").read_bytes()
    fuzz(tmp_path, "net.prototxt", valid, lambda p: espresso.Net(str(p), espresso.TEST), seed=1)


def test_solver_prototxt_reader(tmp_path):
    valid = (ROOT / "examples" / "lenet" / "lenet_solver.prototxt").read_bytes()
    fuzz(tmp_path, "solver.prototxt", valid, espresso.solver.read_solver_param, seed=2)


def test_solverstate_reader(tmp_path):
    from espresso.solver.state import read_state

    fuzz(tmp_path, "s.solverstate", _state(), read_state, seed=3)


def test_binaryproto_reader(tmp_path):
    from espresso.io import read_blobproto

    fuzz(tmp_path, "mean.binaryproto", _mean(), read_blobproto, seed=4)


def test_hdf5_reader(tmp_path):
    pytest.importorskip("h5py")
    net = espresso.Net(str(ROOT / "examples" / "lenet" / "lenet_deploy.prototxt"), espresso.TEST)
    net.save_hdf5(str(tmp_path / "valid.caffemodel.h5"))
    valid = (tmp_path / "valid.caffemodel.h5").read_bytes()
    fuzz(tmp_path, "w.caffemodel.h5", valid, lambda p: net.load_hdf5(str(p)), seed=5)


def test_datum_reader():
    from espresso.data.db import decode_datum, make_datum

    valid = make_datum(np.arange(12, dtype=np.uint8).reshape(3, 2, 2), 7).SerializeToString()
    for data in mutations(valid, seed=6):
        try:
            decode_datum(data)
        except EspressoError:
            pass


def test_idx_reader(tmp_path):
    from espresso.data.idx import read_idx, write_idx

    write_idx(tmp_path / "valid.idx", np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    fuzz(tmp_path, "images.idx", (tmp_path / "valid.idx").read_bytes(), read_idx, seed=7)


def test_image_reader():
    Image = pytest.importorskip("PIL.Image")
    from espresso.data.image import decode_image

    png = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(png, "PNG")
    for data in mutations(png.getvalue(), seed=8):
        try:
            decode_image(data)
        except EspressoError:
            pass


def test_resume_cursor_reader(tmp_path):
    """A snapshot's espresso_resume (the data cursors of Data, ImageData and HDF5Data layers),
    mutated as bytes and as JSON values, is taken or refused, and only with the project's errors."""
    import json
    import types
    import warnings

    from test_resume import write_hdf5, write_images, write_lmdb

    from espresso.solver import resume

    pytest.importorskip("PIL")
    images, hdf5 = write_images(tmp_path), write_hdf5(tmp_path)
    net = espresso.Net(parse_text(f"""
        layer {{ name: "d" type: "Data" top: "d" transform_param {{ mirror: true }}
                 data_param {{ source: "{write_lmdb(tmp_path / 'db')}" backend: LMDB batch_size: 4 }} }}
        layer {{ name: "i" type: "ImageData" top: "i" top: "il"
                 image_data_param {{ {images} batch_size: 3 shuffle: true }} }}
        layer {{ name: "h" type: "HDF5Data" top: "data" top: "label" {hdf5} }}""", caffe_pb2.NetParameter()),
        espresso.TRAIN)
    solver = types.SimpleNamespace(net=net, test_nets=[], root=True, extras={})
    net.forward()
    valid = resume.save_cursors(solver)
    rng = np.random.default_rng(10)
    cases = [*mutations(valid, seed=9, count=CASES // 2),
             *(json.dumps(_mutated_json(json.loads(valid), rng)).encode() for _ in range(CASES // 2))]
    refused = 0
    for payload in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a cursor of another dataset's size is set aside
                resume.restore_cursors(solver, payload, "s.solverstate")
            net.forward()
        except EspressoError:
            refused += 1
    assert refused >= CASES // 2


def _mutated_json(value, rng):
    """`value` with one leaf (or a whole branch) replaced by a value of another kind or range."""
    if isinstance(value, (dict, list)) and value and rng.random() < 0.85:
        keys = list(value) if isinstance(value, dict) else range(len(value))
        key = list(keys)[int(rng.integers(len(keys)))]
        value[key] = _mutated_json(value[key], rng)
        return value
    odd = [None, -1, 0, 1, 2**70, 1.5, "x", True, [], {}, [0, 0], list(range(20))]
    return odd[int(rng.integers(len(odd)))]
