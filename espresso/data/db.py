"""LMDB databases of Caffe Datum records (Caffe's db_lmdb.cpp and the Datum helpers of io.cpp).

Records are read in key order; Caffe's converters key them "%08d" (or "%08d_<file>") so that
key order is insertion order.  A Datum holds channels, height, width, the pixels as uint8 bytes
in `data` (C x H x W, BGR for colour images) or as `float_data`, a `label`, and `encoded` when
`data` is a compressed image file.  LevelDB, Caffe's other backend, is not supported.
"""

import os
import threading

import numpy as np

from espresso.data import DatasetError, require
from espresso.proto import caffe_pb2

COMMIT_EVERY = 1000  # records per write transaction, as Caffe's converters


def _lmdb():
    return require("lmdb", "reading and writing LMDB databases")


def _lmdb_layout(path):
    """True if `path` is an LMDB directory, False if a single-file LMDB; errors say what it is."""
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such LMDB database (the path does not exist)")
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, "data.mdb")):
        return True
    names = os.listdir(path)
    if "CURRENT" in names or any(n.endswith((".ldb", ".sst")) for n in names):
        raise DatasetError(f"{path}: is a LevelDB database; Espresso reads LMDB only "
                           "(rebuild it as LMDB: Caffe's converters with --backend=lmdb, or espresso.data.convert)")
    raise DatasetError(f"{path}: not an LMDB database (the directory has no data.mdb)")


class _Environments:
    """LMDB allows one open environment per database per process: readers of one database (a
    train and a test net, two solvers) share it, and the last to close closes it."""

    def __init__(self):
        self.open, self.lock = {}, threading.Lock()  # real path -> [environment, readers]

    def acquire(self, path, subdir):
        lmdb, key = _lmdb(), os.path.realpath(path)
        with self.lock:
            if key not in self.open:
                # lock=False: readers never write the lock file, so read-only datasets work
                self.open[key] = [lmdb.open(path, subdir=subdir, readonly=True, lock=False, max_dbs=0), 0]
            self.open[key][1] += 1
            return self.open[key][0]

    def release(self, env):
        with self.lock:
            key = next(key for key, (open_env, _) in self.open.items() if open_env is env)
            self.open[key][1] -= 1
            if self.open[key][1] == 0:
                del self.open[key]
                env.close()


_ENVIRONMENTS = _Environments()


class LMDBReader:
    """Read-only access to an LMDB: `len`, `first()`, `items()` in key order, `cycle()`."""

    def __init__(self, path):
        lmdb, self.path, self.env = _lmdb(), os.fspath(path), None
        subdir = _lmdb_layout(self.path)
        try:
            self.env = _ENVIRONMENTS.acquire(self.path, subdir)
            self.entries = self.env.stat()["entries"]
        except lmdb.Error as e:
            self.close()
            raise DatasetError(f"{self.path}: not a readable LMDB database: {e}") from None
        if self.entries == 0:
            self.close()
            raise DatasetError(f"{self.path}: the database is empty")

    def __len__(self):
        return self.entries

    def first(self):
        """(key, value) of the first record."""
        return next(self.items())

    def items(self):
        """Every (key, value) in key order, in one read transaction."""
        with self.env.begin(buffers=False) as txn:
            yield from txn.cursor()

    def cycle(self, skip=0):
        """Values forever in key order, wrapping around at the end (Caffe's DataLayer::Next),
        starting `skip` records in."""
        while True:
            for key, value in self.items():
                if skip:
                    skip -= 1
                    continue
                yield key, value

    def close(self):
        if self.env is not None:
            _ENVIRONMENTS.release(self.env)
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LMDBWriter:
    """A new LMDB written in transactions of COMMIT_EVERY records; the map grows as needed.

    As Caffe's converters, it refuses to write into an existing path.
    """

    def __init__(self, path, map_size=1 << 28):
        lmdb, self.path = _lmdb(), os.fspath(path)
        if os.path.exists(self.path):
            raise DatasetError(f"{self.path}: already exists; remove it or choose another name")
        self.env = lmdb.open(self.path, map_size=map_size, subdir=True, meminit=False)
        self.pending, self.count = [], 0

    def put(self, key, value):
        """Add a record: key str or bytes, value a Datum or bytes."""
        key = key.encode() if isinstance(key, str) else bytes(key)
        value = value.SerializeToString() if hasattr(value, "SerializeToString") else bytes(value)
        self.pending.append((key, value))
        if len(self.pending) >= COMMIT_EVERY:
            self.commit()

    def commit(self):
        lmdb = _lmdb()
        while self.pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
            except lmdb.MapFullError:  # the transaction was aborted: grow the map and redo it
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                continue
            self.count += len(self.pending)
            self.pending = []

    def close(self):
        self.commit()
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.env.close()


# *** Datum records ***
def make_datum(chw, label=0):
    """A Datum from a C x H x W array: uint8 goes to `data` bytes, anything else to `float_data`."""
    chw = np.asarray(chw)
    if chw.ndim != 3:
        raise DatasetError(f"a Datum holds C x H x W arrays, got shape {chw.shape}")
    datum = caffe_pb2.Datum(channels=chw.shape[0], height=chw.shape[1], width=chw.shape[2], label=int(label))
    if chw.dtype == np.uint8:
        datum.data = chw.tobytes()
    else:
        datum.float_data.extend(chw.astype(np.float32).ravel().tolist())
    return datum


def encoded_datum(image_bytes, label=0):
    """A Datum holding a compressed image file (Caffe's ReadFileToDatum: no dimensions set)."""
    return caffe_pb2.Datum(data=bytes(image_bytes), label=int(label), encoded=True)


def parse_datum(value, what="record"):
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception:  # protobuf's DecodeError; only proto/ imports protobuf itself
        raise DatasetError(f"{what}: not a Datum record") from None
    return datum


def decode_datum(value, color=None, what="record"):
    """(C x H x W array, label) of a serialized Datum: uint8 from `data` (decoded if `encoded`;
    color None keeps the file's channels, True forces BGR, False grey), else float32 from
    `float_data`."""
    datum = parse_datum(value, what)
    if datum.encoded:
        from espresso.data.image import decode_image

        return decode_image(datum.data, color, what), datum.label
    shape = (datum.channels, datum.height, datum.width)
    size = int(np.prod(shape))
    if len(datum.data):
        array = np.frombuffer(datum.data, np.uint8)
    else:
        array = np.array(datum.float_data, np.float32)
    if array.size != size or size == 0:
        raise DatasetError(f"{what}: Datum of shape {shape} holds {array.size} values")
    return array.reshape(shape), datum.label
