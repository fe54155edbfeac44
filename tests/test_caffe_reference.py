"""Espresso against real BVLC Caffe, array for array.

tests/data/caffe_reference/*.npz were written by real Caffe (tools/caffe_reference.py, run in
the chroot of tools/real_caffe.sh; see the README there): small nets with their weights,
inputs, every blob's data and diff and every param diff after one forward and backward, and
tiny solvers with the weights after each step.  Here Espresso builds the same net from the
same text, takes the same weights and inputs, and must give the same arrays.
"""

from pathlib import Path

import numpy as np
import pytest
from devices import ON_GPU

import espresso as caffe
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

DATA = Path(__file__).parent / "data" / "caffe_reference"
FILES = sorted(DATA.glob("*.npz")) if DATA.is_dir() else []
NETS = [f for f in FILES if not f.name.startswith(("solver_", "data_layer"))]
SOLVERS = [f for f in FILES if f.name.startswith("solver_")]
TOL = (1e-5, 1e-6)  # rtol, atol: float32 on both sides, sums may run in another order

needs_data = pytest.mark.skipif(not FILES, reason=f"no real-Caffe reference data in {DATA}")


@pytest.fixture(params=["cpu", ON_GPU])
def device(request):
    """Each check runs on the CPU and, where there is one, on the GPU (conftest resets to CPU)."""
    if request.param == "gpu":
        caffe.set_mode_gpu()
    return request.param


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def close(actual, expected, what, tol=TOL):
    np.testing.assert_allclose(np.asarray(actual).reshape(np.shape(expected)), expected, *tol, err_msg=what)


def set_params(net, ref, prefix):
    for key, value in ref.items():
        if key.startswith(prefix + "/"):
            layer, i = key[len(prefix) + 1:].rsplit("/", 1)
            net.params[layer][int(i)].data[...] = value.reshape(net.params[layer][int(i)].data.shape)


def check_params(net, ref, prefix, field="data"):
    keys = [k for k in ref if k.startswith(prefix + "/")]
    for key in keys:
        layer, i = key[len(prefix) + 1:].rsplit("/", 1)
        close(getattr(net.params[layer][int(i)], field), ref[key], key)
    return keys


@needs_data
@pytest.mark.parametrize("path", NETS, ids=lambda p: p.stem)
def test_net_matches_real_caffe(path, device):
    ref = load(path)
    phase = caffe.TRAIN if str(ref["phase"]) == "TRAIN" else caffe.TEST
    net = caffe.Net(parse_text(str(ref["proto"]), caffe_pb2.NetParameter(), path.name), phase)
    assert dict(net.blob_loss_weights) == dict(zip(ref["blob_names"], ref["blob_loss_weights"]))
    set_params(net, ref, "param")
    for key, value in ref.items():
        if key.startswith("in/"):
            net.blobs[key[3:]].data[...] = value
    net.forward()
    if ref["backward"]:
        for key, value in ref.items():
            if key.startswith("outdiff/"):
                net.blobs[key[8:]].diff[...] = value
        net.backward()
        check_params(net, ref, "pdiff", "diff")
    for key in [k for k in ref if k.startswith(("blob/", "diff/"))]:
        name = key.split("/", 1)[1]
        assert name in net.blobs, f"{key}: Espresso has no blob {name!r}"
        close(net.blobs[name].diff if key.startswith("diff/") else net.blobs[name].data, ref[key], key)
    for key in [k for k in ref if k.startswith("pafter/")]:  # weights a forward changed (BatchNorm)
        check_params(net, {key.replace("pafter", "p"): ref[key]}, "p")


@needs_data
@pytest.mark.parametrize("path", SOLVERS, ids=lambda p: p.stem)
def test_solver_matches_real_caffe(path, tmp_path, device):
    ref = load(path)
    (tmp_path / "solver.prototxt").write_text(str(ref["solver"]))
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    set_params(solver.net, ref, "w/0")
    solver.net.blobs["x"].data[...] = ref["in/x"]
    solver.net.blobs["label"].data[...] = ref["in/label"]
    for k, loss in enumerate(ref["loss"], 1):
        solver.step(1)
        close(solver.net.blobs["loss"].data, loss, f"loss at step {k}")
        assert check_params(solver.net, ref, f"w/{k}")


@needs_data
def test_data_layer_matches_real_caffe(tmp_path, device):
    """Data layers reading an LMDB (wrapping around), with mean values, a mean file and a crop."""
    lmdb = pytest.importorskip("lmdb")
    ref = load(DATA / "data_layer.npz")
    with lmdb.open(str(tmp_path / "db"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(ref["images"], ref["labels"])):
            txn.put(b"%08d" % i, caffe.io.array_to_datum(image, int(label)).SerializeToString())
    (tmp_path / "mean.binaryproto").write_bytes(caffe.io.array_to_blobproto(ref["mean"]).SerializeToString())
    text = str(ref["proto"]).replace("{db}", str(tmp_path / "db")).replace("{mean}", str(tmp_path / "mean.binaryproto"))
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)
    for k in range(3):
        net.forward()
        for key in [key for key in ref if key.startswith("blob/") and key.endswith(f"/{k}")]:
            close(net.blobs[key.split("/")[1]].data, ref[key], key)


REPO = Path(__file__).resolve().parents[1]
LENET = REPO / "benchmarks" / "results" / "real_caffe" / "lenet_iter_10000.caffemodel"


@pytest.mark.skipif(not LENET.exists(), reason=f"the LeNet trained by real Caffe is not at {LENET}")
def test_lenet_trained_by_real_caffe(device):
    """Real Caffe's trained LeNet (its own .caffemodel) gives real Caffe's scores in Espresso."""
    ref = load(LENET.with_name("lenet_iter_10000_outputs.npz"))
    net = caffe.Net(str(REPO / "examples" / "lenet" / "lenet_deploy.prototxt"), str(LENET), caffe.TEST)
    net.blobs["data"].reshape(*ref["images"].shape)
    net.blobs["data"].data[...] = ref["images"] * np.float32(0.00390625)
    out = net.forward()
    # four layers of float32 sums in other orders than Caffe's OpenBLAS: scores up to ~20 agree
    # to about 1.5e-6, so the absolute tolerance here is 1e-5
    close(net.blobs["ip2"].data, ref["ip2"], "ip2", (1e-5, 1e-5))
    close(out["prob"], ref["prob"], "prob")
    assert (out["prob"].argmax(1) == ref["prob"].argmax(1)).all()
