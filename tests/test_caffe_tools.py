"""Caffe's tool binaries as espresso verbs: LevelDB and --backend, --check_size,
convert_cifar_data, convert_mnist_siamese_data, extract_features and the upgrade tools."""

import sys

import numpy as np
import pytest

import espresso
from espresso import cli
from espresso.data import DatasetError
from espresso.data.db import LevelDBReader, LevelDBWriter, LMDBReader, decode_datum, make_datum, open_db
from espresso.data.idx import write_idx
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_binary, read_text, write_binary, write_text

pytest.importorskip("plyvel")


def test_leveldb_round_trip_shared_readers_and_refusals(tmp_path):
    with LevelDBWriter(tmp_path / "db") as db:
        for i in (3, 1, 2, 0):
            db.put(f"{i:08d}", make_datum(np.full((1, 1, 2), i, np.uint8), i))
    first, second = LevelDBReader(tmp_path / "db"), open_db(str(tmp_path / "db") + "/", "leveldb")
    assert len(first) == 4 and [k for k, _ in second.items()] == [f"{i:08d}".encode() for i in range(4)]
    records = first.cycle(skip=3)
    assert [decode_datum(next(records)[1])[1] for _ in range(3)] == [3, 0, 1]  # wrapping around
    first.close(), second.close()
    with pytest.raises(DatasetError, match="already exists"):
        LevelDBWriter(tmp_path / "db")
    with pytest.raises(DatasetError, match="is a LevelDB database, not LMDB.*backend: LEVELDB"):
        LMDBReader(tmp_path / "db")
    with pytest.raises(DatasetError, match="nope.*does not exist"):
        LevelDBReader(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown database backend 'rocksdb'"):
        open_db(tmp_path / "db", "rocksdb")


def test_missing_plyvel_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "plyvel", None)
    with pytest.raises(EspressoError, match=r"pip install plyvel .*espresso-nn\[leveldb\]"):
        LevelDBWriter(tmp_path / "db")


def _mnist(tmp_path, rng, n=40):
    images, labels = rng.integers(0, 256, (n, 4, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.uint8)
    write_idx(tmp_path / "images", images)
    write_idx(tmp_path / "labels", labels)
    return images, labels


def test_converters_take_caffes_backend_flag(tmp_path, rng):
    images, labels = _mnist(tmp_path, rng)
    assert cli.main(["convert_mnist_data", str(tmp_path / "images"), str(tmp_path / "labels"),
                     str(tmp_path / "mnist"), "--backend=leveldb"]) == 0
    with LevelDBReader(tmp_path / "mnist") as db:
        assert [decode_datum(v)[1] for _, v in db.items()] == labels.tolist()
    assert cli.main(["compute_image_mean", str(tmp_path / "mnist"), str(tmp_path / "mean.binaryproto"),
                     "-backend", "leveldb"]) == 0
    mean = np.array(read_binary(tmp_path / "mean.binaryproto", caffe_pb2.BlobProto()).data)
    np.testing.assert_allclose(mean, images.reshape(len(images), -1).mean(0), rtol=1e-6)


def test_convert_imageset_check_size_and_leveldb(tmp_path, rng):
    from PIL import Image

    for i, size in enumerate([(4, 5), (4, 5), (6, 3)]):
        Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("0.png 0\n1.png 1\n2.png 2\n")
    args = ["convert_imageset", f"{tmp_path}/", str(tmp_path / "list.txt")]
    assert cli.main(args + [str(tmp_path / "a"), "--backend=leveldb"]) == 0
    assert len(LevelDBReader(tmp_path / "a")) == 3
    assert cli.main(args + [str(tmp_path / "b"), "--check_size"]) == 1  # the third image differs
    assert cli.main(args + [str(tmp_path / "c"), "--check_size=true", "--resize_height=4", "--resize_width=4"]) == 0


def test_convert_cifar_data_keeps_caffes_layout(tmp_path, rng):
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        raw = rng.integers(0, 256, (3, 3073), dtype=np.uint8)
        raw[:, 0] %= 10
        raw.tofile(tmp_path / name)
        records[name] = raw
    assert cli.main(["convert_cifar_data", str(tmp_path), str(tmp_path), "lmdb"]) == 0
    with LMDBReader(tmp_path / "cifar10_train_lmdb") as db:
        items = list(db.items())
    assert [k for k, _ in items] == [f"{i:05d}".encode() for i in range(15)]
    datum = caffe_pb2.Datum.FromString(items[4][1])  # batch 2, record 1
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 32, 32, records["data_batch_2.bin"][1, 0])
    assert datum.data == records["data_batch_2.bin"][1, 1:].tobytes()  # the file's RGB planes, as Caffe
    assert len(LMDBReader(tmp_path / "cifar10_test_lmdb")) == 3
    from espresso.data.convert import convert_cifar

    with pytest.raises(DatasetError, match="again/cifar10_train_lmdb: folder .*again does not exist"):
        convert_cifar(tmp_path, tmp_path / "again")
    (tmp_path / "again").mkdir()
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="test_batch.bin: 100 bytes is not a whole number of CIFAR-10 records"):
        convert_cifar(tmp_path, tmp_path / "again")


def test_convert_mnist_siamese_data_pairs(tmp_path, rng):
    images, labels = _mnist(tmp_path, rng)
    assert cli.main(["convert_mnist_siamese_data", str(tmp_path / "images"), str(tmp_path / "labels"),
                     str(tmp_path / "pairs")]) == 0  # LevelDB, as Caffe's
    flat = images.reshape(len(images), -1)
    with LevelDBReader(tmp_path / "pairs") as db:
        assert len(db) == len(images)
        for _, value in db.items():
            pair, same = decode_datum(value)
            assert pair.shape == (2, 4, 3)
            i = int(np.flatnonzero((flat == pair[0].ravel()).all(1))[0])
            j = int(np.flatnonzero((flat == pair[1].ravel()).all(1))[0])
            assert same == int(labels[i] == labels[j])


def test_extract_features_writes_float_datums(tmp_path, rng):
    net_text = """layer { name: "d" type: "DummyData" top: "data" dummy_data_param {
                      shape { dim: 3 dim: 2 dim: 2 dim: 2 } data_filler { type: "gaussian" } } }
                  layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
                          inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }"""
    (tmp_path / "net.prototxt").write_text(net_text)
    espresso.Net(str(tmp_path / "net.prototxt"), espresso.TEST).save(str(tmp_path / "w.caffemodel"))
    assert cli.main(["extract_features", str(tmp_path / "w.caffemodel"), str(tmp_path / "net.prototxt"),
                     "fc,data", f"{tmp_path}/fc,{tmp_path}/data", "2", "leveldb", "CPU"]) == 0
    with LevelDBReader(tmp_path / "fc") as db:
        items = list(db.items())
    assert [k for k, _ in items] == [f"{i:010d}".encode() for i in range(6)]
    datum = caffe_pb2.Datum.FromString(items[0][1])
    assert (datum.channels, datum.height, datum.width, len(datum.float_data)) == (4, 1, 1, 4)
    with LevelDBReader(tmp_path / "data") as db:
        assert decode_datum(db.first()[1])[0].shape == (2, 2, 2)
    assert cli.main(["extract_features", str(tmp_path / "w.caffemodel"), str(tmp_path / "net.prototxt"),
                     "nope", f"{tmp_path}/x", "1", "lmdb"]) == 1


V1_NET = """name: "old" layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" blobs_lr: 2
            inner_product_param { num_output: 2 } }
            input: "x" input_dim: 1 input_dim: 3 input_dim: 1 input_dim: 1"""


def test_upgrade_tools(tmp_path, capsys):
    (tmp_path / "old.prototxt").write_text(V1_NET)
    assert cli.main(["upgrade_net_proto_text", str(tmp_path / "old.prototxt"), str(tmp_path / "new.prototxt")]) == 0
    new = read_text(tmp_path / "new.prototxt", caffe_pb2.NetParameter())
    assert [(lp.type, lp.name) for lp in new.layer] == [("Input", "input"), ("InnerProduct", "ip")]
    assert new.layer[1].param[0].lr_mult == 2 and not new.layers
    assert "lr_mult: 2\n" in (tmp_path / "new.prototxt").read_text()  # as Caffe's C++ writes it, not 2.0
    assert cli.main(["upgrade_net_proto_text", str(tmp_path / "new.prototxt"), str(tmp_path / "same.prototxt")]) == 0
    assert "File already in latest proto format" in capsys.readouterr().err

    binary = parse_text(V1_NET, caffe_pb2.NetParameter())
    binary.layers[0].blobs.add(data=[1, 2, 3, 4, 5, 6], num=1, channels=1, height=2, width=3)
    write_binary(tmp_path / "old.caffemodel", binary)
    old, new = str(tmp_path / "old.caffemodel"), str(tmp_path / "new.caffemodel")
    assert cli.main(["upgrade_net_proto_binary", old, new]) == 0
    upgraded = read_binary(tmp_path / "new.caffemodel", caffe_pb2.NetParameter())
    assert upgraded.layer[-1].type == "InnerProduct" and list(upgraded.layer[-1].blobs[0].data) == [1, 2, 3, 4, 5, 6]

    write_text(tmp_path / "solver.prototxt", parse_text("solver_type: ADAM base_lr: 0.1", caffe_pb2.SolverParameter()))
    old, new = str(tmp_path / "solver.prototxt"), str(tmp_path / "s2.prototxt")
    assert cli.main(["upgrade_solver_proto_text", old, new]) == 0
    solver = read_text(tmp_path / "s2.prototxt", caffe_pb2.SolverParameter())
    assert solver.type == "Adam" and not solver.HasField("solver_type")


def test_convert_imageset_reads_gflags_booleans_and_keeps_caffes_keys(tmp_path, rng, capsys):
    """create_imagenet.sh's order (--shuffle before the positional arguments), --x=false and --nox;
    a blank line takes a key as in Caffe; raw Datums say encoded: false; --encode_type encodes."""
    from PIL import Image

    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (4, 5, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("0.png 0\n\n1.png 1\n")
    root, listing = f"{tmp_path}/", str(tmp_path / "list.txt")
    assert cli.main(["convert_imageset", "--noshuffle", "--gray=false", root, listing, str(tmp_path / "a")]) == 0
    with LMDBReader(tmp_path / "a") as db:
        items = list(db.items())
    assert [k for k, _ in items] == [b"00000000_0.png", b"00000002_1.png"]
    first = caffe_pb2.Datum.FromString(items[0][1])
    assert first.HasField("encoded") and not first.encoded and first.channels == 3
    assert "Processed 2 files." in capsys.readouterr().err
    assert cli.main(["convert_imageset", "--shuffle", root, listing, str(tmp_path / "b")]) == 0
    assert len(LMDBReader(tmp_path / "b")) == 2
    assert cli.main(["convert_imageset", "--encode_type=png", root, listing, str(tmp_path / "c")]) == 0
    with LMDBReader(tmp_path / "c") as db:
        assert caffe_pb2.Datum.FromString(db.first()[1]).encoded


def test_stages_split_on_commas_and_upgrade_already_current_is_an_error_line(tmp_path, capsys):
    args = cli._parser().parse_args(["test", "--model", "m", "--weights", "w", "--stage", "a,b", "--stage", "c"])
    assert cli._stages(args) == ["a", "b", "c"]
    (tmp_path / "new.prototxt").write_text('name: "n" layer { name: "d" type: "Input" top: "x" '
                                           'input_param { shape { dim: 1 } } }')
    assert cli.main(["upgrade_net_proto_text", str(tmp_path / "new.prototxt"), str(tmp_path / "out.prototxt")]) == 0
    assert any(line.startswith("E") and "File already in latest proto format" in line
               for line in capsys.readouterr().err.splitlines())


def test_train_flags_replace_the_solver_files_weights_and_level_as_caffes(tmp_path, capsys):
    """`caffe train --weights W` replaces the solver file's `weights` (a stale one there is not
    read), as Caffe's train does; its start-up lines."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert cli.main(["prepare-fmnist", str(tmp_path), "--source",
                     str(root / "espresso" / "datasets" / "fmnist_subset")]) == 0
    net = (root / "examples/lenet_300_100/lenet_300_100_train_test.prototxt").read_text()
    (tmp_path / "net.prototxt").write_text(net.replace("examples/lenet/", f"{tmp_path}/"))
    solver = (root / "examples/lenet_300_100/lenet_300_100_solver.prototxt").read_text()
    solver = re.sub(r"net: .*", f'net: "{tmp_path}/net.prototxt"', solver)
    solver = re.sub(r"max_iter: \d+", "max_iter: 2", re.sub(r"snapshot_prefix: .*", f'snapshot_prefix: "{tmp_path}/s"',
                                                            solver))
    (tmp_path / "solver.prototxt").write_text(solver + '\nweights: "/nonexistent.caffemodel"\n')
    espresso.Net(str(tmp_path / "net.prototxt"), espresso.TRAIN).save(str(tmp_path / "w.caffemodel"))
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--weights",
                     str(tmp_path / "w.caffemodel")]) == 0
    err = capsys.readouterr().err
    assert "] Use CPU." in err and "] Starting Optimization" in err
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt")]) == 1  # the file's stale weights
