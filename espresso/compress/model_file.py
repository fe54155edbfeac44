"""The compressed model file (format version 2; docs/compression.md describes it byte by byte).

    header   magic b"\\x89ESPZ\\r\\n\\x1a" | u16 version | u16 0 | u64 payload length | u32 CRC-32 of payload
    payload  u32 layer count, then per layer: str name, str type, u16 blob count, blobs
    blob     u8 kind, u8 ndim, u32 dims[ndim]; kind 0: float32 values; kind 1: compressed weights;
             kind 2 (version 2): scaled integers; kind 3 (version 2): 16-bit floats
    integers u8 bits (8 or 16), u32 scale count (1, or dims[0]: one per output channel),
             float32 scales[count], float32 input scale (0: none), u8 input zero point (0 or 128),
             signed little-endian values
    16-bit   u8 format (0 IEEE half, 1 bfloat16), the values' bit patterns as u16
    weights  u8 flags (1 sparse, 2 quantized, 4 huffman, 8 int8 input), u8 bits, u8 index bits, u32 entries,
             [float32 input scale, u8 input zero point: with flag 8],
             [float32 codebook[2**bits]], weight stream (codes) or float32 values[entries],
             [position stream (gap - 1 per entry)]
    stream   huffman: u8 code lengths[alphabet], u64 bits, bytes;  fixed: entries * width bits
    str      u16 length, UTF-8

A scaled integer weight is its value times its output channel's scale (fixed point <IL, FL>:
one scale, 2**-FL; int8: one per channel).  An input scale (kind 2, or flag 8 of kind 1) makes
the layer an int8 one: it reads its input as uint8 round(x / scale) + zero point, with the
scale from calibration (espresso/compress/int8.py).  Version 1 files (no kind 2) still load.
All integers little-endian.  A sparse layer stores the flat positions of its entries as gaps
of 1..2**index_bits; a longer gap, or a tail of zeros that long, is bridged with filler
entries of value zero (the paper's scheme), so decoding yields at most (entries + 1) *
2**index_bits weights.  The reader checks every length against the bytes left, the checksum,
and each layer's decoded size against that bound and against `max_elements` before it
allocates, so neither a truncated nor a crafted file can make it read out of bounds or
allocate beyond a fixed multiple of the file's size.
"""

import dataclasses
import math
import os
import struct
import zlib

import numpy as np

from espresso.compress import huffman
from espresso.errors import ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import atomic_write, require_regular
from espresso.proto.weights import write_weights

MAGIC = b"\x89ESPZ\r\n\x1a"
VERSION = 2
READABLE = (1, 2)
_HEADER = struct.Struct("<8sHHQI")
SPARSE, QUANTIZED, HUFFMAN, INT8 = 1, 2, 4, 8
MAX_ELEMENTS = 1 << 30  # weights one file may decode to (4 GiB of float32)


@dataclasses.dataclass
class CompressedWeights:
    """One weight blob in compressed form.  `symbols` per entry: codebook indices (quantized) or
    float32 values; `positions`: flat positions of the entries (None: dense, in order)."""

    shape: tuple
    symbols: np.ndarray
    positions: np.ndarray | None = None
    codebook: np.ndarray | None = None
    bits: int = 32
    index_bits: int = 0
    huffman: bool = True
    input_scale: float = 0.0  # with the zero point below: run as an int8 layer (see the module docstring)
    input_zero: int = 0

    @property
    def count(self):
        return math.prod(self.shape)

    def dense(self, dtype=np.float32):
        values = self.values(dtype)
        if self.positions is None:
            return values.reshape(self.shape)
        out = np.zeros(self.count, dtype)
        out[self.positions] = values
        return out.reshape(self.shape)

    def values(self, dtype=np.float32):
        """Each entry's weight value (fillers included, as zeros)."""
        if self.codebook is None:
            return self.symbols.astype(dtype)
        return self.codebook.astype(dtype)[self.symbols]


@dataclasses.dataclass
class ScaledIntegers:
    """One weight blob as integers times a scale per output channel (or one for all), with the
    input scale an int8 layer quantizes its input by (0.0: none)."""

    values: np.ndarray  # int8 or int16, of the blob's shape
    scales: np.ndarray  # float32, 1 or shape[0] entries
    input_scale: float = 0.0
    input_zero: int = 0

    @property
    def shape(self):
        return tuple(self.values.shape)

    @property
    def count(self):
        return self.values.size

    def dense(self, dtype=np.float32):
        per_row = self.scales.astype(dtype).reshape((-1,) + (1,) * (self.values.ndim - 1))
        return self.values.astype(dtype) * per_row


@dataclasses.dataclass
class HalfFloats:
    """One weight blob as 16-bit floats: `bits` (uint16, of the blob's shape) in `kind`,
    'float16' or 'bfloat16' (espresso/compress/half.py)."""

    bits: np.ndarray
    kind: str = "float16"

    @property
    def shape(self):
        return tuple(self.bits.shape)

    @property
    def count(self):
        return self.bits.size

    def dense(self, dtype=np.float32):
        from espresso.compress.half import from_bits

        return from_bits(self.bits, self.kind).astype(dtype)


HALF_KINDS = ("float16", "bfloat16")


def from_weights(weights, mask=None, codebook=None, index=None, bits=32, index_bits=0, huffman=True):
    """CompressedWeights of `weights`: sparse when index_bits > 0 (keeping `mask`), quantized
    when a codebook and index are given (index 0 must mean zero)."""
    weights = np.asarray(weights)
    shape = tuple(weights.shape)
    keep = (weights != 0) if mask is None else np.asarray(mask, bool)
    if codebook is not None:
        keep = keep & (np.asarray(index) != 0)  # a weight quantized to code 0 is a zero
    positions = _with_fillers(np.flatnonzero(keep), weights.size, 1 << index_bits) if index_bits else None
    take = (lambda a: a.reshape(-1)[positions]) if positions is not None else (lambda a: a.reshape(-1))
    if codebook is not None:
        symbols = take(np.asarray(index)).astype(np.uint8)
        return CompressedWeights(shape, symbols, positions, np.asarray(codebook, np.float32), bits, index_bits, huffman)
    values = take(np.where(keep, weights, 0).astype(np.float32))
    return CompressedWeights(shape, values, positions, None, 32, index_bits, huffman)


def _with_fillers(positions, count, span):
    """Entry positions with filler positions inserted wherever a gap (or the tail) exceeds span."""
    previous = np.concatenate([[-1], positions[:-1]]).astype(np.int64)
    fill = (positions - previous - 1) // span
    fillers = np.repeat(previous, fill) + span * (np.arange(fill.sum()) - np.repeat(np.cumsum(fill) - fill, fill) + 1)
    last = int(positions[-1]) if positions.size else -1
    tail = last + span * np.arange(1, (count - 1 - last) // span + 1)
    return np.sort(np.concatenate([positions, fillers, tail]).astype(np.int64))


# *** writing ***
def write_model(path, layers):
    """Write [(name, type, [np.ndarray | CompressedWeights, ...]), ...] atomically; returns
    {layer name: bytes of its blobs} for the report."""
    sizes, parts = {}, [struct.pack("<I", len(layers))]
    for name, type_, blobs in layers:
        body = [_string(name), _string(type_), struct.pack("<H", len(blobs))]
        body += [_blob(b) for b in blobs]
        sizes[name] = sum(len(p) for p in body[3:])
        parts += body
    payload = b"".join(parts)
    header = _HEADER.pack(MAGIC, VERSION, 0, len(payload), zlib.crc32(payload))
    atomic_write(path, lambda f: (f.write(header), f.write(payload)))
    return sizes


def _string(text):
    data = text.encode()
    return struct.pack("<H", len(data)) + data


def _blob(blob):
    if isinstance(blob, HalfFloats):
        return _dims(3, blob.shape) + struct.pack("<B", HALF_KINDS.index(blob.kind)) + \
            np.ascontiguousarray(blob.bits, "<u2").tobytes()
    if isinstance(blob, ScaledIntegers):
        values = np.ascontiguousarray(blob.values, "<i1" if blob.values.dtype.itemsize == 1 else "<i2")
        return (_dims(2, blob.shape) + struct.pack("<BI", 8 * values.itemsize, blob.scales.size)
                + np.asarray(blob.scales, "<f4").tobytes() + _input(blob) + values.tobytes())
    if isinstance(blob, CompressedWeights):
        return _dims(1, blob.shape) + _weights(blob)
    array = np.ascontiguousarray(blob, "<f4")
    return _dims(0, array.shape) + array.tobytes()


def _input(blob):
    return struct.pack("<fB", blob.input_scale, blob.input_zero)


def _dims(kind, shape):
    return struct.pack(f"<BB{len(shape)}I", kind, len(shape), *shape)


def _weights(cw):
    flags = (SPARSE if cw.positions is not None else 0) | (QUANTIZED if cw.codebook is not None else 0)
    flags |= (HUFFMAN if cw.huffman else 0) | (INT8 if cw.input_scale else 0)
    out = [struct.pack("<BBBI", flags, cw.bits if cw.codebook is not None else 0, cw.index_bits, len(cw.symbols))]
    out += [_input(cw)] if cw.input_scale else []
    if cw.codebook is not None:
        out += [np.asarray(cw.codebook, "<f4").tobytes(), _stream(cw.symbols, cw.bits, cw.huffman)]
    else:
        out.append(np.asarray(cw.symbols, "<f4").tobytes())
    if cw.positions is not None:
        gaps = np.diff(np.concatenate([[-1], cw.positions])) - 1
        out.append(_stream(gaps, cw.index_bits, cw.huffman))
    return b"".join(out)


def _stream(symbols, width, use_huffman):
    symbols = np.asarray(symbols, np.int64)
    if not use_huffman:
        return huffman.pack_fixed(symbols, width)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=1 << width))
    data, nbits = huffman.encode(symbols, lengths)
    return lengths.astype(np.uint8).tobytes() + struct.pack("<Q", nbits) + data


# *** reading ***
def is_compressed(path):
    """Whether the file starts with the compressed-model magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class _Reader:
    def __init__(self, data, name):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFileError(f"{self.name}: corrupt: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt, what):
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, what))

    def string(self, what):
        (n,) = self.unpack("H", what)
        try:
            return bytes(self.take(n, what)).decode()
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.name}: corrupt: {what} is not UTF-8") from None


def read_model(path, max_elements=MAX_ELEMENTS):
    """[(name, type, [np.ndarray | CompressedWeights | ScaledIntegers | HalfFloats, ...]), ...]
    from a compressed model file."""
    name = str(path)
    require_regular(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size or head[:8] != MAGIC:
                raise ModelFileError(f"{name}: not an Espresso compressed model (bad magic bytes or too short)")
            magic, version, _, length, crc = _HEADER.unpack(head)
            if version not in READABLE:
                raise ModelFileError(f"{name}: compressed-model format version {version}; this Espresso reads "
                                     f"versions {', '.join(map(str, READABLE))}")
            payload = f.read(min(length, size) + 1)  # never more than the file holds (a crafted length)
    except ModelFileError:  # (an OSError too: not to be mistaken for a failed read)
        raise
    except OSError as e:
        raise ModelFileError(f"{name}: cannot read: {e.strerror}") from None
    if len(payload) != length:
        raise ModelFileError(f"{name}: truncated or padded: the header declares {length} payload bytes, "
                             f"the file holds {min(len(payload), length)}{'+' if len(payload) > length else ''}")
    if zlib.crc32(payload) != crc:
        raise ModelFileError(f"{name}: corrupt: checksum mismatch (CRC-32 {zlib.crc32(payload):08x}, "
                             f"expected {crc:08x})")
    return _parse(_Reader(memoryview(payload), name), max_elements)


def _parse(r, max_elements):
    (n_layers,) = r.unpack("I", "layer count")
    layers, budget = [], [max_elements]
    for i in range(n_layers):
        lname = r.string(f"layer {i} name")
        ltype = r.string(f"layer '{lname}' type")
        (n_blobs,) = r.unpack("H", f"layer '{lname}' blob count")
        layers.append((lname, ltype, [_read_blob(r, f"layer '{lname}' blob {k}", budget) for k in range(n_blobs)]))
    if r.pos != len(r.data):
        raise ModelFileError(f"{r.name}: corrupt: {len(r.data) - r.pos} bytes after the last layer")
    return layers


def _read_blob(r, what, budget):
    kind, ndim = r.unpack("BB", what)
    if kind not in (0, 1, 2, 3) or ndim > 8:
        raise ModelFileError(f"{r.name}: corrupt: {what}: kind {kind}, {ndim} axes")
    shape = r.unpack(f"{ndim}I", what)
    count = math.prod(shape)
    if count > budget[0]:
        raise ModelFileError(f"{r.name}: {what}: {count} weights exceed the limit of {budget[0]} left")
    budget[0] -= count
    if kind == 0:
        return np.frombuffer(r.take(4 * count, what), "<f4").astype(np.float32).reshape(shape)
    if kind == 2:
        return _read_integers(r, what, tuple(shape), count)
    if kind == 3:
        (form,) = r.unpack("B", what)
        if form >= len(HALF_KINDS):
            raise ModelFileError(f"{r.name}: corrupt: {what}: 16-bit float format {form}")
        bits = np.frombuffer(r.take(2 * count, what + " values"), "<u2").astype(np.uint16).reshape(shape)
        return HalfFloats(bits, HALF_KINDS[form])
    return _read_weights(r, what, tuple(shape), count)


def _read_integers(r, what, shape, count):
    bits, n_scales = r.unpack("BI", what)
    if bits not in (8, 16) or n_scales not in (1, shape[0] if shape else 1):
        raise ModelFileError(f"{r.name}: corrupt: {what}: {bits}-bit integers with {n_scales} scales for {shape}")
    scales = np.frombuffer(r.take(4 * n_scales, what + " scales"), "<f4").astype(np.float32)
    scale, zero = _read_input(r, what)
    values = np.frombuffer(r.take(bits // 8 * count, what + " values"), "<i1" if bits == 8 else "<i2")
    return ScaledIntegers(values.astype(np.int8 if bits == 8 else np.int16).reshape(shape), scales, scale, zero)


def _read_input(r, what):
    scale, zero = r.unpack("fB", what + " input")
    if zero not in (0, 128) or not (scale == 0 or 0 < scale < math.inf):
        raise ModelFileError(f"{r.name}: corrupt: {what}: input scale {scale}, zero point {zero}")
    return scale, zero


def _read_weights(r, what, shape, count):
    flags, bits, index_bits, entries = r.unpack("BBBI", what)
    sparse, quantized, coded = bool(flags & SPARSE), bool(flags & QUANTIZED), bool(flags & HUFFMAN)
    if flags & ~15 or (quantized and not 1 <= bits <= 8) or (sparse and not 1 <= index_bits <= 16):
        raise ModelFileError(f"{r.name}: corrupt: {what}: flags {flags}, {bits} bits, {index_bits} index bits")
    if sparse and count > (entries + 1) << index_bits or entries > count or (not sparse and entries != count):
        raise ModelFileError(f"{r.name}: corrupt: {what}: {entries} entries for shape {shape}")
    scale, zero = _read_input(r, what) if flags & INT8 else (0.0, 0)
    codebook = None
    if quantized:
        codebook = np.frombuffer(r.take(4 << bits, what + " codebook"), "<f4").astype(np.float32)
        symbols = _read_stream(r, bits, entries, coded, what + " weight stream").astype(np.uint8)
    else:
        symbols = np.frombuffer(r.take(4 * entries, what + " values"), "<f4").astype(np.float32)
    positions = None
    if sparse:
        gaps = _read_stream(r, index_bits, entries, coded, what + " position stream")
        positions = np.cumsum(gaps + 1) - 1
        if entries and (positions[-1] >= count or count - 1 - positions[-1] >= 1 << index_bits):
            raise ModelFileError(f"{r.name}: corrupt: {what}: positions do not cover shape {shape}")
    return CompressedWeights(shape, symbols, positions, codebook, bits if quantized else 32, index_bits, coded,
                             scale, zero)


def _read_stream(r, width, count, coded, what):
    if not coded:
        return huffman.unpack_fixed(r.take(-(-count * width // 8), what), width, count)
    lengths = np.frombuffer(r.take(1 << width, what + " table"), np.uint8)
    (nbits,) = r.unpack("Q", what)
    data = r.take(-(-nbits // 8), what)
    return huffman.decode(data, nbits, lengths, count, f"{r.name}: corrupt: {what}")


def to_caffemodel(path, output):
    """Write the model as a .caffemodel (layer names and types, dense float32 weights)."""
    net, blobs = caffe_pb2.NetParameter(), []
    for name, type_, values in read_model(path):
        net.layer.add(name=name, type=type_)
        blobs.append([(v if isinstance(v, np.ndarray) else v.dense(), None) for v in values])
    write_weights(output, net, blobs)
