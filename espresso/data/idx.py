"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Layout: a 4-byte magic 0x00 0x00 <type> <ndim>, then ndim big-endian uint32 sizes, then the
values, big-endian, row-major.  MNIST images are type 0x08 (uint8) with 3 dims (magic 2051),
labels type 0x08 with 1 dim (magic 2049).
"""

import gzip
import io
import os
import zlib

import numpy as np

from espresso import backend
from espresso.data import DatasetError
from espresso.proto.text import require_regular
from espresso.runtime import format_bytes, memory_limit

# IDX type byte -> big-endian NumPy dtype
_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _read_bytes(path):
    require_regular(path, DatasetError)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        limit = memory_limit(backend.get("cpu"))
        try:  # bounded: a small gzip stream may unpack to more than the machine has
            stream = zlib.decompressobj(wbits=31)
            data = stream.decompress(raw, limit + 1)
        except zlib.error as e:
            raise DatasetError(f"{path}: corrupt gzip stream: {e}") from None
        if len(data) > limit:
            raise DatasetError(f"{path}: unpacks to more than the {format_bytes(limit)} memory limit")
        return data
    return raw


def read_idx(path, expect_magic=None):
    """The array stored in an IDX file, in native byte order (uint8 for MNIST files)."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    magic, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    if expect_magic is not None and magic != expect_magic:
        raise DatasetError(f"{path}: magic number {magic}, expected {expect_magic}")
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _TYPES[raw[2]]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path}: {len(raw)} bytes, but the header {dims} promises {expected} "
                           "(truncated or corrupt)")
    values = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path, array):
    """Write `array` as an IDX file; gzip-compressed (reproducibly, mtime 0) if `path` ends in .gz."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DatasetError(f"{path}: IDX cannot store dtype {array.dtype}")
    out = io.BytesIO()
    out.write(bytes([0, 0, code, array.ndim]))
    for d in array.shape:
        out.write(int(d).to_bytes(4, "big"))
    out.write(np.ascontiguousarray(array, _TYPES[code]).tobytes())
    data = out.getvalue()
    with open(path, "wb") as f:
        if os.fspath(path).endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
                gz.write(data)
        else:
            f.write(data)


def read_mnist(images_path, labels_path):
    """(images uint8 (N, rows, cols), labels uint8 (N,)) from an MNIST-format IDX pair."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{images_path}, {labels_path}: expected N x rows x cols images and N labels, "
                           f"got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} "
                           f"holds {len(labels)} labels")
    return images, labels
