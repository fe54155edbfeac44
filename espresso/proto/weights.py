"""Memory-lean .caffemodel reading and writing.

A .caffemodel is a NetParameter whose layers carry their weights as BlobProto messages.  Parsing
it whole through protobuf holds the file, the message and then the arrays (3x the weights), and
some protobuf builds refuse messages over 64 MB.  Here the file is memory-mapped and walked at the
wire level: every layer's small fields go through protobuf, while each packed weight array is
returned as a zero-copy NumPy view of the mapping.  Writing streams the arrays straight from
their memory to the file, and lays fields out in protobuf's own order, so the bytes are the ones
protobuf would write.

Wire facts used (protobuf encoding): tag = field << 3 | wire type; wire types 0 varint,
1 fixed64, 2 length-delimited, 5 fixed32; a packed repeated field may come in several pieces,
which concatenate.  Field numbers are caffe.proto's: NetParameter.layer 100, .layers 2 (V1);
LayerParameter.blobs 7; V1LayerParameter.blobs 6, .layer 1 (V0, whose blobs are 50);
BlobProto num 1, channels 2, height 3, width 4, data 5, diff 6, shape 7, double_data 8,
double_diff 9; BlobShape.dim 1.
"""

import math
import mmap

import numpy as np

from espresso.errors import ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import atomic_write, require_regular

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# field number in the parent -> (message type, its blobs field, its nested-layer field or None)
_LAYER_FIELDS = {100: (caffe_pb2.LayerParameter, 7, None), 2: (caffe_pb2.V1LayerParameter, 6, 1)}
_V0_LAYER = (caffe_pb2.V0LayerParameter, 50, None)
_DATA, _DOUBLE_DATA = 5, 8


class _Truncated(Exception):
    pass


# *** reading ***
def _varint(buf, pos, end):
    result = shift = 0
    while True:
        if pos >= end:
            raise _Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ModelFileError("varint too long")


def _fields(buf, pos, end):
    """Yield (field number, wire type, field start, value start, value end) for each field."""
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        start = pos
        if wire == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH:
            length, start = _varint(buf, pos, end)
            pos = start + length
        else:
            raise ModelFileError(f"unsupported wire type {wire} in field {field}")
        if pos > end or field == 0:
            raise _Truncated
        yield field, wire, field_start, start, pos


def wire_fields(buf, start=0, end=None):
    """(field number, wire type, field start, value start, value end) of each field of the
    message serialized in buf[start:end] (another format's, such as ONNX's, too)."""
    try:
        yield from _fields(buf, start, len(buf) if end is None else end)
    except _Truncated:
        raise ModelFileError("a message ends before its last field does (the file is truncated)") from None


def length_field(field, payload):
    """The bytes of a length-delimited field (a message or bytes) holding `payload`."""
    return _length_field(field, payload)


def _blob_array(buf, start, end):
    """A BlobProto's values as an array view of `buf`, shaped by its shape or legacy dims.

    Returns (array, legacy): legacy is True when the blob gave num/channels/height/width.
    """
    legacy, shape, runs = {}, [], {_DATA: [], _DOUBLE_DATA: []}
    for field, wire, _, s, e in _fields(buf, start, end):
        if field in (1, 2, 3, 4) and wire == _VARINT:
            legacy[field] = _varint(buf, s, e)[0]
        elif field == 7 and wire == _LENGTH:  # several shape fields merge, as protobuf merges them
            shape += [d for f, w, _, ds, de in _fields(buf, s, e) if f == 1 for d in _dims(buf, w, ds, de)]
        elif field in runs and wire == _LENGTH:  # packed float data / double_data
            runs[field].append((s, e))
        elif field in runs:  # unpacked repeated values: rare, let protobuf decode them
            return _blob_via_protobuf(buf, start, end)
    # Caffe's Blob::FromProto: double_data wins when present; legacy dims win over shape.
    field = _DOUBLE_DATA if any(s < e for s, e in runs[_DOUBLE_DATA]) else _DATA
    if len(runs[field]) > 1:  # a packed field split in pieces: rare, let protobuf join them
        return _blob_via_protobuf(buf, start, end)
    values = _packed(buf, runs[field][0] if runs[field] else (start, start), "<f8" if field == 8 else "<f4")
    if legacy:
        shape = [legacy.get(i, 0) for i in (1, 2, 3, 4)]
    return _shaped(values, shape), bool(legacy)


def _packed(buf, run, code):
    start, end = run
    size = np.dtype(code).itemsize
    if (end - start) % size:
        raise ModelFileError(f"packed {code} data of {end - start} bytes is not a whole number of values")
    return np.frombuffer(buf, code, (end - start) // size, start)


def _shaped(values, shape):
    if any(d >= 2**63 for d in shape):  # an int64 dim read as unsigned: it was negative
        signed = tuple(d - 2**64 if d >= 2**63 else d for d in shape)
        raise ModelFileError(f"blob has a negative dimension in {signed}")
    if math.prod(shape) != values.size:
        raise ModelFileError(f"blob of shape {tuple(shape)} holds {values.size} values")
    return values.reshape(shape)


def _dims(buf, wire, start, end):
    if wire == _VARINT:
        return [_varint(buf, start, end)[0]]
    if wire != _LENGTH:
        raise ModelFileError(f"blob shape dim has wire type {wire}")
    dims, pos = [], start
    while pos < end:
        d, pos = _varint(buf, pos, end)
        dims.append(d)
    return dims


def _blob_via_protobuf(buf, start, end):
    blob = caffe_pb2.BlobProto.FromString(bytes(buf[start:end]))
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = [blob.num, blob.channels, blob.height, blob.width] if legacy else list(blob.shape.dim)
    if any(d < 0 for d in shape):
        raise ModelFileError(f"blob has a negative dimension in {tuple(shape)}")
    if blob.double_data:
        values = np.array(blob.double_data, np.float64)
    else:
        values = np.array(blob.data, np.float32)
    return _shaped(values, shape), legacy


def _layer(buf, start, end, message_type, blobs_field, nested_field):
    """One layer: its parameters (blobs left out) and its weight arrays.

    A V1 entry may wrap a V0 layer (field 1) that holds the blobs; they come back as the
    V1 entry's arrays, and the V0 layer without them.
    """
    rest, arrays = bytearray(), []
    for field, wire, f0, s, e in _fields(buf, start, end):
        if field == blobs_field and wire == _LENGTH:
            arrays.append(_blob_array(buf, s, e))
        elif field == nested_field and wire == _LENGTH:
            v0, v0_arrays = _layer(buf, s, e, *_V0_LAYER)
            rest += _length_field(field, v0.SerializeToString())
            arrays += v0_arrays
        else:
            rest += buf[f0:e]
    return message_type.FromString(bytes(rest)), arrays


def read_weights(path):
    """Parse a .caffemodel: a NetParameter without blobs, and per layer a list of (array, legacy).

    `layer_blobs[i]` belongs to the i-th entry of `net.layer`, or of `net.layers` in an old V1
    file (a file never holds both in practice; if it does, `layer` entries come first).
    Arrays are read-only views of a memory map of the file: copy them where they belong.
    Old nets come back as they are (`layers` entries, V0 layers inside them); the caller
    upgrades them with `upgrade_net(net, layer_blobs)`, which keeps the arrays aligned.
    """
    require_regular(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if _size(f) else b""
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if _looks_like_text(buf):
        raise ModelFileError(f"{path}: looks like text (a prototxt?), not a binary .caffemodel")
    try:
        return _read_net(buf)
    except _Truncated:
        raise ModelFileError(f"{path}: truncated or corrupt .caffemodel") from None
    except ModelFileError as e:
        raise ModelFileError(f"{path}: corrupt .caffemodel: {e}") from None
    except Exception as e:  # protobuf's DecodeError and friends on a damaged layer
        raise ModelFileError(f"{path}: corrupt .caffemodel ({type(e).__name__}: {e})") from None


def _looks_like_text(buf):
    """A binary NetParameter starts with a field key byte (0x0a name, 0x12/0x1a/... layers) and
    soon holds bytes outside printable text; a prototxt's first 512 bytes are all text."""
    head = bytes(buf[:512])
    return bool(head) and all(32 <= b < 127 or b in b"\t\n\r" for b in head)


def blob_array(blob, where, diff=False):
    """A BlobProto message's data (or diff) as a NumPy array of its shape, float32 or float64 as
    stored; as Caffe's Blob::FromProto, legacy num/channels/height/width win over shape.dim.
    Refused: negative dimensions, both float and double values, a count that does not fit."""
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    if any(d < 0 for d in shape):
        raise ModelFileError(f"{where}: negative dimension in shape {shape}")
    single, double = (blob.diff, blob.double_diff) if diff else (blob.data, blob.double_data)
    if len(single) and len(double):
        raise ModelFileError(f"{where}: holds both float and double {'diff' if diff else 'data'}")
    with np.errstate(over="ignore", invalid="ignore"):  # a damaged value stays the float the file holds
        values = np.asarray(double, np.float64) if len(double) else np.asarray(single, np.float32)
    if values.size != math.prod(shape):
        raise ModelFileError(f"{where}: {values.size} values for shape {shape}")
    return values.reshape(shape)


def release(arrays):
    """Let the kernel drop the file pages behind `arrays` (views from read_weights, or
    (array, legacy) pairs) once they have been copied.

    Mapped pages count in the process's memory until the map closes, so copying every array
    of a 600 MB file into a net would peak at twice the weights; releasing each piece after
    copying it keeps the peak near 1x.  The arrays stay valid: reading them again faults the
    pages back in from the file.  Arrays not backed by the map are left alone.
    """
    for item in arrays:
        array = item[0] if isinstance(item, tuple) else item
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        if not (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap) and array.size):
            continue
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on this platform: nothing to do
            return
        start = array.ctypes.data - np.frombuffer(base, np.uint8, 1).ctypes.data
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the array only
        last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            base.obj.madvise(mmap.MADV_DONTNEED, first, last - first)


def _size(f):
    f.seek(0, 2)
    return f.tell()


def _read_net(buf):
    if not len(buf):
        raise ModelFileError("empty file")
    view = memoryview(buf)
    net, rest = caffe_pb2.NetParameter(), bytearray()
    blobs = {100: [], 2: []}
    for field, wire, f0, s, e in _fields(view, 0, len(buf)):
        if field in _LAYER_FIELDS and wire == _LENGTH:
            layer, arrays = _layer(view, s, e, *_LAYER_FIELDS[field])
            (net.layer if field == 100 else net.layers).append(layer)
            blobs[field].append(arrays)
        else:
            rest += view[f0:e]
    net.MergeFromString(bytes(rest))
    return net, blobs[100] + blobs[2]


# *** writing ***
def _encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _header(field, length):
    return _encode_varint(field << 3 | _LENGTH) + _encode_varint(length)


def _length_field(field, payload):
    return _header(field, len(payload)) + payload


def _size_of(chunks):
    return sum(c.nbytes if isinstance(c, np.ndarray) else len(c) for c in chunks)


def _packed_chunks(field, array, code):
    """A packed repeated field as [header, array]; nothing for an empty array, as protobuf."""
    values = np.ascontiguousarray(array, code).reshape(-1)  # no copy when already contiguous <f4/<f8
    return [_header(field, values.nbytes), values] if values.size else []


def _blob_chunks(array, diff=None):
    """BlobProto pieces (bytes, and arrays written from their own memory) in field-number order:
    float32 -> data 5, diff 6, shape 7; float64 -> shape 7, double_data 8, double_diff 9."""
    array = np.asarray(array)
    field, code = (_DOUBLE_DATA, "<f8") if array.dtype == np.float64 else (_DATA, "<f4")
    values = _packed_chunks(field, array, code)
    if diff is not None:
        values += _packed_chunks(field + 1, diff, code)
    dims = b"".join(_encode_varint(int(d)) for d in array.shape)
    shape = [_length_field(7, _length_field(1, dims) if dims else b"")]
    return shape + values if field == _DOUBLE_DATA else values + shape


def encode_blob(array, diff=None):
    """BlobProto bytes for `array` (float32 -> data, float64 -> double_data), as Caffe writes them."""
    return b"".join(c.tobytes() if isinstance(c, np.ndarray) else c for c in _blob_chunks(array, diff))


def _layer_chunks(layer, blobs):
    """LayerParameter pieces with the blobs (field 7) spliced in field-number order, after any
    blobs the message itself already holds."""
    body = layer.SerializeToString()
    split = next((f0 for f, _, f0, _, _ in _fields(body, 0, len(body)) if f > 7), len(body))
    chunks = [body[:split]]
    for blob in blobs:
        pieces = _blob_chunks(*blob)
        chunks += [_header(7, _size_of(pieces))] + pieces
    return chunks + [body[split:]]


def write_weights(path, net, layer_blobs):
    """Write a .caffemodel atomically: `net` holds the layers (normally without blobs) and
    `layer_blobs[i]` is a list of (data, diff-or-None) arrays for net.layer[i]."""
    if len(layer_blobs) != len(net.layer):
        raise ValueError(f"{len(net.layer)} layers but {len(layer_blobs)} blob lists")

    def write(f):
        head = caffe_pb2.NetParameter()
        head.CopyFrom(net)
        del head.layer[:]
        f.write(head.SerializeToString())
        for layer, blobs in zip(net.layer, layer_blobs, strict=True):
            chunks = _layer_chunks(layer, blobs)
            f.write(_header(100, _size_of(chunks)))
            for chunk in chunks:
                f.write(chunk.view(np.uint8) if isinstance(chunk, np.ndarray) else chunk)

    atomic_write(path, write)
