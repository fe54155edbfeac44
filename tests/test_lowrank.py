"""Low-rank compression (Kim et al.): EVBMF ranks, Tucker-2 and SVD factors, the decomposed
net, and `espresso compress --tucker/--svd` end to end on LeNet; `--hash` (HashedNets) on
LeNet-300-100."""

import json

import numpy as np
import pytest
from example_nets import example_files

import espresso
from espresso import cli
from espresso.compress.lowrank import decompose, evbmf_rank, parse, plan, svd_split, tucker2
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_text

pytest.importorskip("scipy")


@pytest.mark.parametrize("rows, cols, rank, noise", [(50, 80, 7, 0.1), (200, 300, 20, 0.5), (20, 150, 5, 0.05)])
def test_evbmf_finds_the_planted_rank_and_none_in_noise(rows, cols, rank, noise, rng):
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    matrix += noise * rng.standard_normal((rows, cols))
    assert evbmf_rank(matrix) == evbmf_rank(matrix.T) == rank
    assert evbmf_rank(rng.standard_normal((rows, cols))) == 0


def test_factors_are_exact_at_full_rank_and_best_when_truncated(rng):
    kernel = rng.standard_normal((8, 5, 3, 3))
    first, core, last = tucker2(kernel, 8, 5)
    assert (first.shape, core.shape, last.shape) == ((5, 5, 1, 1), (8, 5, 3, 3), (8, 8, 1, 1))
    np.testing.assert_allclose(np.einsum("rskl,or,si->oikl", core, last[:, :, 0, 0], first[:, :, 0, 0]), kernel,
                               atol=1e-12)
    weights = rng.standard_normal((6, 9))
    errors = [np.linalg.norm(np.dot(*svd_split(weights, r)[::-1]) - weights) for r in range(1, 7)]
    assert errors[-1] < 1e-12 and all(a > b for a, b in zip(errors, errors[1:]))
    singular = np.linalg.svd(weights, compute_uv=False)
    assert errors[1] == pytest.approx(np.sqrt(np.sum(singular[2:] ** 2)))  # Eckart-Young: the best rank 2


NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "gaussian" }
                            bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


def test_the_decomposed_net_computes_the_same_at_full_rank(rng):
    param = parse_text(NET, caffe_pb2.NetParameter())
    net = espresso.Net(param, espresso.TEST)
    new_param, weights = decompose(param, net, plan(net, {"conv": (6, 3)}, {"ip": (7,)}))
    names = ["data", "conv_in", "conv_core", "conv_out", "relu", "ip_in", "ip_out"]
    assert [lp.name for lp in new_param.layer] == names
    assert new_param.layer[2].convolution_param.stride == [2]
    assert new_param.layer[1].convolution_param.kernel_size == [1]
    assert not new_param.layer[1].convolution_param.bias_term and new_param.layer[3].convolution_param.bias_term
    decomposed = espresso.Net(new_param, espresso.TEST)
    for name, arrays in weights.items():
        for view, array in zip(decomposed.params[name], arrays):
            view.data[...] = array.reshape(view.data.shape)
    data = rng.standard_normal((2, 3, 9, 9))
    np.testing.assert_allclose(decomposed.forward(data=data)["ip"], net.forward(data=data)["ip"], rtol=1e-4, atol=1e-4)


def test_impossible_ranks_and_unknown_layers_are_refused_before_any_work():
    param = parse_text(NET, caffe_pb2.NetParameter())
    net = espresso.Net(param, espresso.TEST)
    with pytest.raises(EspressoError, match=r"--tucker conv: ranks \(7, 2\) are impossible for 6 outputs and 3"):
        plan(net, {"conv": (7, 2)}, {})
    with pytest.raises(EspressoError, match=r"--svd ip: rank \(0,\) is impossible"):
        plan(net, {}, {"ip": (0,)})
    with pytest.raises(EspressoError, match="--svd conv: the net has no InnerProduct layer of that name"):
        plan(net, {}, {"conv": "auto"})
    with pytest.raises(EspressoError, match="EVBMF finds nothing above the noise"):
        plan(net, {}, {"ip": "auto"})  # random weights: no structure
    assert parse("conv1,conv2=16:12", "tucker") == {"conv1": "auto", "conv2": (16, 12)}
    with pytest.raises(EspressoError, match="give LAYER, or LAYER=RANK"):
        parse("ip1=many", "svd")


def _example(tmp_path, folder, name):
    """The example's net and solver over LMDBs of the embedded subset in tmp_path, with weights
    from its fillers (net.prototxt, solver.prototxt, w.caffemodel)."""
    net, _ = example_files(tmp_path, folder, name)
    espresso.Net(net, espresso.TRAIN).save(str(tmp_path / "w.caffemodel"))


def test_compress_tucker_and_svd_end_to_end_on_lenet(tmp_path):
    """Full ranks change nothing; low ranks shrink the net, which fine-tuning then trains; the
    decomposed net is an ordinary Caffe net with its weights, and the report has D1's keys."""
    _example(tmp_path, "lenet", "lenet")
    common = ["compress", "--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
              "--solver", str(tmp_path / "solver.prototxt"), "--output-model", str(tmp_path / "lr.prototxt"),
              "--output", str(tmp_path / "lr.caffemodel"), "--report", str(tmp_path / "lr.json")]
    assert cli.main(common + ["--tucker", "conv2=50:20", "--svd", "ip1=500", "--retrain-iters", "0"]) == 0
    report = json.loads((tmp_path / "lr.json").read_text())
    assert report["accuracy"]["decomposed"] == report["accuracy"]["original"]
    assert cli.main(common + ["--tucker", "conv2=8:6", "--svd", "ip1=20", "--retrain-iters", "20"]) == 0
    report = json.loads((tmp_path / "lr.json").read_text())
    assert {"ratio", "accuracy_before", "accuracy_after", "original_bytes", "compressed_bytes"} <= set(report)
    rows = {row["layer"]: row for row in report["stages"]}
    assert rows["conv2"]["ranks"] == [8, 6] and rows["conv2"]["weights_after"] == 6 * 20 + 8 * 6 * 25 + 50 * 8
    assert rows["ip1"]["weights_after"] == 20 * 800 + 500 * 20
    assert rows["ip1"]["macs_after"] < rows["ip1"]["macs_before"]
    assert report["ratio"] > 5 and report["original_bytes"] == 431080 * 4
    written = read_text(tmp_path / "lr.prototxt", caffe_pb2.NetParameter())
    tuned = espresso.Net(written, espresso.TEST, weights=str(tmp_path / "lr.caffemodel"))
    assert tuned.params["conv2_core"][0].data.shape == (8, 6, 5, 5)
    # then Deep Compression and int8 of the decomposed net, in the same run
    espz = str(tmp_path / "lr.espz")
    assert cli.main([espz if a == str(tmp_path / "lr.caffemodel") else a for a in common] +
                    ["--tucker", "conv2=8:6", "--svd", "ip1=20", "--retrain-iters", "10", "--prune", "*=0.5",
                     "--bits", "*=5", "--prune-steps", "1", "--quant-iters", "10", "--int8",
                     "--calibration-iters", "2"]) == 0
    both = json.loads((tmp_path / "lr.json").read_text())
    assert both["original_bytes"] == 431080 * 4 and both["ratio"] > 4 * report["ratio"]
    assert {"low rank original", "low rank trained", "compressed deployed"} <= set(both["accuracy"])
    assert [row["stage"] for row in both["stages"]][:2] == ["tucker", "svd"] and both["stages"][-1]["stage"] == "int8"
    deployed = espresso.Net(written, espresso.TEST, weights=espz)
    assert type(deployed.layer_dict["conv2_core"]).__name__ == "Int8Layer"
    assert (tmp_path / "lr.lowrank.caffemodel").exists()


def test_compress_hash_trains_a_hashednet_of_lenet_300_100(tmp_path):
    """--hash 8: every inner product hashed to 1/8 of its weights, trained from the fillers."""
    _example(tmp_path, "lenet_300_100", "lenet_300_100")
    assert cli.main(["compress", "--model", str(tmp_path / "net.prototxt"), "--weights",
                     str(tmp_path / "w.caffemodel"), "--solver", str(tmp_path / "solver.prototxt"), "--hash", "8",
                     "--retrain-iters", "30",
                     "--output-model", str(tmp_path / "h.prototxt"), "--output", str(tmp_path / "h.caffemodel"),
                     "--report", str(tmp_path / "h.json")]) == 0
    written = read_text(tmp_path / "h.prototxt", caffe_pb2.NetParameter())
    hashed = {lp.name: lp.hashed_param.buckets for lp in written.layer if lp.type == "HashedInnerProduct"}
    assert hashed == {"ip1": 784 * 300 // 8, "ip2": 300 * 100 // 8, "ip3": -(-100 * 10 // 8)}
    net = espresso.Net(written, espresso.TEST, weights=str(tmp_path / "h.caffemodel"))
    assert net.params["ip1"][0].shape == (784 * 300 // 8,)
    report = json.loads((tmp_path / "h.json").read_text())
    assert 7 < report["ratio"] < 8 and set(report["accuracy"]) == {"original", "hashed", "trained"}
