"""Data (LMDB and LevelDB), ImageData, MemoryData, HDF5Data, HDF5Output, built in nets."""

import numpy as np
import pytest
from devices import gpu_test

import espresso
import espresso.layers.data as data_layers
from espresso.data import DatasetError
from espresso.data.db import LMDBWriter, encoded_datum, make_datum
from espresso.data.image import encode_image
from espresso.errors import LayerParamError, NetError, ShapeError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.testing import assert_close

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_net(text, phase=TRAIN):
    return espresso.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def write_db(path, n=100, shape=(1, 2, 3), datum=None):
    """Record i: every pixel i % 256, label i."""
    with LMDBWriter(path) as db:
        for i in range(n):
            db.put(f"{i:08d}", datum(i) if datum else make_datum(np.full(shape, i % 256, np.uint8), i))
    return str(path)


def data_net(source, extra="", transform="", phase=TRAIN, tops=("data", "label")):
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return make_net(f"""
        layer {{ name: "d" type: "Data" {top_lines}
                 transform_param {{ {transform} }}
                 data_param {{ source: "{source}" backend: LMDB {extra} }} }}""", phase)


# *** Data ***
@pytest.mark.parametrize("prefetch", [False, True])
def test_data_layer_reads_in_key_order_and_wraps(tmp_path, monkeypatch, prefetch):
    if prefetch:  # force the background-thread path
        monkeypatch.setattr(data_layers, "CACHE_LIMIT_BYTES", 0)
    net = data_net(write_db(tmp_path / "db"), "batch_size: 64", "scale: 0.5")
    assert net.blobs["data"].shape == (64, 1, 2, 3) and net.blobs["label"].shape == (64,)
    assert (net.layers[0].cache is None) == prefetch
    expected = [list(range(64)), list(range(64, 100)) + list(range(28)), list(range(28, 92))]
    for records in expected:
        net.forward()
        assert net.blobs["label"].data.tolist() == records
        assert_close(net.blobs["data"].data, np.broadcast_to(np.array(records)[:, None, None, None] * 0.5,
                                                             (64, 1, 2, 3)))


@gpu_test
def test_data_layer_streams_through_pinned_buffers_and_a_copy_stream_on_a_gpu(tmp_path, monkeypatch):
    """A dataset too big for the device: pinned host batches, copied on the copy stream into two
    device slots in turn; the batches are those of the CPU, wrapping around."""
    backend = espresso.backend.get("cuda:0")
    monkeypatch.setattr(data_layers, "CACHE_LIMIT_BYTES", 0)
    made, pinned_empty = [], backend.pinned_empty
    monkeypatch.setattr(backend, "pinned_empty", lambda *args: made.append(pinned_empty(*args)) or made[-1])
    espresso.set_mode_gpu()
    net = data_net(write_db(tmp_path / "db"), "batch_size: 64 prefetch: 3", "scale: 0.5")
    starts = [0, 64, 28, 92, 56]
    for start in starts:
        net.forward()
        records = (start + np.arange(64)) % 100
        assert net.blobs["label"].data.tolist() == records.tolist()
        assert_close(net.blobs["data"].data, np.broadcast_to(records[:, None, None, None] * 0.5, (64, 1, 2, 3)))
    assert net.layers[0].uploader.turn == len(starts) % 2
    assert len(made) == 6  # data and labels of 3 buffers, all page-locked (cudaMemoryTypeHost)
    assert all(backend.xp.cuda.runtime.pointerGetAttributes(a.ctypes.data).type == 1 for a in made)


def test_data_layer_train_and_test_nets_in_lenet_shape(tmp_path):
    source = write_db(tmp_path / "db", 30, (1, 6, 6))
    text = f"""
        layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
                 transform_param {{ scale: 0.00390625 crop_size: 4 mirror: true }}
                 data_param {{ source: "{source}" batch_size: 8 backend: LMDB }} }}
        layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
                 transform_param {{ scale: 0.00390625 crop_size: 4 }}
                 data_param {{ source: "{source}" batch_size: 10 backend: LMDB }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                 inner_product_param {{ num_output: 30 weight_filler {{ type: "xavier" }} }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}"""
    train, test = make_net(text, TRAIN), make_net(text, TEST)
    assert train.blobs["data"].shape == (8, 1, 4, 4) and test.blobs["data"].shape == (10, 1, 4, 4)
    assert np.isfinite(train.forward_backward())
    assert train.blobs["label"].data.tolist() == list(range(8))
    test.forward()
    assert_close(test.blobs["data"].data, np.broadcast_to(np.arange(10.0)[:, None, None, None] / 256, (10, 1, 4, 4)))


def test_data_layer_label_top_is_optional_and_rand_skip_follows_the_seed(tmp_path):
    source = write_db(tmp_path / "db", 20)
    net = data_net(source, "batch_size: 4", tops=("data",))
    net.forward()
    assert net.blobs["data"].data[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    starts = []
    for _ in range(2):
        espresso.set_random_seed(3)
        net = data_net(source, "batch_size: 4 rand_skip: 10")
        net.forward()
        starts.append(int(net.blobs["label"].data[0]))
    assert starts[0] == starts[1] and 0 <= starts[0] < 10
    assert net.blobs["label"].data.tolist() == [starts[0] + k for k in range(4)]


def test_data_layer_float_and_encoded_records(tmp_path, rng):
    floats = rng.standard_normal((5, 2, 2, 2)).astype(np.float32)
    net = data_net(write_db(tmp_path / "f", 5, datum=lambda i: make_datum(floats[i], i)), "batch_size: 5",
                   "mean_value: 1 scale: 2")
    net.forward()
    assert_close(net.blobs["data"].data, (floats - 1) * 2, rtol=1e-6)
    bgr = rng.integers(0, 256, (4, 3, 3, 5), dtype=np.uint8)
    source = write_db(tmp_path / "png", 4, datum=lambda i: encoded_datum(encode_image(bgr[i], "png"), i))
    net = data_net(source, "batch_size: 4")
    net.forward()
    assert_close(net.blobs["data"].data, bgr.astype(np.float64))
    grey = data_net(source, "batch_size: 4", "force_gray: true")
    assert grey.blobs["data"].shape == (4, 1, 3, 5)


def test_data_layer_errors(tmp_path):
    source = write_db(tmp_path / "db", 3)
    with pytest.raises(DatasetError, match="layer 'd' \\(Data\\): data_param.source: .*is an LMDB database, not "
                                           "LevelDB.*`backend: LMDB`; LEVELDB is the default"):
        make_net(f'layer {{ name: "d" type: "Data" top: "x" data_param {{ source: "{source}" batch_size: 1 }} }}')
    with pytest.raises(DatasetError, match="layer 'd' \\(Data\\): data_param.source: .*nope.*does not exist"):
        data_net(tmp_path / "nope", "batch_size: 1")
    with pytest.raises(LayerParamError, match="batch_size: must be > 0"):
        data_net(source)
    with pytest.raises(LayerParamError, match="data_param.scale is deprecated.*transform_param.scale"):
        data_net(source, "batch_size: 1 scale: 2")
    mixed = write_db(tmp_path / "mixed", 3, datum=lambda i: make_datum(np.zeros((1, 2, 2 + (i == 2)), np.uint8)))
    with pytest.raises(DatasetError, match="record 00000002: shape \\(1, 2, 3\\).*first record is \\(1, 2, 2\\)"):
        data_net(mixed, "batch_size: 1")


def test_data_layer_mixed_shapes_fail_in_forward_when_prefetching(tmp_path, monkeypatch):
    monkeypatch.setattr(data_layers, "CACHE_LIMIT_BYTES", 0)
    mixed = write_db(tmp_path / "mixed", 3, datum=lambda i: make_datum(np.zeros((1, 2, 2 + (i == 2)), np.uint8)))
    net = data_net(mixed, "batch_size: 2")
    net.forward()
    with pytest.raises(DatasetError, match="layer 'd' \\(Data\\).*record 00000002"):
        net.forward()


def test_legacy_v1_data_layer_upgrades(tmp_path):
    source = write_db(tmp_path / "db", 4)
    net = make_net(f"""layers {{ name: "d" type: DATA top: "data" top: "label"
        data_param {{ source: "{source}" batch_size: 2 backend: LMDB scale: 0.5 }} }}""")
    net.forward()
    assert isinstance(net.layers[0], data_layers.DataLayer)
    assert_close(net.blobs["data"].data[:, 0, 0, 0], [0.0, 0.5])  # V1 scale moved to transform_param


# *** ImageData ***
def _images(tmp_path, rng, n=5, size=(3, 4)):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rgbs = rng.integers(0, 256, (n,) + size + (3,), dtype=np.uint8)
    for i, rgb in enumerate(rgbs):
        Image.fromarray(rgb).save(folder / f"p{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"p{i}.png {10 + i}\n" for i in range(n)))
    return rgbs


def image_net(tmp_path, params, transform=""):
    return make_net(f"""layer {{ name: "img" type: "ImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        image_data_param {{ source: "{tmp_path / 'list.txt'}" root_folder: "{tmp_path / 'imgs'}/" {params} }} }}""")


def test_image_data_reads_bgr_in_list_order_and_wraps(tmp_path, rng):
    rgbs = _images(tmp_path, rng)
    net = image_net(tmp_path, "batch_size: 3")
    assert net.blobs["data"].shape == (3, 3, 3, 4)
    for rows in ([0, 1, 2], [3, 4, 0]):
        net.forward()
        assert net.blobs["label"].data.tolist() == [10 + r for r in rows]
        assert_close(net.blobs["data"].data, rgbs[rows][..., ::-1].transpose(0, 3, 1, 2).astype(np.float64))


def test_image_data_grey_resize_and_shuffle(tmp_path, rng):
    _images(tmp_path, rng, 6)
    net = image_net(tmp_path, "batch_size: 2 is_color: false new_height: 5 new_width: 2", "scale: 0.5")
    net.forward()
    assert net.blobs["data"].shape == (2, 1, 5, 2) and net.blobs["data"].data.max() <= 127.5
    espresso.set_random_seed(1)
    net = image_net(tmp_path, "batch_size: 6 shuffle: true")
    epochs = []
    for _ in range(3):
        net.forward()
        epochs.append(net.blobs["label"].data.tolist())
    assert all(sorted(e) == list(range(10, 16)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_image_data_errors(tmp_path, rng):
    _images(tmp_path, rng, 2)
    with pytest.raises(LayerParamError, match="new_height and new_width must be set together"):
        image_net(tmp_path, "new_height: 4")
    (tmp_path / "list.txt").write_text("p0.png 1\nmissing.png 2\n")
    net = image_net(tmp_path, "batch_size: 2")
    with pytest.raises(DatasetError, match="could not load image .*missing.png"):
        net.forward()
    (tmp_path / "list.txt").write_text("p0.png one\n")
    with pytest.raises(DatasetError, match="list.txt:1: expected '<file> <integer label>'"):
        image_net(tmp_path, "batch_size: 2")


# *** DummyData ***
def test_dummy_data_fills_constant_tops_once_and_the_others_every_forward():
    net = make_net("""layer { name: "d" type: "DummyData" top: "c" top: "g" dummy_data_param {
        shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 3 } data_filler { type: "gaussian" } } }""")
    assert net.blobs["c"].data.tolist() == [[3] * 3] * 2
    assert not net.blobs["g"].data.any()  # as Caffe: filled first by the first forward
    net.blobs["c"].data[0, 0] = 7
    net.forward()
    first = net.blobs["g"].data.copy()
    net.forward()
    assert net.blobs["c"].data[0, 0] == 7 and first.all() and not np.array_equal(first, net.blobs["g"].data)


# *** MemoryData ***
MEMORY = """layer { name: "m" type: "MemoryData" top: "data" top: "label"
                    memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }"""


def test_memory_data_serves_batches_and_wraps(rng):
    net = make_net(MEMORY)
    assert net.blobs["data"].shape == (2, 1, 2, 3) and net.blobs["label"].shape == (2,)
    data = rng.standard_normal((4, 1, 2, 3)).astype(np.float32)
    labels = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)  # pycaffe's 4-D labels work too
    data_layers.set_input_arrays(net, data, labels)
    for rows in ([0, 1], [2, 3], [0, 1]):
        net.forward()
        assert_close(net.blobs["data"].data, data[rows])
        assert net.blobs["label"].data.shape == (2, 1, 1, 1)  # Caffe's Forward reshapes it so
        assert net.blobs["label"].data.ravel().tolist() == rows


def test_memory_data_errors(rng):
    net = make_net(MEMORY)
    with pytest.raises(NetError, match="set_input_arrays"):
        net.forward()
    layer = net.layers[0]
    with pytest.raises(ShapeError, match="N x 1 x 2 x 3"):
        layer.set_input_arrays(np.zeros((2, 1, 3, 2)), np.zeros(2))
    with pytest.raises(ShapeError, match="multiple of batch_size"):
        layer.set_input_arrays(np.zeros((3, 1, 2, 3)), np.zeros(3))
    with pytest.raises(ShapeError, match="same first dimension"):
        layer.set_input_arrays(np.zeros((2, 1, 2, 3)), np.zeros(4))
    with pytest.raises(LayerParamError, match="channels: must be specified"):
        make_net(MEMORY.replace("channels: 1", ""))
    with pytest.raises(NetError, match="MemoryData"):
        data_layers.set_input_arrays(make_net('layer { name: "i" type: "Input" top: "x" '
                                             'input_param { shape { dim: 1 } } }'), np.zeros(1), np.zeros(1))


# *** HDF5 (the tests below need h5py, the `hdf5` extra; the others do not) ***
@pytest.fixture
def h5py():
    return pytest.importorskip("h5py")


def _h5(h5py, path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)


def hdf5_net(tmp_path, params, names=("data", "label")):
    tops = " ".join(f'top: "{n}"' for n in names)
    return make_net(f"""layer {{ name: "h" type: "HDF5Data" {tops}
        hdf5_data_param {{ source: "{tmp_path / 'files.txt'}" {params} }} }}""")


def test_hdf5_data_reads_files_in_turn_and_wraps(tmp_path, rng, h5py):
    x = rng.standard_normal((5, 2, 3))
    _h5(h5py, tmp_path / "a.h5", data=x[:3], label=np.arange(3))
    _h5(h5py, tmp_path / "b.h5", data=x[3:], label=np.arange(3, 5))
    (tmp_path / "files.txt").write_text("a.h5\nb.h5\n")  # relative to the list file
    net = hdf5_net(tmp_path, "batch_size: 4")
    assert net.blobs["data"].shape == (4, 2, 3) and net.blobs["label"].shape == (4,)
    for rows in ([0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]):
        net.forward()
        assert net.blobs["label"].data.tolist() == rows
        assert_close(net.blobs["data"].data, x[rows].astype(np.float32).astype(np.float64))


def test_hdf5_data_shuffle_is_seeded_and_covers_every_row(tmp_path, rng, h5py):
    _h5(h5py, tmp_path / "a.h5", data=np.zeros((8, 1)), label=np.arange(8))
    (tmp_path / "files.txt").write_text(str(tmp_path / "a.h5"))
    runs = []
    for _ in range(2):
        espresso.set_random_seed(9)
        net = hdf5_net(tmp_path, "batch_size: 8 shuffle: true")
        net.forward()
        runs.append(net.blobs["label"].data.tolist())
    assert runs[0] == runs[1] and sorted(runs[0]) == list(range(8)) and runs[0] != list(range(8))


def test_hdf5_data_errors(tmp_path, h5py):
    _h5(h5py, tmp_path / "a.h5", data=np.zeros((2, 1)), label=np.zeros(3))
    (tmp_path / "files.txt").write_text("a.h5")
    with pytest.raises(DatasetError, match="same, non-zero number of rows"):
        hdf5_net(tmp_path, "batch_size: 1")
    with pytest.raises(DatasetError, match="no dataset 'other'"):
        hdf5_net(tmp_path, "batch_size: 1", ("data", "other"))
    (tmp_path / "files.txt").write_text("")
    with pytest.raises(DatasetError, match="at least 1 HDF5 file"):
        hdf5_net(tmp_path, "batch_size: 1")
    with pytest.raises(LayerParamError, match="remove transform_param"):  # Caffe's CHECK
        make_net(f"""layer {{ name: "h" type: "HDF5Data" top: "data" transform_param {{ scale: 2 }}
                     hdf5_data_param {{ source: "{tmp_path / 'files.txt'}" batch_size: 1 }} }}""")


def test_hdf5_output_round_trip(tmp_path, rng, h5py):
    x = rng.standard_normal((4, 3))
    _h5(h5py, tmp_path / "in.h5", data=x, label=np.arange(4.0))
    (tmp_path / "files.txt").write_text(str(tmp_path / "in.h5"))
    out = tmp_path / "out.h5"
    net = make_net(f"""
        layer {{ name: "h" type: "HDF5Data" top: "data" top: "label"
                 hdf5_data_param {{ source: "{tmp_path / 'files.txt'}" batch_size: 2 }} }}
        layer {{ name: "o" type: "HDF5Output" bottom: "data" bottom: "label"
                 hdf5_output_param {{ file_name: "{out}" }} }}""")
    with h5py.File(out, "r") as f:
        assert list(f) == []  # created at setup
    for rows in ([0, 1], [2, 3]):
        net.forward()
        with h5py.File(out, "r") as f:
            assert f["data"].shape == (2, 3, 1, 1) and f["label"].shape == (2, 1, 1, 1)  # Caffe's 4-D blobs
            assert_close(f["data"][()].reshape(2, 3), x[rows].astype(np.float32))
            assert f["label"][()].ravel().tolist() == rows
    net.backward()  # a no-op, as in Caffe


def test_data_reads_leveldb_as_caffes_default_backend(tmp_path):
    """No `backend` means LEVELDB, as in Caffe; the records come in key order, wrapping around."""
    from espresso.data.db import LevelDBWriter

    with LevelDBWriter(tmp_path / "level") as db:
        for i in (2, 0, 1):  # written out of order: read in key order
            db.put(f"{i:08d}", make_datum(np.full((1, 2, 2), 10 * i, np.uint8), i))
    net = make_net(f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
                   f'data_param {{ source: "{tmp_path / "level"}" batch_size: 2 }} }}')
    labels = []
    for _ in range(3):
        net.forward()
        labels += net.blobs["label"].data.tolist()
        assert_close(net.blobs["data"].data[:, 0, 0, 0], 10 * net.blobs["label"].data)
    assert labels == [0, 1, 2, 0, 1, 2]
