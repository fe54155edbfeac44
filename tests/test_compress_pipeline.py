"""Deep Compression end to end: `espresso compress` / `decompress` / `test` on the embedded
Fashion-MNIST subset (LeNet-300-100 and LeNet, briefly trained), each stage alone, a V1-format
.caffemodel (the format of Caffe-trained zoo models), and, behind `slow`, the issue's targets on
the full data set (see benchmarks/compress_lenet.sh)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import espresso
from espresso import cli
from espresso.compress import read_model
from espresso.compress.pipeline import compress
from espresso.compress.runtime import CompressedLayer
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "espresso" / "datasets" / "fmnist_subset"


def _setup(work, example, net_file, solver_file, iters):
    net = (ROOT / example / net_file).read_text().replace("examples/lenet/", f"{work}/")
    net = net.replace("batch_size: 100", "batch_size: 50")
    (work / "net.prototxt").write_text(net)
    solver = (ROOT / example / solver_file).read_text()
    solver = re.sub(r"net: .*", f'net: "{work}/net.prototxt"', solver)
    solver = re.sub(r"test_iter: \d+", "test_iter: 20", solver)  # the subset's 1,000 test images
    solver = re.sub(r"test_interval: \d+", "test_interval: 100000", solver)
    solver = re.sub(r'snapshot_prefix: .*', f'snapshot_prefix: "{work}/snap"', solver) + "random_seed: 3\n"
    (work / "solver.prototxt").write_text(solver)
    trainer = espresso.get_solver(str(work / "solver.prototxt"))
    trainer.step(iters)
    trainer.net.save(str(work / "trained.caffemodel"))
    return work


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlp")
    assert cli.main(["prepare-fmnist", str(work), "--source", str(SUBSET)]) == 0
    return _setup(work, "examples/lenet_300_100", "lenet_300_100_train_test.prototxt", "lenet_300_100_solver.prototxt",
                  600)


def run(*args):
    return subprocess.run([sys.executable, "-m", "espresso.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_compress_command_report_decompress_and_test(mlp, tmp_path):
    out, report, plot = tmp_path / "m.espz", tmp_path / "r.json", tmp_path / "w.png"
    result = run("compress", "--model", str(mlp / "net.prototxt"), "--weights", str(mlp / "trained.caffemodel"),
                 "--solver", str(mlp / "solver.prototxt"), "--prune", "*=0.9,ip3=0.7", "--bits", "*=5",
                 "--prune-steps", "2", "--retrain-iters", "150", "--quant-iters", "100", "--output", str(out),
                 "--report", str(report), "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["original_bytes"] == 4 * (784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    assert r["compressed_bytes"] == out.stat().st_size
    assert r["ratio"] == pytest.approx(r["original_bytes"] / out.stat().st_size)
    assert r["ratio"] > 25
    assert [row["layer"] for row in r["layers"]] == ["ip1", "ip2", "ip3"]
    assert r["layers"][0]["kept_pct"] == pytest.approx(10, abs=0.01) and r["layers"][0]["bits"] == 5
    assert r["accuracy_before"] > 0.65 and r["accuracy_after"] > r["accuracy_before"] - 0.05
    assert set(r["accuracy"]) >= {"original", "pruned", "quantized", "quantized_finetuned", "deployed"}
    assert plot.stat().st_size > 10_000
    assert "P+Q+H" in result.stderr and f"{r['ratio']:.1f}x" in result.stdout
    # espresso test loads the compressed file directly, and gets the reported accuracy
    scored = run("test", "--model", str(mlp / "net.prototxt"), "--weights", str(out), "--iterations", "20")
    assert scored.returncode == 0, scored.stderr[-2000:]
    accuracy = float(re.search(r"\] accuracy = ([\d.]+)", scored.stderr).group(1))
    assert accuracy == pytest.approx(r["accuracy_after"], abs=1e-4)
    # decompress: a .caffemodel that scores the same
    assert run("decompress", str(out), str(tmp_path / "d.caffemodel")).returncode == 0
    dense = run("test", "--model", str(mlp / "net.prototxt"), "--weights", str(tmp_path / "d.caffemodel"),
                "--iterations", "20")
    assert float(re.search(r"\] accuracy = ([\d.]+)", dense.stderr).group(1)) == pytest.approx(accuracy, abs=2e-3)
    # a corrupt file is one clear line, not a traceback
    (tmp_path / "bad.espz").write_bytes(out.read_bytes()[:-5])
    bad = run("test", "--model", str(mlp / "net.prototxt"), "--weights", str(tmp_path / "bad.espz"))
    assert bad.returncode == 1 and "truncated" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("stage", ["prune", "quantize", "neither"])
def test_each_stage_alone(mlp, tmp_path, stage):
    out = tmp_path / "m.espz"
    r = compress(str(mlp / "net.prototxt"), str(mlp / "trained.caffemodel"), str(mlp / "solver.prototxt"),
                 prune={"*": 0.8} if stage == "prune" else None, bits={"*": 4} if stage == "quantize" else None,
                 output=out, prune_steps=1, retrain_iters=50, quant_iters=50)
    weights = read_model(out)[0][2][0]
    if stage == "prune":
        assert weights.codebook is None and weights.positions is not None and 4 < r["ratio"] < 10
    elif stage == "quantize":
        assert weights.codebook is not None and weights.positions is None and len(weights.codebook) == 16
        assert 6 < r["ratio"] < 10  # about 4 bits a weight with Huffman, before pruning
    else:  # no stage given: the paper's recipe (fc 8% kept, the classifier 25%; 5 bits)
        assert [row["kept_pct"] for row in r["layers"]] == pytest.approx([8, 8, 25], abs=0.01)
        assert [row["bits"] for row in r["layers"]] == [5, 5, 5] and r["ratio"] > 25
    assert r["accuracy_after"] > r["accuracy_before"] - 0.05


def test_stages_chain_across_runs(mlp, tmp_path):
    """Prune in one run, quantize the pruned file in another: its zeros stay pruned."""
    args = str(mlp / "net.prototxt"), str(tmp_path / "p.espz"), str(mlp / "solver.prototxt")
    compress(args[0], str(mlp / "trained.caffemodel"), args[2], prune={"*": 0.8}, output=args[1], prune_steps=1,
             retrain_iters=30)
    r = compress(*args, bits={"*": 4}, output=tmp_path / "q.espz", quant_iters=30)
    weights = read_model(tmp_path / "q.espz")[0][2][0]
    assert weights.codebook is not None and weights.positions is not None
    assert r["layers"][0]["kept_pct"] == pytest.approx(20, abs=0.01)
    assert (weights.dense() != 0).mean() <= 0.2


def test_lenet_with_convolutions_runs_compressed(tmp_path_factory):
    work = tmp_path_factory.mktemp("lenet")
    assert cli.main(["prepare-fmnist", str(work), "--source", str(SUBSET)]) == 0
    _setup(work, "examples/lenet", "lenet_train_test.prototxt", "lenet_solver.prototxt", 150)
    out = work / "m.espz"
    r = compress(str(work / "net.prototxt"), str(work / "trained.caffemodel"), str(work / "solver.prototxt"),
                 prune={"*": 0.9, "conv1": 0.3}, bits="paper", output=out, prune_steps=1, retrain_iters=40,
                 quant_iters=40)
    assert {row["layer"]: row["bits"] for row in r["layers"]} == {"conv1": 8, "conv2": 8, "ip1": 5, "ip2": 5}
    net = espresso.Net(str(work / "net.prototxt"), str(out), espresso.TEST)
    assert [n for n, layer in net.layer_dict.items() if isinstance(layer, CompressedLayer)] == \
        ["conv1", "conv2", "ip1", "ip2"]
    assert r["ratio"] > 20 and r["accuracy_after"] == pytest.approx(r["accuracy"]["quantized_finetuned"], abs=2e-3)


def _v1_caffemodel(src, dst):
    """A V1 ('layers', enum types, legacy 4-D blob dims) .caffemodel, as Caffe-trained zoo
    models are, holding the weights of `src`."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString(Path(src).read_bytes())
    old = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        if not layer.blobs:
            continue
        v1 = old.layers.add(name=layer.name, type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
        for blob in layer.blobs:
            dims = [1] * (4 - len(blob.shape.dim)) + list(blob.shape.dim)
            v1.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3], data=blob.data)
    Path(dst).write_bytes(old.SerializeToString())


def test_a_v1_format_caffemodel_compresses_and_runs(mlp, tmp_path):
    v1 = tmp_path / "v1.caffemodel"
    _v1_caffemodel(mlp / "trained.caffemodel", v1)
    assert caffe_pb2.NetParameter.FromString(v1.read_bytes()).layers[0].blobs[0].height == 300
    out = tmp_path / "m.espz"
    r = compress(str(mlp / "net.prototxt"), str(v1), str(mlp / "solver.prototxt"), prune={"*": 0.9},
                 bits={"*": 5}, output=out, prune_steps=1, retrain_iters=50, quant_iters=50)
    dense = compress(str(mlp / "net.prototxt"), str(mlp / "trained.caffemodel"), str(mlp / "solver.prototxt"),
                     output=tmp_path / "plain.espz")
    assert r["accuracy_before"] == pytest.approx(dense["accuracy_before"])  # the same weights were read
    net = espresso.Net(str(mlp / "net.prototxt"), str(out), espresso.TEST)
    assert isinstance(net.layer_dict["ip1"], CompressedLayer) and r["ratio"] > 25


# *** the targets on the full data set (minutes; `bash tools/test.sh -m slow`) ***
TARGETS = {"lenet_300_100": (40, "examples/lenet_300_100/lenet_300_100_train_test.prototxt",
                             "examples/lenet_300_100/lenet_300_100_solver.prototxt"),
           "lenet": (39, "examples/lenet/lenet_train_test.prototxt", "examples/lenet/lenet_solver.prototxt")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_full_fashion_mnist_targets(name, tmp_path):
    from espresso.data.fmnist import fashion_mnist_dir

    if "subset" in fashion_mnist_dir().description:
        pytest.skip("the full Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    result = subprocess.run(["bash", "benchmarks/compress_lenet.sh", name, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / f"{name}_report.json").read_text())
    ratio, _, _ = TARGETS[name]
    assert r["ratio"] >= ratio and r["accuracy_after"] >= r["accuracy_before"] - 0.005, (r["ratio"], r["accuracy"])


@pytest.mark.parametrize("prune, message", [({"*": 1.5}, r"fraction pruned must be in \[0, 1\), got 1.5"),
                                            ({"ip1": "q-1"}, "quality after 'q' must be positive")])
def test_impossible_pruning_is_refused(mlp, tmp_path, prune, message):
    with pytest.raises(EspressoError, match=message):
        compress(str(mlp / "net.prototxt"), str(mlp / "trained.caffemodel"), str(mlp / "solver.prototxt"),
                 prune=prune, output=tmp_path / "m.espz")
