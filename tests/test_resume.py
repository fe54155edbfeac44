"""Resume continues the data: N iterations straight equal N/2, snapshot, restore in a new solver,
N/2 more, bit for bit, for the Data (LMDB; cached and streamed), ImageData (shuffled) and HDF5Data
(shuffled) layers, with random crops, mirrors and dropout; and the .solverstate stays Caffe's."""

import json
from pathlib import Path

import numpy as np
import pytest
from devices import ON_GPU

import espresso
import espresso.layers.data as data_layers
from espresso.data.db import LMDBWriter, make_datum
from espresso.errors import ModelFileError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.solver.state import read_state, write_state

CLASSES = 3
SOLVER = 'base_lr: 0.05 lr_policy: "step" stepsize: 4 gamma: 0.5 momentum: 0.9 weight_decay: 0.001 ' \
         'random_seed: 7 test_iter: 2 test_interval: 3 test_initialization: false snapshot_prefix: "{prefix}"'
NET = """
layer {{ name: "data" type: "{type}" top: "data" top: "label" include {{ phase: TRAIN }} {train} }}
layer {{ name: "data" type: "{type}" top: "data" top: "label" include {{ phase: TEST }} {test} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
         inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "drop" type: "Dropout" bottom: "ip" top: "ip" dropout_param {{ dropout_ratio: 0.3 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include {{ phase: TEST }} }}
"""


def solver_for(tmp_path, layer_type, train, test=None, fmt="BINARYPROTO"):
    param = parse_text(SOLVER.format(prefix=tmp_path / "snap") + f" snapshot_format: {fmt}",
                       caffe_pb2.SolverParameter())
    net = NET.format(type=layer_type, train=train, test=test or train)
    param.net_param.CopyFrom(parse_text(net, caffe_pb2.NetParameter()))
    return espresso.SGDSolver(param)


def assert_resume_continues(make, iterations=10, fmt="BINARYPROTO"):
    """make() builds a fresh solver; the halves with a snapshot between equal the straight run."""
    straight = make()
    straight.step(iterations)
    first = make()
    first.step(iterations // 2)
    _, state = first.snapshot()
    resumed = make()
    resumed.restore(state)
    resumed.step(iterations - iterations // 2)
    np.testing.assert_array_equal(resumed.net.arena_data, straight.net.arena_data)
    assert resumed.test_scores == straight.test_scores
    return state


def write_lmdb(path, n=13, shape=(2, 5, 5)):
    rng = np.random.default_rng(0)
    with LMDBWriter(path) as db:
        for i in range(n):
            db.put(f"{i:08d}", make_datum(rng.integers(0, 256, shape, dtype=np.uint8), i % CLASSES))
    return str(path)


@pytest.mark.parametrize("streamed", [False, True])
def test_resume_continues_an_lmdb_with_random_crops_and_mirrors(tmp_path, monkeypatch, streamed):
    if streamed:  # the prefetch thread's path, which reads ahead of the net
        monkeypatch.setattr(data_layers, "CACHE_LIMIT_BYTES", 0)
    source = write_lmdb(tmp_path / "db")
    train = f'transform_param {{ crop_size: 4 mirror: true scale: 0.01 }} ' \
            f'data_param {{ source: "{source}" backend: LMDB batch_size: 4 rand_skip: 5 }}'
    test = f'transform_param {{ crop_size: 4 scale: 0.01 }} ' \
           f'data_param {{ source: "{source}" backend: LMDB batch_size: 3 }}'
    assert_resume_continues(lambda: solver_for(tmp_path, "Data", train, test))


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("path", ["cached", "cached, mirrored", "streamed"])
def test_a_data_layer_seeks_to_a_saved_cursor(tmp_path, monkeypatch, device, path):
    """On the host, and on a GPU where the cached path's cursor is a device array (advanced by
    the gather kernel, or by xp ops when mirroring) and where the streamed path reads ahead."""
    if path == "streamed":
        monkeypatch.setattr(data_layers, "CACHE_LIMIT_BYTES", 0)
    if device == "gpu":
        espresso.set_mode_gpu()
    transform = "mirror: true" if "mirrored" in path else "mean_value: 9 scale: 0.5"
    text = f"""layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ {transform} }}
               data_param {{ source: "{write_lmdb(tmp_path / "db")}" backend: LMDB batch_size: 5 }} }}"""

    def make():
        espresso.set_random_seed(3)
        return espresso.Net(parse_text(text, caffe_pb2.NetParameter()), espresso.TRAIN)

    ahead, behind = make(), make()
    for _ in range(4):
        ahead.forward()
    behind.layers[0].seek(json.loads(json.dumps(ahead.data_cursors()["d"])))
    assert behind.data_cursors() == ahead.data_cursors() and ahead.data_cursors()["d"]["pos"] == 20 % 13
    for _ in range(3):
        ahead.forward(), behind.forward()
        np.testing.assert_array_equal(behind.blobs["data"].data, ahead.blobs["data"].data)
        np.testing.assert_array_equal(behind.blobs["label"].data, ahead.blobs["label"].data)


def test_a_cursor_from_a_dataset_of_another_size_is_set_aside_with_a_warning(tmp_path):
    train = write_hdf5(tmp_path)
    solver = solver_for(tmp_path, "HDF5Data", train)
    solver.step(5)
    _, state = solver.snapshot()
    (tmp_path / "files.txt").write_text("a.h5\nb.h5\n")
    resumed = solver_for(tmp_path, "HDF5Data", train)
    with pytest.warns(UserWarning, match="read from a dataset of 3 items, this one has 2: its data starts over"):
        resumed.restore(state)
    assert resumed.iter == 5 and resumed.net.layers[0].cursor()["row"] == 0


def test_a_damaged_cursor_is_a_model_file_error(tmp_path):
    solver = solver_for(tmp_path, "HDF5Data", write_hdf5(tmp_path))
    solver.step(2)
    _, state = solver.snapshot()
    iteration, learned_net, history, current_step, payload = read_state(state)
    cursors = json.loads(payload)
    cursors["cursors"][0]["data"]["perm"][0] = 99
    write_state(state, iteration, learned_net, history, current_step, json.dumps(cursors).encode())
    with pytest.raises(ModelFileError, match=r"espresso_resume: layer 'data': perm: expected an order of 0\.\.[3-5]"):
        solver_for(tmp_path, "HDF5Data", write_hdf5(tmp_path)).restore(state)


def write_images(tmp_path, n=7):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"p{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"p{i}.png {i % CLASSES}\n" for i in range(n)))
    return f'source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path / "imgs"}/"'


def test_resume_continues_shuffled_image_data(tmp_path):
    pytest.importorskip("PIL")
    source = write_images(tmp_path)
    train = f'transform_param {{ mirror: true scale: 0.01 }} ' \
            f'image_data_param {{ {source} batch_size: 3 shuffle: true rand_skip: 4 }}'
    test = f'transform_param {{ scale: 0.01 }} image_data_param {{ {source} batch_size: 2 }}'
    assert_resume_continues(lambda: solver_for(tmp_path, "ImageData", train, test))


def write_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(2)
    for name, rows in (("a.h5", 5), ("b.h5", 4), ("c.h5", 6)):
        with h5py.File(tmp_path / name, "w") as f:
            f["data"] = rng.standard_normal((rows, 6)).astype(np.float32)
            f["label"] = rng.integers(0, CLASSES, rows).astype(np.float32)
    (tmp_path / "files.txt").write_text("a.h5\nb.h5\nc.h5\n")
    return f'hdf5_data_param {{ source: "{tmp_path / "files.txt"}" batch_size: 4 shuffle: true }}'


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_resume_continues_shuffled_hdf5_data(tmp_path, fmt):
    train = write_hdf5(tmp_path)
    assert_resume_continues(lambda: solver_for(tmp_path, "HDF5Data", train, fmt=fmt), iterations=12, fmt=fmt)


def test_without_the_cursors_the_data_starts_over_as_in_caffe(tmp_path):
    """The gap the cursors close: a state of Caffe's (no espresso_resume) restores the weights
    and history exactly, but the data from the beginning, so the run goes elsewhere."""
    train = write_hdf5(tmp_path)
    straight = solver_for(tmp_path, "HDF5Data", train)
    straight.step(8)
    first = solver_for(tmp_path, "HDF5Data", train)
    first.step(4)
    _, state = first.snapshot()
    iteration, learned_net, history, current_step, _ = read_state(state)
    write_state(state, iteration, learned_net, history, current_step)  # as Caffe writes it
    resumed = solver_for(tmp_path, "HDF5Data", train)
    resumed.restore(state)
    resumed.step(4)
    assert not np.array_equal(resumed.net.arena_data, straight.net.arena_data)


def caffe_schema_solver_state():
    """SolverState as Caffe's own schema has it (fields 1 to 4), in a pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    message = descriptor_pb2.DescriptorProto()
    caffe_pb2.SolverState.DESCRIPTOR.CopyToProto(message)
    kept = [field for field in message.field if field.number <= 4]
    del message.field[:]
    message.field.extend(kept)
    file = descriptor_pb2.FileDescriptorProto(name="caffe_only.proto", package="caffe", dependency=["caffe.proto"])
    file.message_type.add().CopyFrom(message)
    file.message_type[0].name = "CaffeSolverState"
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(caffe_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.CaffeSolverState"))


def test_the_solverstate_stays_readable_by_caffes_schema(tmp_path):
    solver = solver_for(tmp_path, "HDF5Data", write_hdf5(tmp_path))
    solver.step(2)
    model, state = solver.snapshot()
    data = Path(state).read_bytes()
    payload = json.loads(caffe_pb2.SolverState.FromString(data).espresso_resume)
    assert payload["version"] == 1 and list(payload["cursors"][0]) == ["data"]
    caffe = caffe_schema_solver_state().FromString(data)  # field 1000 skipped, as Caffe skips it
    assert (caffe.iter, caffe.learned_net, len(caffe.history), caffe.current_step) == (2, model, 2, 0)
