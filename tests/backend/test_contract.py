"""The backend contract (espresso/backend/__init__.py) on every backend, and the rules that rest
on it, checked on the CPU with fake backends: when a captured graph may be replayed
(espresso/graphs.py) and how pycaffe's host views of device blobs reach the device
(espresso/hostview.py)."""

import numpy as np
import pytest
from devices import ON_GPU, FakeDevice, FakeGraphs

import espresso as caffe
from espresso import backend as backends
from espresso import graphs
from espresso.backend import FUSED_KERNELS, KERNELS, Backend
from espresso.blob import Blob
from espresso.errors import BackendError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

REQUIRED = ("seed", "to_device", "to_host", "synchronize", "mark", "elapsed_ms", "describe")


@pytest.fixture(params=["cpu", ON_GPU])
def backend(request):
    return backends.get("cpu" if request.param == "cpu" else "cuda:0")


def test_every_member_is_there(backend):
    assert isinstance(backend, Backend)
    assert backend.name and backend.xp is not None and backend.k is not None and backend.rng is not None
    for method in REQUIRED:
        assert getattr(type(backend), method) is not getattr(Backend, method), f"{backend.name} lacks {method}"
    for kernel in KERNELS:
        assert callable(getattr(backend.k, kernel)), f"{backend.name}: k.{kernel}"
    for kernel in FUSED_KERNELS:  # a function, or None where the backend has none
        value = getattr(backend.k, kernel)
        assert value is None or callable(value), f"{backend.name}: k.{kernel}"
    assert backend.k.SOFTMAX_LOSS_MOST is None or backend.k.SOFTMAX_LOSS_MOST > 0
    for flag in ("host_arrays", "can_capture", "deterministic", "splits_long_gemms"):
        assert isinstance(getattr(backend, flag), bool), flag
    assert "Device" in backend.describe()


def test_the_members_behave(backend):
    host = np.arange(12.0).reshape(3, 4)[:, ::2]  # not contiguous
    device = backend.to_device(host, np.float32)
    assert device.flags.c_contiguous and device.dtype == np.float32
    np.testing.assert_array_equal(backend.to_host(device), host)
    assert backend.to_device(np.float64(2.5)).shape == ()  # 0-d stays 0-d
    assert isinstance(backend.xp.zeros(2), type(device)) and isinstance(backend.to_host(device), np.ndarray)
    start = backend.mark()
    device += 1
    assert backend.elapsed_ms(start, backend.mark()) >= 0
    backend.seed(3)
    first = backend.to_host(backend.rng.random(4))
    backend.seed(3)
    np.testing.assert_array_equal(backend.to_host(backend.rng.random(4)), first)
    backend.synchronize()
    assert backend.peak_memory() > 0 and backend.available_memory() > 2**20


@pytest.mark.parametrize("count", [0, 1, 2, 5, 64])
def test_a_batch_splits_into_ordered_ranges_each_run_once(backend, count):
    ranges = backend.batch_ranges(count)
    assert ranges[0][0] == 0 and ranges[-1][1] == count and all(lo < hi for lo, hi in ranges if count)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    ran = []
    backend.over_ranges(ranges, lambda part, lo, hi: ran.append((part, lo, hi)))
    assert sorted(ran) == [(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]


def test_the_capabilities_behave(backend):
    with backend.overlapping():
        with backend.aside() as aside:
            assert aside in (True, False)
        with backend.aside(when=False) as aside:
            assert aside is False
    pinned = backend.pinned_empty((2, 3), np.float32)
    assert isinstance(pinned, np.ndarray) and pinned.shape == (2, 3)
    pinned[...] = 7
    upload = backend.uploader([pinned])
    (on_device,) = upload([pinned])
    np.testing.assert_array_equal(backend.to_host(on_device), pinned)
    upload.done()
    backend.set_tf32(False)
    if not backend.can_capture:
        with pytest.raises(BackendError, match="cannot capture"):
            backend.capture(lambda: None)
        return
    out = backend.xp.zeros(3)
    graph = backend.capture(lambda: out.__iadd__(1))  # one eager run, then the capture
    backend.launch(graph)
    backend.launch(graph)
    np.testing.assert_array_equal(backend.to_host(out), [3, 3, 3])


# *** graph validity, on a fake backend whose "graphs" are the captured functions ***
def test_a_graph_is_captured_once_and_replayed_until_invalidated():
    fake, calls = FakeGraphs(), []
    cache = graphs.GraphCache(fake)
    for _ in range(3):
        cache.run("a", lambda: calls.append("a"))
    assert (fake.captures, fake.launches, len(calls)) == (1, 2, 3)
    graphs.invalidate(fake)
    cache.run("a", lambda: calls.append("a"))
    assert (fake.captures, fake.launches) == (2, 2)
    cache.run("b", lambda: calls.append("b"))  # another key: its own graph
    assert fake.captures == 3 and calls[-1] == "b"


def test_invalidating_one_backend_leaves_the_others_graphs():
    fake, other = FakeGraphs(), FakeGraphs()
    cache = graphs.GraphCache(fake)
    cache.run("a", lambda: None)
    graphs.invalidate(other)
    Blob((2,), backend=other).reshape(3)
    cache.run("a", lambda: None)
    assert (fake.captures, fake.launches) == (1, 1)


def test_a_capture_that_resizes_is_kept_at_the_version_after_it():
    fake = FakeGraphs()
    blob, cache = Blob((2,), backend=fake), graphs.GraphCache(fake)
    cache.run("a", lambda: blob.reshape(5))  # the eager first run sizes a buffer
    cache.run("a", lambda: blob.reshape(5))
    assert (fake.captures, fake.launches) == (1, 1)


def test_a_failed_capture_runs_eagerly_until_something_changes(caplog):
    fake, calls = FakeGraphs(fail=True), []
    cache = graphs.GraphCache(fake)
    cache.run("a", lambda: calls.append(1))
    assert "running eagerly: this fake refuses" in caplog.text
    cache.run("a", lambda: calls.append(1))
    assert (fake.captures, fake.launches, len(calls)) == (0, 0, 2)  # no second try at this version
    fake.fail = False
    graphs.invalidate(fake)
    cache.run("a", lambda: calls.append(1))
    assert fake.captures == 1


def test_blob_changes_void_the_graphs_of_their_backend_only():
    fake = FakeGraphs()
    blob, other = Blob((2, 3), backend=fake), Blob((6,), backend=fake)

    def changes(action):
        before = graphs.version(fake)
        action()
        return graphs.version(fake) != before

    assert not changes(lambda: blob.reshape(2, 3))  # the same shape
    assert not changes(lambda: blob.data.fill(1))  # values are not layout
    assert changes(lambda: blob.reshape(3, 2))
    assert changes(lambda: blob.diff)  # the diff's first allocation
    assert not changes(lambda: blob.diff)
    assert changes(lambda: blob.share_data(other))
    assert not changes(lambda: blob.share_data(other))  # already shared
    assert changes(lambda: blob.release())


NET = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "y" top: "loss" }
"""


def test_a_net_replays_while_its_shapes_hold_and_captures_again_after_a_reshape():
    fake = FakeGraphs()
    net = caffe.Net(parse_text(NET, caffe_pb2.NetParameter()), caffe.TEST, backend=fake)
    net.blobs["x"].data[...] = 1
    losses = [float(net.run_forward()) for _ in range(3)]
    assert (fake.captures, fake.launches) == (1, 2) and len(set(losses)) == 1
    net.blobs["x"].reshape(5, 3)
    net.blobs["y"].reshape(5, 2)
    net.run_forward()
    assert fake.captures == 2 and net.blobs["h"].shape == (5, 2)
    caffe.set_cuda_graphs(False)
    try:
        net.run_forward()
        assert (fake.captures, fake.launches) == (2, 2)
        assert net.eager_reason() == "CUDA graphs are off"
    finally:
        caffe.set_cuda_graphs(True)


# *** pycaffe's host views of device blobs ***
SHARED = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 2 } }
"""


def test_a_write_through_one_nets_view_reaches_a_net_sharing_its_weights():
    """The solver's test nets share the train net's weights: a write through the train net's
    params view is seen by the test net's next run, though the train net has not run since."""
    fake = FakeDevice()
    train, test = (caffe.Net(parse_text(SHARED, caffe_pb2.NetParameter()), phase, backend=fake)
                   for phase in (caffe.TRAIN, caffe.TEST))
    test.share_with(train)
    train.params["ip"][0].data[...] = np.arange(6.0).reshape(2, 3)
    train.params["ip"][1].data[...] = 1
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(test.forward(x=x)["h"], [[4, 13], [4, 13]])
