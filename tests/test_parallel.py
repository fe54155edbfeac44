"""Data-parallel training over MPI ranks (espresso/parallel.py), each run a real `mpiexec -n 2
espresso train`: two ranks of batch 16 give the weights of one process of batch 32, a snapshot of
one process resumes on two ranks, a killed rank ends the job and leaves the last snapshot
loadable, ranks given different solvers stop at start-up, iter_size works on top; and the data
layers' shards."""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from devices import gpu_test
from example_nets import example_files

import espresso
import espresso.layers.data as data_layers
from espresso.data.db import LMDBWriter, make_datum
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
ESPRESSO = [sys.executable, "-c", "import sys; from espresso.cli import main; sys.exit(main())"]
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install 'espresso-nn[mpi]' (MPICH's)")


def _solver(tmp_path, name, batch, max_iter, snapshot):
    """A LeNet solver over the subset (seeded, testing at 0 only) at train batch `batch`."""
    folder = tmp_path / name
    folder.mkdir()
    net, solver = example_files(folder, "lenet", "lenet", max_iter=max_iter)
    Path(net).write_text(Path(net).read_text().replace("batch_size: 64", f"batch_size: {batch}"))
    text = Path(solver).read_text()
    text = re.sub(r"snapshot: \d+", f"snapshot: {snapshot}", text)
    text = re.sub(r"test_interval: \d+", "test_interval: 1000", re.sub(r"display: \d+", "display: 1", text))
    Path(solver).write_text(text + "random_seed: 7\n")
    return solver, folder


def _train(solver, ranks=1, *more, timeout=300):
    command = ([MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + ESPRESSO + ["train", "--solver", solver, *more]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": f"{BIN}:{os.environ['PATH']}"}


def _weights(folder, iteration):
    param = caffe_pb2.NetParameter()
    param.ParseFromString((folder / f"lenet_iter_{iteration}.caffemodel").read_bytes())
    return {layer.name: [np.array(b.data) for b in layer.blobs] for layer in param.layer if layer.blobs}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            # one iteration apart by an ulp; later on, max pooling's choices amplify such differences
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


@needs_mpi
def test_two_ranks_train_as_one_process_with_the_combined_batch_and_resume_on_any_count(tmp_path):
    one, one_dir = _solver(tmp_path, "one", 32, 6, 3)
    log = _train(one)
    two, two_dir = _solver(tmp_path, "two", 16, 6, 3)
    log2 = _train(two, 2)
    assert "rank 0 of 2" in log2 and "rank 1 of 2" not in log2  # rank 1 logs warnings only
    assert len(re.findall(r"Testing net", log2)) == len(re.findall(r"Testing net", log)) > 0  # rank 0 alone tests
    straight = _weights(one_dir, 6)
    assert np.abs(straight["conv1"][0] - _weights(one_dir, 3)["conv1"][0]).max() > 1e-4  # it trained
    _assert_same(_weights(two_dir, 6), straight)
    # one process's snapshot at 3 resumes on two ranks: the data goes on where the combined batch was
    resumed, resumed_dir = _solver(tmp_path, "resumed", 16, 6, 3)
    _train(resumed, 2, "--snapshot", str(one_dir / "lenet_iter_3.solverstate"))
    _assert_same(_weights(resumed_dir, 6), straight)


@needs_mpi
def test_iter_size_works_on_top_of_the_ranks(tmp_path):
    """Two ranks of batch 8 accumulating 2 passes (iter_size 2) train as one process of batch 32:
    each pass reads its rank's shard of the next 16 records (the whole-arena average, no buckets)."""
    one, one_dir = _solver(tmp_path, "one", 32, 4, 4)
    _train(one)
    two, two_dir = _solver(tmp_path, "two", 8, 4, 4)
    Path(two).write_text(Path(two).read_text() + "iter_size: 2\n")
    _train(two, 2)
    _assert_same(_weights(two_dir, 4), _weights(one_dir, 4))


def _rank_pid(solver, rank):
    """The pid of rank `rank` of the job training `solver` (its environment names its rank)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and solver in (entry / "cmdline").read_text() and \
                    f"PMI_RANK={rank}\0" in (entry / "environ").read_text():
                return int(entry.name)
        except OSError:
            continue
    return None


@needs_mpi
def test_a_killed_rank_ends_the_job_and_the_last_snapshot_loads(tmp_path):
    solver, folder = _solver(tmp_path, "killed", 16, 100000, 5)
    job = subprocess.Popen([MPIEXEC, "-n", "2"] + ESPRESSO + ["train", "--solver", solver], env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "lenet_iter_10.solverstate").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = _rank_pid(solver, 1)
        assert pid is not None and job.poll() is None
        os.kill(pid, signal.SIGKILL)
        out, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0 and f"PID {pid} RUNNING AT" in out and "EXIT CODE: 9" in out, out  # mpiexec's
    assert f"1 = pid {pid} on " in out  # rank 0's start-up line: that pid is rank 1
    last = max(int(p.stem.split("_")[-1]) for p in folder.glob("lenet_iter_*.solverstate"))
    net = espresso.Net(str(folder / "net.prototxt"), espresso.TEST,
                       weights=str(folder / f"lenet_iter_{last}.caffemodel"))
    assert np.isfinite(net.forward()["loss"])


@needs_mpi
def test_ranks_given_different_solvers_stop_at_start_up(tmp_path):
    first, _ = _solver(tmp_path, "first", 16, 10, 0)
    second, _ = _solver(tmp_path, "second", 8, 10, 0)
    command = [MPIEXEC, "-n", "1"] + ESPRESSO + ["train", "--solver", first] + [":", "-n", "1"] + ESPRESSO + \
              ["train", "--solver", second]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode != 0
    assert "data-parallel ranks disagree: the train net of rank(s) 1 differs from rank 0's" in run.stderr


HDF5_NET = """
layer { name: "d" type: "HDF5Data" top: "x" include { phase: TRAIN } hdf5_data_param { source: "LIST" batch_size: 3 } }
"""
DATA_NET = """
layer { name: "d" type: "Data" top: "data" top: "x" include { phase: TRAIN } transform_param { TRANSFORM }
        data_param { source: "SOURCE" backend: LMDB batch_size: 3 } }
"""


def _hdf5_net(tmp_path):
    """HDF5Data over two files, rows 0..4 and 5..11 (x = the row's index)."""
    h5py = pytest.importorskip("h5py")
    for k, rows in enumerate((np.arange(5.0), np.arange(5.0, 12.0))):
        with h5py.File(tmp_path / f"{k}.h5", "w") as f:
            f["x"] = rows[:, None]
    (tmp_path / "list.txt").write_text(f"{tmp_path}/0.h5\n{tmp_path}/1.h5\n")
    return HDF5_NET.replace("LIST", str(tmp_path / "list.txt"))


def _data_net(tmp_path, transform=""):
    """Data over an LMDB of 12 records (label = the record's index)."""
    with LMDBWriter(str(tmp_path / "db")) as db:
        for i in range(12):
            db.put(f"{i:08d}", make_datum(np.full((1, 2, 2), i, np.uint8), i))
    return DATA_NET.replace("SOURCE", str(tmp_path / "db")).replace("TRANSFORM", transform)


def _combined_batches(text, ranks, batches=5):
    """What ranks 0..ranks-1 read in `batches` forwards, interleaved into the combined batches;
    each rank's net built from the same seed, as parallel.start() makes them."""
    seen = []
    try:
        for rank in range(ranks):
            espresso.set_solver_count(ranks)
            espresso.set_solver_rank(rank)
            espresso.set_random_seed(5)
            net = espresso.Net(parse_text(text, caffe_pb2.NetParameter()), espresso.TRAIN)
            seen.append([np.array(net.forward()["x"]).ravel() for _ in range(batches)])
    finally:
        espresso.set_solver_rank(0)
        espresso.set_solver_count(1)
    return np.concatenate([np.stack([seen[r][b] for r in range(ranks)], 1).ravel() for b in range(batches)])


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("source", ["Data", "Data streamed", "HDF5Data", "HDF5Data shuffled", "Data rand_skip"])
def test_a_train_data_layer_of_rank_r_reads_record_r_of_every_n(tmp_path, monkeypatch, ranks, source):
    """The ranks' batches, interleaved, are one process's combined batches (Data from the cache
    and streamed by its thread, HDF5Data over two files, shuffled, a random skip), across the
    end of the data."""
    if source == "Data streamed":
        monkeypatch.setattr(data_layers, "CACHE_LIMIT_BYTES", 0)
    text = _hdf5_net(tmp_path) if source.startswith("HDF5Data") else _data_net(tmp_path)
    if source == "HDF5Data shuffled":
        text = text.replace("batch_size: 3", "batch_size: 3 shuffle: true")
    if source == "Data rand_skip":
        text = text.replace("batch_size: 3", "batch_size: 3 rand_skip: 7")
    combined = _combined_batches(text, ranks)
    if source in ("HDF5Data shuffled", "Data rand_skip"):  # the one process's order, whatever the draws
        np.testing.assert_array_equal(combined, _combined_batches(text, 1, 5 * ranks))
        assert not np.array_equal(combined, np.arange(15 * ranks) % 12)
    else:
        np.testing.assert_array_equal(combined, np.arange(15 * ranks) % 12)


@gpu_test
@pytest.mark.parametrize("transform", ["", "mirror: true"])  # the gather kernel, the rows on the device
def test_a_train_data_layer_on_the_gpu_reads_its_shard(tmp_path, transform):
    espresso.set_mode_gpu()
    try:
        combined = _combined_batches(_data_net(tmp_path, transform), 2)
    finally:
        espresso.set_mode_cpu()
    np.testing.assert_array_equal(combined, np.arange(30) % 12)


@gpu_test
def test_a_gpu_rank_all_reduces_over_nccl_inside_the_graph_and_trains_as_one_gpu(tmp_path, monkeypatch):
    """One rank per GPU present (here the group is this process alone): NCCL's all-reduce runs
    in buckets started during the backward pass, on a stream of its own, captured in the
    iteration's graph, and the weights are the single-GPU run's."""
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(espresso.parallel, "BUCKET_BYTES", 40000)  # LeNet's arena in three runs
    solver_path, _ = _solver(tmp_path, "nccl", 32, 6, 0)
    espresso.set_mode_gpu()
    try:
        plain = espresso.get_solver(solver_path)
        plain.solve()
        group = espresso.parallel.start()
        try:
            ranked = group.attach(espresso.get_solver(solver_path))
            started = []  # the buckets started after each layer's backward, in the first (eager) pass
            ranked.net.gradients_final.append(lambda i: started.append(len(group.buckets.pending)))
            ranked.solve()
        finally:
            espresso.set_solver_rank(0)
            espresso.set_solver_count(1)
        assert group.nccl is not None and ranked._loop is not None  # NCCL, in the graphed loop
        runs, layers = len(group.buckets.runs), len(ranked.net.engine_layers)
        assert runs == 3 and 0 < started[layers // 2] < runs == started[layers - 1]
        got, want = (s.net.backend.to_host(s.net.arena_data) for s in (ranked, plain))
    finally:
        espresso.set_mode_cpu()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_cpu_buckets_cover_the_arena_and_start_while_backward_goes_on(tmp_path, monkeypatch):
    """The gradient arena in contiguous runs, each all-reduced as soon as the backward pass has
    gone below every layer using it (here over MPI's COMM_SELF: a sum over one rank)."""
    MPI = pytest.importorskip("mpi4py.MPI")
    monkeypatch.setattr(espresso.parallel, "BUCKET_BYTES", 40000)
    solver_path, _ = _solver(tmp_path, "buckets", 16, 1, 0)
    solver = espresso.get_solver(solver_path)
    net = solver.net
    buckets = espresso.parallel._MpiBuckets(espresso.parallel.Group(MPI.COMM_SELF), solver)
    names = list(net.layer_dict)
    # from the end: ip2 (20 kB) joins ip1 (1.6 MB); conv2 (100 kB); conv1; each ready below its lowest layer
    assert sorted(buckets.runs) == [[0, 520, names.index("conv1")], [520, 25570, names.index("conv2")],
                                    [25570, net.arena_diff.size, names.index("ip1")]]
    runs = buckets.runs
    started = []
    net.gradients_final.append(lambda i: started.append(len(buckets.pending)))  # after the buckets' own
    net.forward_backward()
    assert started == sorted(started) and 0 < started[len(started) // 2] < len(runs) == started[-1]
    gradients = net.arena_diff.copy()
    buckets.finish()
    np.testing.assert_array_equal(net.arena_diff, gradients)
    net.forward_backward()  # a pass never summed (a pycaffe loop's backward), then one that is:
    started.clear()
    net.forward_backward()  # it starts every bucket again, rather than skip the stale ones
    assert started[0] == 0 and started[-1] == len(runs)
    buckets.finish()
    solver.add_callback(lambda: None, lambda: None)  # (fixed point rounds the gradients in one)
    started.clear()
    net.forward_backward()
    assert set(started) == {0}  # nothing summed before the callbacks have run
    buckets.finish()
    assert not buckets.pending
