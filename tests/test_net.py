"""Net construction and execution, checked against Caffe's Net::Init rules."""

from pathlib import Path

import numpy as np
import pytest

import espresso as caffe
from espresso import backend
from espresso.errors import EspressoError, MemoryLimitError, ModelFileError, NetError, PrototxtError, ShapeError
from espresso.layers import common
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.runtime import memory_limit


def net_from(text, phase=caffe.TRAIN, tmp_path=None, **kw):
    if tmp_path is not None:
        path = tmp_path / "net.prototxt"
        path.write_text(text)
        return caffe.Net(str(path), phase, **kw)
    return caffe.Net(parse_text(text, caffe_pb2.NetParameter()), phase, **kw)


INPUT = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }\n'
INPUT_XY = ('layer { name: "in" type: "Input" top: "x" top: "y" '
            'input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }\n')


def ip(name, bottom, top, n, extra=""):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {extra} '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')


# *** state rules ***
RULES = INPUT + """
layer { name: "train_only" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "x" top: "b" include { phase: TEST } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "c" exclude { phase: TEST } }
layer { name: "staged" type: "ReLU" bottom: "x" top: "d" include { stage: "s1" stage: "s2" } }
layer { name: "not_staged" type: "ReLU" bottom: "x" top: "e" include { not_stage: "s1" } }
layer { name: "leveled" type: "ReLU" bottom: "x" top: "f" include { min_level: 1 max_level: 2 } }
"""


@pytest.mark.parametrize("phase, level, stages, expected", [
    (caffe.TRAIN, 0, (), ["x", "train_only", "not_test", "not_staged"]),
    (caffe.TEST, 0, (), ["x", "test_only", "not_staged"]),
    (caffe.TEST, 1, ("s1", "s2"), ["x", "test_only", "staged", "leveled"]),
    (caffe.TEST, 3, ("s1",), ["x", "test_only"]),
])
def test_state_rules_filter_layers(phase, level, stages, expected):
    net = net_from(RULES, phase, level=level, stages=stages)
    assert [n for n, layer in zip(net._layer_names, net.layers) if layer.type != "Split"] == expected


def test_include_and_exclude_together_is_an_error(tmp_path):
    text = INPUT + ('layer { name: "r" type: "ReLU" bottom: "x" top: "x" '
                    'include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(NetError, match=r"net.prototxt:2: layer 'r'.*either include"):
        net_from(text, tmp_path=tmp_path)


# *** splits ***
SPLIT = INPUT_XY + ip("ip1", "x", "h", 2) + ip("ip2", "h", "p", 2) + ip("ip3", "h", "q", 2) + """
layer { name: "l1" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "l1" }
layer { name: "l2" type: "EuclideanLoss" bottom: "q" bottom: "y" top: "l2" loss_weight: 0.5 }
"""


def test_split_layers_are_inserted_with_caffes_names():
    net = net_from(SPLIT)
    assert "h_ip1_0_split" in net._layer_names
    assert net.bottom_names["ip2"] == ["h_ip1_0_split_0"]
    assert net.bottom_names["ip3"] == ["h_ip1_0_split_1"]
    assert net.top_names["y_in_1_split"] == ["y_in_1_split_0", "y_in_1_split_1"]


def numeric_gradient_check(net, blob, n_checks=6, eps=1e-4, seed=0):
    """Compare net.forward_backward's gradient for `blob` with centred differences of the loss."""
    net.clear_param_diffs()
    net.forward_backward()
    analytic = np.array(blob.diff)
    rng = np.random.default_rng(seed)
    for flat in rng.choice(blob.count, size=min(n_checks, blob.count), replace=False):
        idx = np.unravel_index(flat, blob.shape)
        saved = blob.data[idx]
        blob.data[idx] = saved + eps
        plus = float(net.run_forward())
        blob.data[idx] = saved - eps
        minus = float(net.run_forward())
        blob.data[idx] = saved
        numeric = (plus - minus) / (2 * eps)
        assert abs(numeric - analytic[idx]) <= 1e-4 * max(1, abs(numeric)), (idx, numeric, analytic[idx])


def test_split_gradients_add_up_and_loss_weights_scale():
    net = net_from(SPLIT, dtype=np.float64)
    rng = np.random.default_rng(3)
    net.blobs["x"].data[...] = rng.standard_normal((4, 3))
    net.blobs["y"].data[...] = rng.standard_normal((4, 2))
    loss = float(net.run_forward())
    assert loss == pytest.approx(float(net.blobs["l1"].data) + 0.5 * float(net.blobs["l2"].data))
    for name in ("ip1", "ip2", "ip3"):
        for blob in net.params[name]:
            numeric_gradient_check(net, blob)


# *** in place ***
def test_inplace_relu_shares_the_blob():
    net = net_from(INPUT + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')
    assert list(net.blobs) == ["x"]


def test_inplace_on_a_layer_that_cannot_is_refused():
    text = INPUT + ip("ip", "x", "x", 3)
    with pytest.raises(NetError, match="cannot run in place"):
        net_from(text)


def test_inplace_overwrite_of_a_top_needed_by_backward_is_refused():
    text = INPUT_XY + ip("ip", "x", "h", 2) + """
layer { name: "sig" type: "Sigmoid" bottom: "h" top: "s" }
layer { name: "drop" type: "Dropout" bottom: "s" top: "s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "y" top: "loss" }
"""
    with pytest.raises(NetError, match=r"layer 'drop'.*layer 'sig' \(Sigmoid\) needs"):
        net_from(text)
    net = net_from(text, caffe.TEST)  # a forward-only TEST net may keep the layout, and runs it
    net.blobs["x"].data[...] = np.arange(12.0).reshape(net.blobs["x"].shape) / 10
    net.forward()
    h = net.blobs["h"].data
    np.testing.assert_allclose(net.blobs["s"].data, 1 / (1 + np.exp(-h)), rtol=1e-6)  # Dropout: identity in TEST


def test_duplicate_top_is_an_error():
    text = INPUT + ('layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
                    'layer { name: "b" type: "ReLU" bottom: "x" top: "y" }')
    with pytest.raises(NetError, match="top blob 'y' produced by multiple sources"):
        net_from(text)


# *** errors that name the place ***
def test_unknown_bottom_names_file_line_and_suggests(tmp_path):
    text = INPUT + ip("ip1", "x", "ip1", 2) + ip("ip2", "ip_1", "out", 2)
    with pytest.raises(NetError, match=r"net.prototxt:3: layer 'ip2' \(InnerProduct\): unknown bottom blob "
                                       r"'ip_1' \(bottom 0\); did you mean 'ip1'\?"):
        net_from(text, tmp_path=tmp_path)


def test_unknown_type_suggests_the_nearest(tmp_path):
    text = INPUT + 'layer { name: "c" type: "Convolutoin" bottom: "x" top: "c" }'
    with pytest.raises(NetError, match=r"net.prototxt:2: unknown layer type 'Convolutoin'; did you mean 'Convolution'"):
        net_from(text, tmp_path=tmp_path)


def test_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  typo "b"\n}\n')
    with pytest.raises(PrototxtError, match=r"bad.prototxt:4:\d+: "):
        caffe.Net(str(path), caffe.TEST)


# *** parameters: sharing, multipliers, arena ***
SHARED = INPUT_XY + ip("ip1", "x", "p", 2, 'param { name: "w" lr_mult: 2 } param { name: "b" }') \
    + ip("ip2", "x", "q", 2, 'param { name: "w" } param { name: "b" decay_mult: 0 }') + """
layer { name: "l1" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "l1" }
layer { name: "l2" type: "EuclideanLoss" bottom: "q" bottom: "y" top: "l2" }
"""


def test_shared_params_are_one_blob_in_the_arena():
    net = net_from(SHARED, dtype=np.float64)
    w1, w2 = net.params["ip1"][0], net.params["ip2"][0]
    assert np.shares_memory(w1.data, w2.data) and np.shares_memory(w1.diff, w2.diff)
    assert len(net.learnable_params) == 2
    assert net.params_lr == [2.0, 1.0] and net.params_weight_decay == [1.0, 0.0]
    for blob in net.learnable_params:
        assert np.shares_memory(blob.data, net.arena_data)
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal((4, 3))
    net.blobs["y"].data[...] = rng.standard_normal((4, 2))
    numeric_gradient_check(net, w1)  # the shared diff holds the sum of both uses


def test_a_test_net_holds_no_diff_arena_yet_backward_makes_its_param_diffs():
    """Inference holds no parameter gradients; a TEST net's backward (pycaffe's saliency maps)
    still sums shared params' gradients in one diff."""
    net = net_from(SHARED, dtype=np.float64, phase=caffe.TEST)
    assert net.arena_diff is None
    w1, w2 = net.params["ip1"][0], net.params["ip2"][0]
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal((4, 3))
    net.blobs["y"].data[...] = rng.standard_normal((4, 2))
    numeric_gradient_check(net, w1)
    assert np.shares_memory(w1.diff, w2.diff) and np.abs(w1.diff).max() > 0
    net.clear_param_diffs()
    assert not np.abs(w1.diff).any()


def test_shared_param_shape_mismatch_is_refused():
    text = INPUT + ip("ip1", "x", "p", 2, 'param { name: "w" }') + ip("ip2", "x", "q", 3, 'param { name: "w" }')
    with pytest.raises(ShapeError, match="cannot share param 'w'"):
        net_from(text)


def test_mismatched_lr_mult_on_shared_param_is_refused():
    text = (INPUT + ip("ip1", "x", "p", 2, 'param { name: "w" lr_mult: 1 }')
            + ip("ip2", "x", "q", 2, 'param { name: "w" lr_mult: 2 }'))
    with pytest.raises(NetError, match="mismatched lr_mult"):
        net_from(text)


# *** which layers need backward ***
FROZEN = 'param { lr_mult: 0 } param { lr_mult: 0 }'
BACKWARD = INPUT_XY + ip("ip1", "x", "h", 2) + ip("side", "x", "s", 2) + ip("frozen", "x", "f", 2, FROZEN) + """
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "y" top: "loss" }
"""


def test_layers_not_reaching_a_loss_skip_backward():
    net = net_from(BACKWARD)
    need = dict(zip(net._layer_names, net.layer_need_backward))
    assert need["ip1"] and need["loss"]
    assert not need["side"] and not need["frozen"]


def test_force_backward_fills_input_diffs():
    text = "force_backward: true\n" + BACKWARD
    net = net_from(text, dtype=np.float64)
    net.blobs["x"].data[...] = np.random.default_rng(1).standard_normal((4, 3))
    net.forward()
    diffs = net.backward()
    assert np.abs(diffs["x"]).sum() > 0
    assert all(net.layer_need_backward)


def test_propagate_down_false_leaves_bottom_diff_alone():
    text = INPUT_XY + ip("ip1", "x", "h", 2) + """
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "y" top: "loss"
        propagate_down: false propagate_down: true }
"""
    net = net_from(text)
    assert net.bottom_need_backward[-1] == [False, True]
    assert not net.layer_need_backward[1]  # ip1 gets no gradient, so it skips backward too


# *** pycaffe surface ***
def test_pycaffe_views_and_forward_backward_ranges():
    net = net_from(SPLIT, dtype=np.float64)
    assert net.inputs == ["x", "y"]
    assert net.outputs == ["l1", "l2"]
    assert list(net.params) == ["ip1", "ip2", "ip3"]
    assert [layer.type for layer in net.layers][:2] == ["Input", "Split"]
    x = np.random.default_rng(2).standard_normal((4, 3))
    out = net.forward(x=x, y=np.zeros((4, 2)), blobs=["h"])
    assert set(out) == {"l1", "l2", "h"}
    out = net.forward(end="ip1")
    assert set(out) == {"h"}
    with pytest.raises(ShapeError, match="batch"):
        net.forward(x=np.zeros((5, 3)))
    diffs = net.backward(diffs=["h"])
    assert set(diffs) == {"x", "y", "h"}


def test_forward_all_and_forward_backward_all_pad_the_last_batch_and_drop_the_padding():
    text = ('force_backward: true layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }'
            + ip("ip1", "x", "h", 2))
    net = net_from(text, dtype=np.float64)
    w, b = (blob.data.copy() for blob in net.params["ip1"])
    rng = np.random.default_rng(5)
    x, dh = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))  # batches of 4, 4 and 2 + 2 zeros
    out = net.forward_all(x=x, blobs=["x"])
    assert set(out) == {"h", "x"} and out["h"].shape == (10, 2)
    np.testing.assert_allclose(out["h"], x @ w.T + b)
    np.testing.assert_array_equal(out["x"], x)
    outs, diffs = net.forward_backward_all(x=x, h=dh)
    np.testing.assert_allclose(outs["h"], x @ w.T + b)
    np.testing.assert_allclose(diffs["x"], dh @ w)
    with pytest.raises(NetError, match="not an input"):
        net.forward_all(h=dh)
    with pytest.raises(NetError, match="give the items"):
        net.forward_all()


def test_save_and_copy_from_round_trip(tmp_path):
    net = net_from(SPLIT)
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    other = net_from(SPLIT)
    other.copy_from(path)
    for name in net.params:
        for a, b in zip(net.params[name], other.params[name]):
            assert np.array_equal(a.data, b.data)
    again = caffe.Net(_write(tmp_path, SPLIT), path, caffe.TEST)
    assert np.array_equal(again.params["ip1"][0].data, net.params["ip1"][0].data)


def test_repeated_layer_names_take_weights_as_caffe_does(tmp_path):
    source = net_from(INPUT + ip("ip", "x", "y", 2))
    twice = INPUT + ip("ip", "x", "y", 2) + ip("ip", "x", "z", 2)
    path = str(tmp_path / "w.caffemodel")
    source.save(path)
    net = net_from(twice)
    first, second = [layer.blobs[0].data for layer in net.layers if layer.type == "InnerProduct"]
    before = second.copy()
    net.copy_from(path)  # CopyTrainedLayersFrom searches from layer 0: the first 'ip' only
    assert np.array_equal(first, source.params["ip"][0].data) and np.array_equal(second, before)
    pytest.importorskip("h5py")
    path = str(tmp_path / "weights.hdf5")  # HDF5 told by its contents, not by an ".h5" name
    source.save_hdf5(path)
    net = net_from(twice)
    net.copy_from(path)  # CopyTrainedLayersFromHDF5 walks the net's layers: both
    for layer in net.layers:
        if layer.type == "InnerProduct":
            assert np.array_equal(layer.blobs[0].data, source.params["ip"][0].data)


def _write(tmp_path, text):
    path = tmp_path / "n.prototxt"
    path.write_text(text)
    return str(path)


def test_copy_from_shape_mismatch_names_layer_and_shapes(tmp_path):
    net = net_from(SPLIT)
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    other = net_from(SPLIT.replace("num_output: 2", "num_output: 5", 1))
    message = r"w.caffemodel: layer 'ip1': param 0 shape \(2, 3\) does not match net \(5, 3\)"
    with pytest.raises(ShapeError, match=message):
        other.copy_from(path)


def test_save_hdf5_and_load_hdf5_round_trip(tmp_path):
    pytest.importorskip("h5py")
    net, path = net_from(SPLIT), str(tmp_path / "w.caffemodel.h5")
    net.save_hdf5(path)
    for load in ("load_hdf5", "copy_from"):  # copy_from tells HDF5 by its signature, as Caffe
        other = net_from(SPLIT)
        getattr(other, load)(path)
        for name in net.params:
            for a, b in zip(net.params[name], other.params[name], strict=True):
                assert np.array_equal(a.data, b.data)
    again = caffe.Net(_write(tmp_path, SPLIT), path, caffe.TEST)
    assert np.array_equal(again.params["ip3"][1].data, net.params["ip3"][1].data)


def test_hdf5_weights_have_caffes_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    net, path = net_from(SHARED, dtype=np.float64), str(tmp_path / "w.h5")
    net.save_hdf5(path, diff=True)
    with h5py.File(path, "r") as f:
        assert set(f) == {"data", "diff"}
        # Net::ToHDF5: a group for every layer; a shared param has a diff but no data
        assert set(f["data"]) == set(f["diff"]) == set(net._layer_names)  # splits and losses too
        assert set(f["data/l1"]) == set(f["data/ip2"]) == set() and set(f["diff/ip2"]) == {"0", "1"}
        w, b = f["data/ip1/0"], f["data/ip1/1"]
        assert (w.shape, b.shape, w.dtype, b.dtype) == ((2, 3), (2,), np.float64, np.float64)
        assert np.array_equal(w[()], net.params["ip1"][0].data)
        assert np.array_equal(f["diff/ip2/0"][()], net.params["ip2"][0].diff)
    fresh = net_from(SHARED, dtype=np.float64)
    fresh.load_hdf5(path)  # ip2's missing datasets are fine: its params come from ip1
    assert np.array_equal(fresh.params["ip2"][0].data, net.params["ip1"][0].data)
    net32 = net_from(SPLIT)
    net32.save_hdf5(path)
    with h5py.File(path, "r") as f:
        assert f["data/ip1/0"].dtype == np.float32 and "diff" not in f


def test_load_hdf5_mismatches_name_layer_and_shapes(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "w.h5")
    net_from(SPLIT).save_hdf5(path)
    other = net_from(SPLIT.replace("num_output: 2", "num_output: 5", 1))
    with pytest.raises(ShapeError, match=r"w.h5: layer 'ip1': param 0 shape \(2, 3\) does not match net \(5, 3\)"):
        other.copy_from(path)
    with h5py.File(path, "r+") as f:
        del f["data/ip2/1"]
    with pytest.raises(ModelFileError, match=r"w.h5: layer 'ip2': no dataset '1' for param 1"):
        net_from(SPLIT).load_hdf5(path)
    with h5py.File(path, "r+") as f:
        f["data/ip2/1"], f["data/ip2/2"] = np.zeros(2), np.zeros(2)
    with pytest.raises(ModelFileError, match="layer 'ip2': 3 blobs in file, 2 in net"):
        net_from(SPLIT).load_hdf5(path)
    with h5py.File(path, "w") as f:
        f["weights"] = np.zeros(2)
    with pytest.raises(ModelFileError, match="no 'data' group"):
        net_from(SPLIT).load_hdf5(path)


def test_hdf5_refuses_layer_names_it_would_lose_and_writes_big_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    from espresso import hdf5

    net = net_from(SPLIT.replace('name: "ip1"', 'name: "conv1/7x7"'))
    with pytest.raises(ModelFileError, match=r"'conv1/7x7' cannot key HDF5 weights"):
        net.save_hdf5(str(tmp_path / "w.h5"))  # h5py would make a group conv1 holding 7x7
    assert list(tmp_path.iterdir()) == []
    path = str(tmp_path / "big.h5")  # enough groups that HDF5 reads back its own metadata
    hdf5.write_file(path, lambda f: [f.create_group(f"data/layer{i}").create_dataset("0", data=np.ones(3))
                                     for i in range(3000)])
    with h5py.File(path, "r") as f:
        assert len(f["data"]) == 3000 and f["data/layer2999/0"][1] == 1


def test_share_with_uses_the_other_nets_weights():
    a, b = net_from(SPLIT), net_from(SPLIT)
    b.share_with(a)
    a.params["ip1"][0].data[...] = 7
    assert (b.params["ip1"][0].data == 7).all()


def test_reshape_propagates_new_batch():
    net = net_from(SPLIT)
    net.blobs["x"].reshape(7, 3)
    net.blobs["y"].reshape(7, 2)
    net.reshape()
    assert net.blobs["p"].shape == (7, 2)
    net.forward()
    assert net.blobs["q"].shape == (7, 2)


def test_a_loss_without_a_top_gets_an_anonymous_one():
    text = INPUT_XY + ip("ip1", "x", "h", 2) + 'layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "y" }'
    net = net_from(text, dtype=np.float64)
    net.blobs["x"].data[...] = 1.0
    assert net.outputs == [] and net.forward_backward() > 0
    assert np.abs(net.params["ip1"][0].diff).sum() > 0


# *** sizes checked before allocating ***
DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "lenet" / "lenet_deploy.prototxt"


@pytest.mark.parametrize("change, message", [
    (("kernel_size: 5", "kernel_size: 100000"), r"layer 'conv1' \(Convolution\): a param or workspace blob of shape "
                                                r"\(20, 1, 100000, 100000\) needs 745 GiB, more than"),
    (("kernel_size: 5", "kernel_size: 5 pad: 100000"), r"layer 'conv1' \(Convolution\): blob 'conv1' of shape "
                                                       r"\(1, 20, 200024, 200024\) needs"),
    (("num_output: 500", "num_output: 1000000000"), r"layer 'ip1' \(InnerProduct\): .* shape \(1000000000, 800\)"),
    (("dim: 1 dim: 1", "dim: 1000000000 dim: 1"), r"layer 'data' \(Input\): blob 'data' of shape \(1000000000, "),
    (("dim: 1 dim: 1", "dim: 9223372036854775000 dim: 1"), r"blob 'data' of shape \(9223372036854775000, 1, 28, 28\)"),
])
def test_absurd_sizes_are_refused_before_allocating(change, message):
    text = DEPLOY.read_text().replace(*change, 1)
    with pytest.raises(MemoryLimitError, match=message + ".*limit"):
        net_from(text, caffe.TEST)


def test_a_net_over_the_memory_limit_is_refused_naming_the_layer(monkeypatch):
    caffe.set_memory_limit(1_700_000)  # LeNet deploy at batch 1: 1.78 MB of blobs and weights, ip1 1.6 MB of it
    try:
        with pytest.raises(MemoryLimitError, match=r"layer 'ip1' \(InnerProduct\): the net's blobs need .* with this "
                                                   r"layer's \(the largest of shape \(500, 800\)\), more than"):
            net_from(DEPLOY.read_text(), caffe.TEST)
    finally:
        caffe.set_memory_limit(None)
    monkeypatch.setenv("ESPRESSO_MEMORY_LIMIT", "2M")
    assert memory_limit(backend.get("cpu")) == 2 << 20
    monkeypatch.setenv("ESPRESSO_MEMORY_LIMIT", "lots")
    with pytest.raises(EspressoError, match="ESPRESSO_MEMORY_LIMIT: give bytes"):
        net_from(DEPLOY.read_text(), caffe.TEST)
    monkeypatch.delenv("ESPRESSO_MEMORY_LIMIT")
    assert net_from(DEPLOY.read_text(), caffe.TEST).blobs["prob"].shape == (1, 10)


def _hdf5_file(tmp_path, build):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        build(f, h5py)
    return path


@pytest.mark.parametrize("case, build, message", [
    ("no data group", lambda f, h5: f.create_group("other"), "no 'data' group"),
    ("a dataset for a layer", lambda f, h5: f.create_dataset("data/ip1", data=np.ones(3)), "'ip1' is not a group"),
    ("a dataset for the data group", lambda f, h5: f.create_dataset("data", data=np.ones(3)), "'data' is not a group"),
    ("a soft-link loop", lambda f, h5: (f.create_group("data"), f["data"].__setitem__("ip1", h5.SoftLink("/data/ip1"))),
     "'ip1' cannot be resolved"),
    ("an external link", lambda f, h5: (f.create_group("data"), f["data"].__setitem__("ip1", h5.ExternalLink(
        "/etc/other.h5", "/x"))), r"'ip1' links to another file \(/etc/other.h5\); not followed"),
    ("a huge declared dataset", lambda f, h5: f.create_group("data/ip1").create_dataset("0", (2**40,), "f4",
                                                                                          chunks=(1024,)),
     r"dataset '0' of shape \(1099511627776,\) needs 4.1e\+03 GiB, more than"),
])
def test_a_malformed_hdf5_weights_file_is_refused(tmp_path, case, build, message):
    path = _hdf5_file(tmp_path, build)
    assert path.stat().st_size < 100_000
    with pytest.raises(ModelFileError if "huge" not in case else MemoryLimitError, match=message):
        net_from(SPLIT).load_hdf5(str(path))


# *** layers that split the batch over the CPU's threads ***
WF = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def conv_layer(name, bottom, fields):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ {fields} {WF} }} }}\n')


def pool_layer(name, bottom, pool):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: {pool} kernel_size: 2 stride: 2 }} }}\n')


SPLIT_BATCH = ('force_backward: true\nlayer { name: "in" type: "Input" top: "x" top: "label" input_param { '
         'shape { dim: 5 dim: 2 dim: 10 dim: 9 } shape { dim: 5 } } }\n'
         + conv_layer("c1", "x", "num_output: 3 kernel_size: 3 pad: 1") + pool_layer("p1", "c1", "MAX")
         + conv_layer("c2", "p1", "num_output: 4 kernel_size: 2") + pool_layer("p2", "c2", "AVE")
         + ip("ip", "p2", "ip", 3)
         + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')


def run_split_and_whole(monkeypatch, text, threads, hooks=False):
    """SPLIT_BATCH-like `text` run forward and backward on 1 thread and on `threads`: each run's
    [loss, the input's diff, the param diffs], and the batch splits (backend.over_ranges) of the
    second run."""
    cpu, before = backend.get("cpu"), backend.get("cpu").threads
    calls = []
    over_ranges = type(cpu).over_ranges
    monkeypatch.setattr(type(cpu), "over_ranges", lambda self, r, run: (calls.extend([r] * (len(r) > 1)),
                                                                       over_ranges(self, r, run)))
    results = []
    try:
        for count in (1, threads):
            caffe.set_num_threads(count)
            net = net_from(text)
            rng = np.random.default_rng(7)
            for blobs in net.params.values():
                for blob in blobs:  # (diffs too: the param gradients accumulate onto them)
                    blob.data[...], blob.diff[...] = rng.standard_normal((2,) + blob.data.shape)
            net.blobs["x"].data[...] = rng.standard_normal((5, 2, 10, 9))
            net.blobs["label"].data[...] = [0, 2, 1, 1, 0]
            for when in ("before_forward", "after_backward") if hooks else ():
                getattr(net, when)(lambda i: None)
            calls.clear()
            loss = net.forward()["loss"].copy()
            net.backward()
            diffs = [b.diff.copy() for blobs in net.params.values() for b in blobs]
            results.append([loss, net.blobs["x"].diff.copy()] + diffs)
    finally:
        caffe.set_num_threads(before)
    return results, calls


@pytest.mark.parametrize("threads, hooks, splits", [(1, False, 0), (3, False, 2), (3, True, 8)])
def test_layers_that_split_the_batch_alike_run_as_one_chain(monkeypatch, threads, hooks, splits):
    """conv, pool, conv, pool split a batch of 5 into 3 parts: one split each way (forward, then
    backward), or one a layer where callbacks run between layers; the results as in one part."""
    results, calls = run_split_and_whole(monkeypatch, SPLIT_BATCH, threads, hooks)
    assert len(calls) == splits
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert np.abs(results[1][1]).max() > 0  # the input's gradient came through all four layers


@pytest.mark.parametrize("fields", ["", "transpose: true", "bias_term: false", "transpose: true bias_term: false"])
def test_an_inner_product_joins_the_chain_before_it(monkeypatch, fields):
    """A large enough InnerProduct (here: any) ends the chain: the batch's rows of its output and
    of its bottom gradient per part, and a share of its outputs' param gradients per part over
    the whole batch; the results as in one part.  Alone (callbacks between the layers) it runs
    whole."""
    monkeypatch.setattr(common, "SPLIT_MULTIPLY_ADDS", 0)
    parts = []
    for name in ("forward_part", "backward_part"):
        method = getattr(common.InnerProductLayer, name)
        monkeypatch.setattr(common.InnerProductLayer, name,
                            lambda self, *a, method=method, name=name: (parts.append((name, a[-3])), method(self, *a)))
    text = SPLIT_BATCH.replace("num_output: 3 weight_filler", f"num_output: 3 {fields} weight_filler")
    results, calls = run_split_and_whole(monkeypatch, text, 3)
    split = [(name, part) for name in ("forward_part", "backward_part") for part in range(3)]
    assert len(calls) == 2 and sorted(parts) == sorted([("forward_part", 0)] + split)  # (1 thread, then 3)
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    parts.clear()
    alone, calls = run_split_and_whole(monkeypatch, text, 3, hooks=True)
    assert len(calls) == 8 and parts == [("forward_part", 0)] * 2
    for got, want in zip(alone[1], results[1]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_inner_products_in_a_row_chain_apart_in_backward(monkeypatch):
    """Two InnerProducts after the convolutions (as a low-rank split writes them): forward, one
    chain; backward, the second one runs before the first starts the chain below it, since the
    first's param gradients read every image's rows of the second's bottom gradient.  The first
    has fewer outputs (2) than parts (3): one part has no share of its param gradients."""
    monkeypatch.setattr(common, "SPLIT_MULTIPLY_ADDS", 0)
    text = SPLIT_BATCH.replace(ip("ip", "p2", "ip", 3), ip("ip_a", "p2", "h", 2) + ip("ip", "h", "ip", 3))
    results, calls = run_split_and_whole(monkeypatch, text, 3)
    assert [len(r) for r in calls] == [3, 3]  # the forward chain; backward, the one below the second
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_a_convolution_with_a_loss_weight_runs_after_the_chain_before_it():
    """It could split but is not chained (its loss is read after its forward): the convolution
    before it must have run first."""
    text = ('force_backward: true\nlayer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 '
            'dim: 2 dim: 8 dim: 8 } } }\n' + conv_layer("c1", "x", "num_output: 3 kernel_size: 3 pad: 1")
            + conv_layer("c2", "c1", "num_output: 2 kernel_size: 3").replace('top: "c2"', 'top: "c2" loss_weight: 1'))
    before, results = backend.get("cpu").threads, []
    try:
        for count in (1, 3):
            caffe.set_num_threads(count)
            net = net_from(text)
            rng = np.random.default_rng(3)
            for blob in [b for blobs in net.params.values() for b in blobs] + [net.blobs["x"]]:
                blob.data[...] = rng.standard_normal(blob.data.shape)
            loss = net.forward()["c2"].sum()
            net.backward()
            results.append([loss, net.blobs["x"].diff.copy(), net.params["c1"][0].diff.copy()])
    finally:
        caffe.set_num_threads(before)
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
