"""The `espresso` command, end to end on the embedded Fashion-MNIST subset."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import espresso
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
    _caffe_tools_read(result.stderr)
    assert run("plot", str(log), "-o", str(tmp_path / "again.png")).returncode == 0

    scored = run("test", "-model", str(lenet / "net.prototxt"), "-weights", str(lenet / "lenet_iter_200.caffemodel"),
                 "-iterations", "5")
    assert scored.returncode == 0, scored.stderr
    assert float(re.search(r"\] accuracy = ([\d.]+)", scored.stderr).group(1)) > 0.7

    model = lenet / "lenet_iter_200.caffemodel"
    first, mtime = model.read_bytes(), model.stat().st_mtime_ns
    resumed = run("train", "--solver", str(lenet / "solver.prototxt"),
                  "--snapshot", str(lenet / "lenet_iter_100.solverstate"))
    assert resumed.returncode == 0, resumed.stderr
    # it went on from iteration 100: its first rate is inv's at 100, and it ran 100 iterations to 200
    rates = re.findall(r"Iteration (\d+), lr = ([\d.e-]+)", resumed.stderr)
    assert rates == [("100", f"{0.01 * (1 + 0.0001 * 100) ** -0.75:g}")]
    assert re.findall(r"Iteration (\d+), Testing", resumed.stderr) == ["100", "200"]  # none at 0
    assert read_state(lenet / "lenet_iter_200.solverstate")[0] == 200
    # written again by the resumed run, which read the batches the straight run read: the same weights
    assert model.stat().st_mtime_ns > mtime and model.read_bytes() == first


def test_time_prints_per_layer_and_totals(lenet):
    result = run("time", "--model", str(lenet / "net.prototxt"), "--iterations", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"conv1\s+forward: [\d.]+ ms", result.stderr)
    assert "Average Forward-Backward" in result.stderr


LENET_NET = "examples/lenet/lenet_train_test.prototxt"
NONSENSE = [  # (arguments, what the one line must say), for every verb
    ([], "the following arguments are required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["train", "--solver", "missing.prototxt"], "missing.prototxt: cannot read"),
    (["train", "--solver", "README.md"], "README.md:"),
    (["train", "--solver", "x", "--gpu", "abc"], "--gpu: give a GPU id (0), ids (0,1) or 'all', got 'abc'"),
    (["train", "--solver", "x", "--plot", "/missing/dir/x.png"], "/missing/dir/x.png: folder /missing/dir does not"),
    (["train", "--solver", "x", "--weights", "a", "--snapshot", "b"], "--snapshot or --weights, not both"),
    (["test", "--model", LENET_NET], "the following arguments are required: --weights"),
    (["test", "--model", "missing.prototxt", "--weights", "w"], "missing.prototxt: cannot read"),
    (["test", "--model", LENET_NET, "--weights", "w", "--iterations", "0"], "must be a positive integer, got 0"),
    (["test", "--model", LENET_NET, "--weights", "w", "--iterations", "-3"], "must be a positive integer, got -3"),
    (["test", "--model", LENET_NET, "--weights", "w", "--iterations", "x"], "invalid _positive_int value: 'x'"),
    (["test", "--model", "examples/lenet/lenet_deploy.prototxt", "--weights", LENET_NET],
     "looks like text (a prototxt?)"),
    (["time", "--model", LENET_NET, "--iterations", "0"], "must be a positive integer, got 0"),
    (["time", "--model", "missing.prototxt"], "missing.prototxt: cannot read"),
    (["plot", "missing.log"], "missing.log: cannot read"),
    (["plot", sys.executable], "not a text log (binary data)"),
    (["plot", "/dev/zero"], "/dev/zero: not a regular file"),
    (["plot", "README.md", "-o", "/missing/x.png"], "/missing/x.png: folder /missing does not exist"),
    (["prepare-fmnist", "/missing/out", "--source", "/missing/src"], "/missing/src"),
    (["convert-mnist", "missing-images", "missing-labels", "db"], "missing-images"),
    (["convert-imageset", ".", "missing-list.txt", "db"], "missing-list.txt"),
    (["compute-image-mean", "missing_lmdb"], "missing_lmdb"),
    (["compute-image-mean", "db", "/missing/mean.binaryproto"], "folder /missing does not exist"),
    (["device-query", "--gpu", "-1"], "--gpu: give a GPU id"),
    (["compress", "--model", LENET_NET, "--weights", "README.md", "--solver", "README.md", "-o", "/missing/m.espz"],
     "/missing/m.espz: folder /missing does not exist"),
    (["compress", "--model", LENET_NET, "--weights", "missing.caffemodel", "--solver",
      "examples/lenet/lenet_solver.prototxt", "-o", "m.espz"], "--weights: missing.caffemodel: no such file"),
    (["decompress", "missing.espz", "out.caffemodel"], "missing.espz: no such file"),
    (["decompress", "README.md", "/missing/out.caffemodel"], "folder /missing does not exist"),
]


@pytest.mark.parametrize("args, message", NONSENSE, ids=[" ".join(a[:3]) or "nothing" for a, _ in NONSENSE])
def test_nonsense_is_one_line_and_nonzero(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [str(tmp_path / a) if a in ("db", "m.espz", "out.caffemodel") else a for a in args]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_version_and_help_for_every_option(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"espresso {espresso.__version__}"
    parser = cli._parser()
    verbs = parser._subparsers._group_actions[0].choices
    for name, verb in verbs.items():
        for action in verb._actions:
            assert action.help, f"espresso {name}: {'/'.join(action.option_strings) or action.dest} has no help"


def _caffe_tools_read(log):
    """The log as Caffe's tools/extra read it: extract_seconds.py's prefix on every line naming an
    iteration and on '] Solving ', parse_log.sh's fields ($11 of a test output, $9 of an lr)."""
    glog_line = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
    lines = log.splitlines()
    assert all(glog_line.match(line) for line in lines if "Iteration" in line or "] Solving " in line)
    assert any("] Solving " in line for line in lines)
    tests = [line.split() for line in lines if "Test net output #0" in line]
    rates = [line.split() for line in lines if ", lr = " in line]
    assert tests and all(t[10] == t[-1] and float(t[10]) >= 0 for t in tests)  # accuracy = value
    assert rates and all(float(r[8]) > 0 for r in rates)


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


NET = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""


def _small_solver():
    from espresso.proto import caffe_pb2
    from espresso.proto.text import parse_text

    # no snapshot at the end: it would land in the working directory
    param = parse_text('base_lr: 0.01 lr_policy: "fixed" display: 10 max_iter: 100 test_iter: 1 test_interval: 50 '
                       'snapshot_after_train: false', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(parse_text(NET, caffe_pb2.NetParameter()))
    return espresso.get_solver(param)


@pytest.fixture
def logged():
    """A stream the espresso log writes into, as a terminal's stderr."""
    import io
    import logging

    stream, logger = io.StringIO(), logging.getLogger("espresso")
    handler, level = logging.StreamHandler(stream), logger.level
    logging.getLogger().addHandler(handler)
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: the logger caches its decisions)
    yield stream
    logger.setLevel(level)
    logging.getLogger().removeHandler(handler)


def test_progress_has_its_own_line_labelled_fields_and_the_last_test(logged):
    solver = _small_solver()
    progress = cli.Progress(solver, logged, live=True)
    solver.solve()
    progress.close()
    raw = logged.getvalue()
    assert set(re.findall(r"\| ETA (?:--|\w+)(.)", raw, re.S)) == {"\r", "\n"}  # a log line clears the bar first
    visible = [line.split("\r\x1b[K")[-1] for line in raw.split("\n")]  # what a terminal shows of each line
    assert sum("Iteration" in v for v in visible) >= 10  # the log lines are all there
    assert visible[-2].startswith("[" + "#" * 30 + "] 100/100 | train loss ")  # the last state stays
    assert "| test @100: loss " in visible[-2] and visible[-2].endswith("| ETA 0s") and visible[-1] == ""
    assert progress.summary().startswith("finished at iteration 100; test at iteration 100: loss = ")


def test_progress_summary_says_where_an_interrupted_run_stopped():
    solver = _small_solver()
    progress = cli.Progress(solver, live=False)
    solver.set_action_function(lambda: espresso.solver.SolverAction.STOP if solver.iter == 30 else "none")
    solver.solve()
    assert progress.summary().startswith("interrupted at iteration 30; test at iteration 0: loss = ")


def test_progress_eta_follows_the_recent_rate():
    """A first stretch that was slow (kernels compiling, a first test) no longer counts once
    the recent events show the steady rate: after 5% of the run the ETA is within 20%."""
    progress = cli.Progress(_small_solver(), live=False)
    progress.total = 10000
    progress.samples = [(0.0, 0), (20.0, 100)]  # 0.2 s per iteration at first
    for it in range(200, 600, 100):  # then 0.01 s per iteration
        progress.samples.append((progress.samples[-1][0] + 1.0, it))
    assert progress.eta() == pytest.approx(0.01 * (10000 - 500), rel=0.2)


def test_curves_have_a_title_labelled_axes_and_a_legend_off_the_lines():
    pytest.importorskip("matplotlib")
    from espresso.plot import curves_figure

    losses = [(i, 2.3 * 0.99 ** i) for i in range(0, 1000, 100)]
    tests = [(i, {"accuracy": 0.5 + i / 2500, "loss": 1.5 - i / 1000}) for i in range(0, 1000, 500)]
    fig = curves_figure(losses, tests, "LeNet: training curves")
    loss_axis, score_axis = fig.axes
    assert loss_axis.get_title() == "LeNet: training curves"
    assert (loss_axis.get_xlabel(), loss_axis.get_ylabel(), score_axis.get_ylabel()) == ("iteration", "loss",
                                                                                         "test score")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["train loss (smoothed)", "test accuracy", "test loss"]
    renderer = fig.canvas.get_renderer()
    assert not legend.get_window_extent(renderer).overlaps(loss_axis.get_window_extent(renderer))


def test_time_takes_weights_and_test_takes_a_phase(lenet, tmp_path):
    """Caffe's `time -weights` and `test -phase`."""
    net = espresso.Net(str(lenet / "net.prototxt"), espresso.TEST)
    net.save(str(tmp_path / "w.caffemodel"))
    timed = run("time", "--model", str(lenet / "net.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
                "--iterations", "1")
    assert timed.returncode == 0, timed.stderr
    scored = run("test", "-model", str(lenet / "net.prototxt"), "-weights", str(tmp_path / "w.caffemodel"),
                 "-iterations", "1", "-phase", "TRAIN")
    assert scored.returncode == 0, scored.stderr
    assert "accuracy" not in scored.stderr and "loss = " in scored.stderr  # TRAIN: no Accuracy layer
