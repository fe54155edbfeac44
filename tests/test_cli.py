"""The `espresso` command, end to end on the embedded Fashion-MNIST subset."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from espresso import cli
from espresso.solver.state import read_state

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "espresso" / "datasets" / "fmnist_subset"


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """LMDBs of the embedded subset and a short LeNet solver over them (Caffe's settings, fewer iters)."""
    work = tmp_path_factory.mktemp("lenet")
    assert cli.main(["prepare-fmnist", str(work), "--source", str(SUBSET)]) == 0
    net = (ROOT / "examples/lenet/lenet_train_test.prototxt").read_text()
    (work / "net.prototxt").write_text(net.replace("examples/lenet/", f"{work}/"))
    solver = (ROOT / "examples/lenet/lenet_solver.prototxt").read_text()
    solver = re.sub(r"net: .*", f'net: "{work}/net.prototxt"', solver)
    solver = re.sub(r"max_iter: \d+", "max_iter: 200", solver)
    solver = re.sub(r"test_interval: \d+", "test_interval: 100", solver)
    solver = re.sub(r"test_iter: \d+", "test_iter: 10", solver)
    solver = re.sub(r"snapshot: \d+", "snapshot: 100", solver)
    solver = re.sub(r'snapshot_prefix: .*', f'snapshot_prefix: "{work}/lenet"', solver) + "random_seed: 7\n"
    (work / "solver.prototxt").write_text(solver)
    return work


def run(*args):
    return subprocess.run([sys.executable, "-m", "espresso.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_train_lenet_end_to_end(lenet, tmp_path):
    """Caffe-style single-dash flags; the net learns; snapshots and the plot are written."""
    plot = tmp_path / "curves.png"
    result = run("train", "-solver", str(lenet / "solver.prototxt"), f"-plot={plot}")
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"accuracy = ([\d.]+)", result.stdout).group(1))
    assert accuracy > 0.7
    assert "Test net output #0: accuracy" in result.stderr
    assert (lenet / "lenet_iter_200.caffemodel").exists() and (lenet / "lenet_iter_200.solverstate").exists()
    assert plot.stat().st_size > 10_000
    log = tmp_path / "train.log"
    log.write_text(result.stderr)
    assert run("plot", str(log), "-o", str(tmp_path / "again.png")).returncode == 0

    scored = run("test", "-model", str(lenet / "net.prototxt"), "-weights", str(lenet / "lenet_iter_200.caffemodel"),
                 "-iterations", "5")
    assert scored.returncode == 0, scored.stderr
    assert float(re.search(r"\] accuracy = ([\d.]+)", scored.stderr).group(1)) > 0.7

    first = (lenet / "lenet_iter_200.caffemodel").read_bytes()
    resumed = run("train", "--solver", str(lenet / "solver.prototxt"),
                  "--snapshot", str(lenet / "lenet_iter_100.solverstate"))
    assert resumed.returncode == 0, resumed.stderr
    # it went on from iteration 100: its first rate is inv's at 100, and it ran 100 iterations to 200
    rates = re.findall(r"Iteration (\d+), lr = ([\d.e-]+)", resumed.stderr)
    assert rates == [("100", f"{0.01 * (1 + 0.0001 * 100) ** -0.75:g}")]
    assert re.findall(r"Iteration (\d+), Testing", resumed.stderr) == ["100", "200"]  # none at 0
    assert read_state(lenet / "lenet_iter_200.solverstate")[0] == 200
    assert (lenet / "lenet_iter_200.caffemodel").read_bytes() != first  # written again, by the resumed run


def test_time_prints_per_layer_and_totals(lenet):
    result = run("time", "--model", str(lenet / "net.prototxt"), "--iterations", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"conv1\s+forward: [\d.]+ ms", result.stderr)
    assert "Average Forward-Backward" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--solver", "missing.prototxt"], "missing.prototxt: cannot read"),
    (["test", "--model", "missing.prototxt"], "missing.prototxt: cannot read"),
    (["train", "--solver", "README.md"], "README.md:"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    result = run(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_with_the_iteration(lenet, tmp_path):
    solver = (lenet / "solver.prototxt").read_text().replace("base_lr: 0.01", "base_lr: 1e30")
    path = tmp_path / "nan_solver.prototxt"
    path.write_text(solver.replace(f"{lenet}/lenet\"", f"{tmp_path}/nan\""))
    result = run("train", "--solver", str(path))
    assert result.returncode == 1
    assert re.search(r"iteration \d+: the loss is (nan|inf)", result.stderr)


def test_device_query_describes_the_cpu():
    result = run("device-query")
    assert result.returncode == 0 and "Device: CPU" in result.stderr
