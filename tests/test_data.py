"""espresso.data: IDX files, LMDB Datum databases, the data transformer, converters, sources."""

import gzip
import os

import numpy as np
import pytest

import espresso
from espresso import backend as backends
from espresso.data import DatasetError, fashion_mnist_dir
from espresso.data import fmnist as fmnist_module
from espresso.data.convert import compute_image_mean, convert_imageset, convert_mnist
from espresso.data.db import LMDBReader, LMDBWriter, decode_datum, decode_datums, encoded_datum, make_datum
from espresso.data.idx import read_idx, read_mnist, write_idx
from espresso.data.image import decode_image, encode_image
from espresso.data.prefetch import Prefetcher
from espresso.data.transformer import DataTransformer
from espresso.errors import EspressoError, LayerParamError, ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_binary, write_binary
from espresso.testing import assert_close

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


# *** IDX ***
@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip_plain_and_gzip(tmp_path, rng, name):
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    raw = (tmp_path / name).read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 4, 0, 0, 0, 3])  # magic 2051, big-endian dims
    back = read_idx(tmp_path / name, expect_magic=2051)
    assert back.dtype == np.uint8 and np.array_equal(back, images)


def test_idx_other_types_are_big_endian(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e6]], np.float32)
    write_idx(tmp_path / "f.idx", values)
    raw = (tmp_path / "f.idx").read_bytes()
    assert raw[2:4] == bytes([0x0D, 2]) and raw[12:16] == np.array(1.5, ">f4").tobytes()
    assert np.array_equal(read_idx(tmp_path / "f.idx"), values)


def test_idx_bad_files_raise_model_file_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ModelFileError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="magic number 2049, expected 2051"):
        read_idx(tmp_path / "labels", expect_magic=2051)
    (tmp_path / "short").write_bytes((tmp_path / "labels").read_bytes()[:-1])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "missing")


def test_read_mnist_checks_counts(tmp_path):
    write_idx(tmp_path / "i", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "l", np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        read_mnist(tmp_path / "i", tmp_path / "l")


# *** LMDB ***
def _write_db(path, arrays, labels, key=lambda i: f"{i:08d}"):
    with LMDBWriter(path) as db:
        for i, (a, label) in enumerate(zip(arrays, labels)):
            db.put(key(i), make_datum(a, label))


def test_lmdb_round_trip_in_key_order(tmp_path, rng):
    arrays = rng.integers(0, 256, (12, 2, 3, 4), dtype=np.uint8)
    order = rng.permutation(12)  # written out of order: reading follows the keys
    with LMDBWriter(tmp_path / "db") as db:
        for i in order:
            db.put(f"{i:08d}", make_datum(arrays[i], int(i) % 5))
    with LMDBReader(tmp_path / "db") as reader:
        assert len(reader) == 12
        items = list(reader.items())
    assert [k for k, _ in items] == [f"{i:08d}".encode() for i in range(12)]
    for i, (_, value) in enumerate(items):
        array, label = decode_datum(value)
        assert array.dtype == np.uint8 and np.array_equal(array, arrays[i]) and label == i % 5


def test_lmdb_wraps_around(tmp_path):
    _write_db(tmp_path / "db", np.zeros((100, 1, 1, 1), np.uint8), range(100))
    with LMDBReader(tmp_path / "db") as reader:
        records = reader.cycle()
        labels = [decode_datum(next(records)[1])[1] for _ in range(128)]
    assert labels[64:] == list(range(64, 100)) + list(range(28))


def test_readers_of_one_lmdb_share_its_environment(tmp_path):
    """LMDB refuses a second environment on one database in a process: a train and a test net
    streaming the same database share one, open until the last reader closes."""
    _write_db(tmp_path / "db", np.zeros((5, 1, 1, 1), np.uint8), range(5))
    first, second = LMDBReader(tmp_path / "db"), LMDBReader(str(tmp_path / "db") + "/")
    shared = first.handle
    assert second.handle is shared
    first.close()
    assert [decode_datum(v)[1] for _, v in second.items()] == list(range(5))
    second.close()
    with LMDBReader(tmp_path / "db") as third:  # opened anew
        assert len(third) == 5 and third.handle is not shared


def test_lmdb_map_grows_as_needed(tmp_path):
    big = np.zeros((1, 100, 100), np.uint8)
    with LMDBWriter(tmp_path / "db", map_size=1 << 16) as db:
        for i in range(30):
            db.put(f"{i:08d}", make_datum(big, i))
    with LMDBReader(tmp_path / "db") as reader:
        assert len(reader) == 30


def test_datum_float_data_and_encoded_png(tmp_path, rng):
    floats = rng.standard_normal((2, 3, 3)).astype(np.float32)
    datum = make_datum(floats, 7)
    assert len(datum.float_data) == 18 and not datum.data
    array, label = decode_datum(datum.SerializeToString())
    assert array.dtype == np.float32 and np.array_equal(array, floats) and label == 7
    bgr = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    png = encode_image(bgr, "png")
    assert png[:4] == b"\x89PNG"
    array, label = decode_datum(encoded_datum(png, 3).SerializeToString())
    assert np.array_equal(array, bgr) and label == 3
    grey, _ = decode_datum(encoded_datum(png).SerializeToString(), color=False)
    assert grey.shape == (1, 4, 5)
    assert np.array_equal(decode_image(encode_image(bgr[:1], "png")), bgr[:1])  # grey stays grey natively


@pytest.mark.parametrize("labels", [[0, 9, 3], [128, 300, 16383], [-1, -5, -2147483648]])  # one varint length each
def test_decode_datums_equals_decoding_each_record(rng, labels):
    items = rng.integers(0, 256, (3, 2, 3, 4), dtype=np.uint8)
    values = [make_datum(item, label).SerializeToString() for item, label in zip(items, labels)]
    data, got = decode_datums(values, len(values))
    for value, item, label in zip(values, data, got):
        want, want_label = decode_datum(value)
        np.testing.assert_array_equal(item, want)
        assert label == want_label
    assert data.dtype == np.uint8 and data.shape == (3, 2, 3, 4)


def test_decode_datums_declines_records_of_another_layout(rng):
    item = rng.integers(0, 256, (1, 2, 2), dtype=np.uint8)
    plain = make_datum(item, 1).SerializeToString()
    unlabelled = caffe_pb2.Datum(channels=1, height=2, width=2, data=item.tobytes()).SerializeToString()
    data, labels = decode_datums([unlabelled, unlabelled], 2)
    np.testing.assert_array_equal(data[1], item)
    np.testing.assert_array_equal(labels, [0, 0])
    flagged = caffe_pb2.Datum.FromString(plain)
    flagged.encoded = False  # one more field after the label
    other_tag = plain[:-2] + b"\x30" + plain[-1:]  # field 6 where the label should be
    declined = {"label of another length": [plain, make_datum(item, 200).SerializeToString()],
                "other dimensions": [plain, make_datum(item.reshape(2, 2, 1), 1).SerializeToString()],
                "a field after the label": [flagged.SerializeToString()] * 2,
                "another field where the label is": [plain, other_tag],
                "float_data": [make_datum(item.astype(np.float32), 1).SerializeToString()] * 2,
                "encoded": [encoded_datum(b"\x89PNG....", 1).SerializeToString()] * 2}
    for why, records in declined.items():
        assert decode_datums(records, len(records)) is None, why
    assert decode_datums([plain] * 2, 3) is None and decode_datums([plain] * 3, 2) is None  # not `count` records


def test_decode_datum_errors():
    with pytest.raises(DatasetError, match="holds 3 values"):
        decode_datum(caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc").SerializeToString())
    with pytest.raises(DatasetError, match="cannot decode image"):
        decode_datum(encoded_datum(b"not an image").SerializeToString())


def test_wrong_kinds_of_database_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="missing_db.*does not exist"):
        LMDBReader(tmp_path / "missing_db")
    level = tmp_path / "level_db"
    level.mkdir()
    for name in ("CURRENT", "LOCK", "000005.ldb", "MANIFEST-000004"):
        (level / name).write_bytes(b"x")
    with pytest.raises(DatasetError, match="level_db: is a LevelDB database"):
        LMDBReader(level)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="empty_dir: not an LMDB"):
        LMDBReader(tmp_path / "empty_dir")
    (tmp_path / "file.txt").write_bytes(b"hello" * 1000)
    with pytest.raises(DatasetError, match="file.txt: not a readable LMDB"):
        LMDBReader(tmp_path / "file.txt")
    _write_db(tmp_path / "db", [np.zeros((1, 1, 1), np.uint8)], [0])
    with pytest.raises(DatasetError, match="already exists"):
        LMDBWriter(tmp_path / "db")


# *** the transformer ***
def _transformer(text, phase, dtype=np.float64):
    param = parse_text(text, caffe_pb2.TransformationParameter())
    return DataTransformer(param, phase, backends.get("cpu"), dtype)


def _reference(x, mean, scale, h_off, w_off, crop, mirror):
    """Caffe's per-element loop for one C x H x W item, in float64."""
    C, H, W = x.shape
    h, w = (crop, crop) if crop else (H, W)
    out = np.zeros((C, h, w))
    for c in range(C):
        for i in range(h):
            for j in range(w):
                m = mean[c, h_off + i, w_off + j] if mean.ndim == 3 else mean[c]
                out[c, i, w - 1 - j if mirror else j] = (x[c, h_off + i, w_off + j] - m) * scale
    return out


def test_transform_scale_and_mean_value(rng):
    x = rng.integers(0, 256, (3, 2, 4, 5), dtype=np.uint8)
    out = np.zeros((3, 2, 4, 5))
    _transformer("scale: 0.5 mean_value: 10 mean_value: 20", TEST)(x, out)
    for n in range(3):
        assert_close(out[n], _reference(x[n], np.array([10.0, 20.0]), 0.5, 0, 0, 0, False))
    _transformer("mean_value: 3", TEST)(x, out)  # one value for every channel
    assert_close(out, x - 3.0)


def test_transform_mean_file_and_centre_crop_in_test(tmp_path, rng):
    mean = rng.uniform(0, 255, (1, 2, 5, 6)).astype(np.float32)
    _mean_file(tmp_path / "mean.binaryproto", mean[0])
    x = rng.integers(0, 256, (2, 2, 5, 6), dtype=np.uint8)
    t = _transformer(f'mean_file: "{tmp_path / "mean.binaryproto"}" crop_size: 3 scale: 2', TEST)
    assert t.out_shape((2, 5, 6)) == (2, 3, 3)
    out = np.zeros((2, 2, 3, 3))
    t(x, out)
    for n in range(2):  # centre: ((5-3)//2, (6-3)//2) = (1, 1)
        assert_close(out[n], _reference(x[n], mean[0].astype(np.float64), 2.0, 1, 1, 3, False), rtol=1e-6)


def test_transform_random_crop_and_mirror_in_train_follow_the_seed(rng):
    x = rng.integers(0, 256, (16, 2, 6, 7), dtype=np.uint8)
    outs = []
    for _ in range(2):
        espresso.set_random_seed(5)
        t = _transformer("crop_size: 4 mirror: true mean_value: 1 mean_value: 2", TRAIN)
        out = np.zeros((16, 2, 4, 4))
        t(x, out)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    # every item is some crop of its image, mirrored or not; and the choices vary
    seen = set()
    for n in range(16):
        matches = [(h, w, m) for h in range(3) for w in range(4) for m in (False, True)
                   if np.allclose(outs[0][n], _reference(x[n], np.array([1.0, 2.0]), 1, h, w, 4, m))]
        assert matches, f"item {n} is no crop of its input"
        seen.add(matches[0])
    assert len(seen) > 4 and {m for _, _, m in seen} == {False, True}


def _mean_file(path, mean):
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    blob.data.extend(mean.ravel().tolist())
    write_binary(path, blob)
    return path


def test_transform_crop_and_mirror_take_the_mean_file_at_source_positions(tmp_path, rng):
    x = rng.integers(0, 256, (12, 2, 4, 5), dtype=np.uint8)
    mean = rng.uniform(0, 255, (2, 4, 5)).astype(np.float32)
    t = _transformer(f'mirror: true crop_size: 3 scale: 0.25 mean_file: "{_mean_file(tmp_path / "m", mean)}"', TRAIN)
    out = np.zeros((12, 2, 3, 3))
    t(x, out)
    for n in range(12):
        options = [_reference(x[n], mean.astype(np.float64), 0.25, h, w, 3, m)
                   for h in range(2) for w in range(3) for m in (False, True)]
        assert any(np.allclose(out[n], o, rtol=1e-6) for o in options), f"item {n}"


def test_transform_mirror_applies_in_test_too_as_caffe_1_0(rng):
    x = rng.integers(0, 256, (32, 1, 2, 3), dtype=np.uint8)
    out = np.zeros((32, 1, 2, 3))
    _transformer("mirror: true", TEST)(x, out)
    flipped = [np.array_equal(out[n], x[n, :, :, ::-1]) and not np.array_equal(out[n], x[n]) for n in range(32)]
    assert 0 < sum(flipped) < 32


def test_transform_float_data_and_float32(rng):
    x = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    out = np.zeros((2, 1, 3, 3), np.float32)
    _transformer("scale: 3", TEST, np.float32)(x, out)
    assert out.dtype == np.float32 and np.array_equal(out, x * np.float32(3))


def test_transform_parameter_errors(tmp_path):
    with pytest.raises(LayerParamError, match="mean_file and mean_value"):
        _transformer('mean_file: "m" mean_value: 1', TEST)
    with pytest.raises(LayerParamError, match="force_color and force_gray"):
        _transformer("force_color: true force_gray: true", TEST)
    with pytest.raises(LayerParamError, match="crop_size 5 is larger"):
        _transformer("crop_size: 5", TEST).out_shape((1, 4, 8))
    with pytest.raises(LayerParamError, match="1 mean_value or as many as channels"):
        _transformer("mean_value: 1 mean_value: 2", TEST).out_shape((3, 4, 4))
    with pytest.raises(ModelFileError, match="cannot read"):
        _transformer(f'mean_file: "{tmp_path / "none.binaryproto"}"', TEST)


# *** converters ***
def test_convert_mnist_writes_caffe_datums(tmp_path, rng):
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab", labels)
    calls = []
    assert convert_mnist(tmp_path / "img.gz", tmp_path / "lab", tmp_path / "db", lambda d, t: calls.append((d, t))) == 7
    assert calls[-1] == (7, 7)
    with LMDBReader(tmp_path / "db") as reader:
        for i, (key, value) in enumerate(reader.items()):
            datum = caffe_pb2.Datum.FromString(value)
            assert key == f"{i:08d}".encode()
            assert (datum.channels, datum.height, datum.width, datum.label) == (1, 5, 4, labels[i])
            assert datum.data == images[i].tobytes() and not datum.encoded


def test_compute_image_mean(tmp_path, rng):
    arrays = rng.integers(0, 256, (6, 3, 2, 2), dtype=np.uint8)
    _write_db(tmp_path / "db", arrays, range(6))
    mean = compute_image_mean(tmp_path / "db", tmp_path / "mean.binaryproto")
    expected = arrays.astype(np.float64).mean(axis=0)
    assert mean.shape == (1, 3, 2, 2) and mean.dtype == np.float32
    assert_close(mean[0], expected, rtol=1e-6)
    blob = read_binary(tmp_path / "mean.binaryproto", caffe_pb2.BlobProto())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 2, 2)
    assert_close(np.array(blob.data).reshape(3, 2, 2), expected, rtol=1e-6)


def _png_tree(tmp_path, rng, sizes):
    from PIL import Image

    (tmp_path / "img").mkdir()
    lines = []
    for i, (h, w) in enumerate(sizes):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "img" / f"im {i}.png")
        lines.append(f"im {i}.png {i + 1}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_convert_imageset_raw_encoded_and_resized(tmp_path, rng):
    _png_tree(tmp_path, rng, [(4, 5), (4, 5), (6, 3)])
    root = str(tmp_path / "img") + os.sep
    with open(tmp_path / "list.txt", "a") as f:
        f.write("missing.png 9\n")
    n, skipped = convert_imageset(root, tmp_path / "list.txt", tmp_path / "raw", 3, 2)
    assert (n, skipped) == (3, ["missing.png"])
    with LMDBReader(tmp_path / "raw") as reader:
        items = list(reader.items())
    assert [k for k, _ in items] == [b"00000000_im 0.png", b"00000001_im 1.png", b"00000002_im 2.png"]
    assert all(decode_datum(v)[0].shape == (3, 3, 2) for _, v in items)
    # encoded, no resize, matching extension: the file's own bytes, as Caffe (even with gray)
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "enc", gray=True, encoded=True)
    with LMDBReader(tmp_path / "enc") as reader:
        first = caffe_pb2.Datum.FromString(reader.first()[1])
    assert first.encoded and first.label == 1 and first.data == (tmp_path / "img" / "im 0.png").read_bytes()
    # resized: decoded, resized and re-encoded in the requested format
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "enc2", 2, 2, gray=True, encoded=True,
                     encode_type="png")
    with LMDBReader(tmp_path / "enc2") as reader:
        first = caffe_pb2.Datum.FromString(reader.first()[1])
    assert first.encoded and first.data[:4] == b"\x89PNG"
    assert decode_datum(first.SerializeToString())[0].shape == (1, 2, 2)


# *** prefetching and sources ***
def test_prefetcher_delivers_in_order_and_reraises():
    count = iter(range(100))

    def fill(buffer):
        buffer[0] = next(count)
        if buffer[0] == 3:
            raise DatasetError("boom")

    p = Prefetcher(fill, [[None], [None]])
    got = []
    for _ in range(3):
        b = p.get()
        got.append(b[0])
        p.release(b)
    assert got == [0, 1, 2]
    with pytest.raises(DatasetError, match="boom"):
        p.get()
    p.close()


def test_fashion_mnist_dir_preference(tmp_path, monkeypatch):
    monkeypatch.delenv("ESPRESSO_DATA", raising=False)
    monkeypatch.setattr(fmnist_module, "SYSTEM_DIR", tmp_path / "nowhere")
    src = fashion_mnist_dir()
    assert src.path == fmnist_module.EMBEDDED_DIR and "embedded" in src.description
    images, labels = read_mnist(*(fmnist_module.idx_files(src.path)[k] for k in ("test_images", "test_labels")))
    assert images.shape == (1000, 28, 28) and np.bincount(labels).tolist() == [100] * 10
    monkeypatch.setenv("ESPRESSO_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="ESPRESSO_DATA"):
        fashion_mnist_dir()
    (tmp_path / "fashion-mnist").symlink_to(fmnist_module.EMBEDDED_DIR)
    assert fashion_mnist_dir().path == tmp_path / "fashion-mnist"
    assert fashion_mnist_dir(fmnist_module.EMBEDDED_DIR).description.endswith("(given)")
    with pytest.raises(DatasetError, match="no Fashion-MNIST files"):
        fashion_mnist_dir(tmp_path / "nowhere")


def test_missing_optional_package_names_the_extra(monkeypatch):
    import sys

    from espresso.data import require

    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(EspressoError, match=r"pip install h5py .*espresso-nn\[hdf5\]"):
        require("h5py", "HDF5Data")


def test_prefetcher_closed_from_its_own_thread_does_not_join_itself():
    """A layer's finalizer can run on the prefetch thread (garbage collection inside fill)."""
    import threading

    from espresso.data.prefetch import Prefetcher

    closed, holder, ready = [], {}, threading.Event()

    def fill(buffer):
        ready.wait(5)
        if not closed:
            holder["p"].close()  # what a finalizer running on this thread would do
            closed.append(True)
        buffer[0] = 1

    holder["p"] = Prefetcher(fill, [[0], [0]])
    ready.set()
    holder["p"]._thread.join(timeout=5)
    assert closed and not holder["p"]._thread.is_alive()


def test_a_gzip_stream_that_unpacks_past_the_memory_limit_is_refused(tmp_path):
    import gzip

    import espresso
    from espresso.data.idx import read_idx

    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(16 << 20)))  # 16 MiB of zeros in about 16 KB
    espresso.set_memory_limit(1 << 20)
    try:
        with pytest.raises(DatasetError, match="unpacks to more than the 1 MiB memory limit"):
            read_idx(path)
    finally:
        espresso.set_memory_limit(None)


def test_resize_is_opencvs_inter_linear_array_for_array(rng):
    """ImageData's and convert_imageset's resize against OpenCV itself (the opencv-python peer):
    up, down, exact halvings (OpenCV's area shortcut), 1 and 3 channels, one-pixel edges."""
    cv2 = pytest.importorskip("cv2")
    from espresso.data.image import resize

    shapes = [((3, 7, 9), (15, 4)), ((1, 40, 30), (20, 15)), ((3, 5, 5), (1, 1)), ((1, 1, 6), (4, 3)),
              ((3, 256, 200), (227, 227))] + [((int(rng.choice([1, 3])), *map(int, rng.integers(1, 50, 2))),
                                               tuple(map(int, rng.integers(1, 60, 2)))) for _ in range(40)]
    for (c, h, w), (height, width) in shapes:
        image = rng.integers(0, 256, (c, h, w), dtype=np.uint8)
        expected = cv2.resize(np.ascontiguousarray(image.transpose(1, 2, 0)), (width, height),
                              interpolation=cv2.INTER_LINEAR)
        expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
        np.testing.assert_array_equal(resize(image, height, width), expected,
                                      err_msg=f"{(c, h, w)} -> {(height, width)}")
