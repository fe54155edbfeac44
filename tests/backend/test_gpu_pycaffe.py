"""pycaffe's surface on a GPU net: net.blobs/net.params hand out host (NumPy) arrays, and what
Python writes into them reaches the device before the net next runs (Caffe's SyncedMemory)."""

import numpy as np
import pytest
from devices import ON_GPU, gpu_test

import espresso as caffe
from espresso.blob import Blob
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

NET = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "y" top: "loss" }
"""


def build(backend):
    return caffe.Net(parse_text(NET, caffe_pb2.NetParameter()), caffe.TRAIN, backend=backend, dtype=np.float64)


def test_cpu_nets_hand_out_their_blobs():
    net = build(None)
    assert isinstance(net.blobs["x"], Blob) and net.params["ip"][0] is net.layers[1].blobs[0]


@gpu_test
def test_gpu_views_are_host_arrays_and_writes_reach_the_device():
    from espresso import backend

    cpu, gpu = build(None), build(backend.get("cuda:0"))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    for name in cpu.params:
        for a, b in zip(cpu.params[name], gpu.params[name]):
            b.data[...] = a.data  # a write through the view
            assert isinstance(b.data, np.ndarray)
    gpu.blobs["x"].data[...] = x
    gpu.blobs["y"].data[...] = y
    cpu.blobs["x"].data[...] = x
    cpu.blobs["y"].data[...] = y
    assert np.allclose(gpu.forward()["loss"], cpu.forward()["loss"])
    cpu.backward()
    gpu.backward()
    assert isinstance(gpu.params["ip"][0].diff, np.ndarray)
    assert np.allclose(gpu.params["ip"][0].diff, cpu.params["ip"][0].diff)
    gpu.params["ip"][0].data[...] = 0  # net surgery: only the bias is left
    out = gpu.forward(x=x, y=y, blobs=["h"])
    assert np.allclose(out["h"], np.broadcast_to(gpu.params["ip"][1].data, (4, 2)))
    gpu.blobs["x"].reshape(6, 3)
    gpu.blobs["y"].reshape(6, 2)
    gpu.reshape()
    assert gpu.forward(blobs=["h"])["h"].shape == (6, 2)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_net_callbacks_run_around_every_layer_and_their_writes_count(device):
    """pycaffe's before_/after_forward and before_/after_backward: callback(layer index) around
    each layer (Caffe's NetCallback); what a callback writes through the views is what the next
    layer reads, and the param diffs it reads are final."""
    from espresso import backend

    net = build(backend.get("cuda:0") if device == "gpu" else None)
    rng = np.random.default_rng(1)
    net.blobs["x"].data[...], net.blobs["y"].data[...] = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    calls, seen = [], {}
    for when in ("before_forward", "after_forward", "before_backward", "after_backward"):
        getattr(net, when)(lambda i, when=when: calls.append((when, i)))

    def zero_h(i):
        if net._layer_names[i] == "ip":
            net.blobs["h"].data[...] = 0  # the loss layer then sees h = 0

    net.after_forward(zero_h)
    net.after_backward(lambda i: seen.setdefault(i, np.array(net.params["ip"][1].diff)))
    loss = float(net.forward()["loss"])
    assert np.isclose(loss, (net.blobs["y"].data ** 2).sum() / 8)  # EuclideanLoss of 0 vs y
    net.backward()
    n = len(net.layers)
    assert calls == ([(w, i) for i in range(n) for w in ("before_forward", "after_forward")]
                     + [(w, i) for i in reversed(range(n)) for w in ("before_backward", "after_backward")])
    np.testing.assert_allclose(seen[1], -net.blobs["y"].data.sum(axis=0) / 4)  # d loss / d bias at h = 0
    assert net.eager_reason() is not None
    net.after_forward(lambda i: i == n - 1 and net.blobs["loss"].data.fill(7))
    assert np.isclose(net.forward_backward(), loss)  # the layer's loss, taken before its callbacks
