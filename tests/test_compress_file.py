"""The compressed-model reader refuses every malformed file with a ModelFileError that says
what is wrong: one crafted file per check of espresso/compress/model_file.py, and mutated
copies of a valid file (checksums recomputed, so the parser itself is reached)."""

import struct
import zlib

import numpy as np
import pytest
from test_compress import sample_layers

from espresso.compress import model_file
from espresso.compress.model_file import CompressedWeights, ScaledIntegers, read_model, write_model
from espresso.errors import ModelFileError


def _string(text):
    return struct.pack("<H", len(text)) + text


def _file(payload):
    """A header with the right magic, version, length and CRC around `payload`."""
    return model_file._HEADER.pack(model_file.MAGIC, model_file.VERSION, 0, len(payload), zlib.crc32(payload)) \
        + payload


def _layer(blob):
    """A payload of one layer 'fc' holding one blob's bytes."""
    return struct.pack("<I", 1) + _string(b"fc") + _string(b"IP") + struct.pack("<H", 1) + blob


def _weights(shape, flags, bits, index_bits, entries):
    return struct.pack(f"<BB{len(shape)}I", 1, len(shape), *shape) + struct.pack("<BBBI", flags, bits, index_bits,
                                                                                 entries)


def _integers(shape, bits, scales):
    return struct.pack(f"<BB{len(shape)}I", 2, len(shape), *shape) + struct.pack("<BI", bits, scales)


def _written(tmp_path, cw):
    path = tmp_path / "w.espz"
    write_model(path, [("fc", "IP", [cw])])
    return path.read_bytes()


CRAFTED = {
    "a payload longer than the header says": (lambda t: _file(struct.pack("<I", 0)) + b"\0", r"padded.*holds 4\+"),
    "a layer count with no layers": (lambda t: _file(struct.pack("<I", 1)), "layer 0 name needs 2 bytes, 0 left"),
    "a name that is not UTF-8": (lambda t: _file(struct.pack("<I", 1) + _string(b"\xff\xfe")), "name is not UTF-8"),
    "bytes after the last layer": (lambda t: _file(struct.pack("<I", 0) + b"xyz"), "3 bytes after the last layer"),
    "an unknown blob kind": (lambda t: _file(_layer(struct.pack("<BB", 7, 1) + struct.pack("<I", 4))), "kind 7"),
    "too many axes": (lambda t: _file(_layer(struct.pack("<BB", 0, 9))), "9 axes"),
    "unknown flags": (lambda t: _file(_layer(_weights((4,), 16, 0, 0, 4))), "flags 16"),
    "a zero point of 7": (lambda t: _file(_layer(_weights((4,), 8, 0, 0, 4) + struct.pack("<fB", 0.5, 7))),
                          "input scale 0.5, zero point 7"),
    "a negative input scale": (lambda t: _file(_layer(_integers((4,), 8, 1) + struct.pack("<ffB", 1, -2, 0))),
                               "input scale -2.0"),
    "a 9-bit codebook": (lambda t: _file(_layer(_weights((4,), 2, 9, 0, 4))), "9 bits"),
    "17-bit sparse indices": (lambda t: _file(_layer(_weights((4,), 1, 0, 17, 4))), "17 index bits"),
    "more entries than weights": (lambda t: _file(_layer(_weights((4,), 0, 0, 0, 5))), "5 entries for shape"),
    "float values cut short": (lambda t: _file(_layer(_weights((4,), 0, 0, 0, 4) + b"\0" * 12)),
                               "values needs 16 bytes, 12 left"),
    "4-bit integers": (lambda t: _file(_layer(_integers((4,), 4, 1))), "4-bit integers with 1 scales"),
    "a scale per row of another shape": (lambda t: _file(_layer(_integers((4, 2), 8, 3))), "with 3 scales"),
    "a 16-bit float format of 5": (lambda t: _file(_layer(struct.pack("<BBI", 3, 1, 4) + b"\5")), "format 5"),
    "integers cut short": (lambda t: _file(_layer(_integers((4,), 16, 1) + b"\0" * 11)),
                           "values needs 8 bytes, 2 left"),
    "positions that stop short of the shape": (
        lambda t: _written(t, CompressedWeights((40,), np.ones(2, np.float32), np.array([0, 1]), index_bits=4,
                                                huffman=False)), "positions do not cover shape"),
    "positions past the shape": (
        lambda t: _written(t, CompressedWeights((4,), np.ones(2, np.float32), np.array([0, 9]), index_bits=4,
                                                huffman=False)), "positions do not cover shape"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_each_malformed_file_is_refused_saying_why(tmp_path, case):
    make, match = CRAFTED[case]
    path = tmp_path / "bad.espz"
    path.write_bytes(make(tmp_path))
    with pytest.raises(ModelFileError, match=match):
        read_model(path)


def test_an_unreadable_path_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="not a regular file \\(a folder\\)"):
        read_model(tmp_path)
    with pytest.raises(ModelFileError, match="cannot read"):
        read_model(tmp_path / "missing.espz")


def test_mutated_files_are_read_or_refused_never_crash(tmp_path):
    """500 mutations (byte flips, cuts, insertions) of a valid file with both Huffman-coded and
    fixed-width streams, each with its checksum and length made right again: every one reads as
    a model within the decoding bound or raises ModelFileError."""
    *_, layers = sample_layers()
    layers[1][2][0].huffman = False
    layers[1][2][0].input_scale = 0.25
    layers.append(("int8", "InnerProduct", [ScaledIntegers(np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
                                                           np.array([0.5, 0.25, 2.0], np.float32), 0.125)]))
    path = tmp_path / "m.espz"
    write_model(path, layers)
    payload = path.read_bytes()[model_file._HEADER.size:]
    rng, refused = np.random.default_rng(11), 0
    for _ in range(500):
        data = bytearray(payload)
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(len(data)))
            kind = rng.integers(3)
            if kind == 0:
                data[at] ^= 1 << int(rng.integers(8))
            elif kind == 1:
                del data[at:at + int(rng.integers(1, 16))]
            else:
                data[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        bad = tmp_path / "bad.espz"
        bad.write_bytes(_file(bytes(data)))
        try:
            model = read_model(bad, max_elements=1 << 16)
        except ModelFileError:
            refused += 1
            continue
        dense = [b if isinstance(b, np.ndarray) else b.dense() for _, _, blobs in model for b in blobs]
        assert sum(d.size for d in dense) <= 1 << 16
    assert 250 < refused < 500  # most mutations break the structure, some only change values


def test_scaled_integers_round_trip_and_version_1_files_still_load(tmp_path):
    values = np.arange(-12, 12, dtype=np.int16).reshape(3, 8) * 1000
    layers = [("fp", "InnerProduct", [ScaledIntegers(values, np.array([2.0 ** -12], np.float32))]),
              ("q", "Convolution", [ScaledIntegers((values[:, :4] // 500).astype(np.int8),
                                                   np.array([0.5, 0.25, 2.0], np.float32), 0.03125, 128)])]
    path = tmp_path / "m.espz"
    write_model(path, layers)
    (_, _, (fp,)), (_, _, (q,)) = read_model(path)
    assert fp.values.dtype == np.int16 and np.array_equal(fp.dense(), values * 2.0 ** -12)
    assert q.values.dtype == np.int8 and (q.input_scale, q.input_zero) == (0.03125, 128)
    np.testing.assert_array_equal(q.dense(), (values[:, :4] // 500) * np.array([[0.5], [0.25], [2.0]]))
    *_, old = sample_layers()  # a version-1 file: the same bytes under the old header
    write_model(path, old)
    payload = path.read_bytes()[model_file._HEADER.size:]
    path.write_bytes(model_file._HEADER.pack(model_file.MAGIC, 1, 0, len(payload), zlib.crc32(payload)) + payload)
    assert [name for name, _, _ in read_model(path)] == ["fc", "c"]
