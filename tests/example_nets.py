"""The example nets (examples/FOLDER/NAME_*.prototxt) over LMDBs of the embedded Fashion-MNIST
subset in a test's folder: what the compression and training tests run end to end."""

import re
from pathlib import Path

from espresso import cli

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "espresso" / "datasets" / "fmnist_subset"


def example_files(tmp_path, folder, name, test_iter=2, max_iter=None):
    """Write tmp_path/net.prototxt and solver.prototxt (test_iter batches a test; snapshots into
    tmp_path; max_iter when given) over the subset's LMDBs; returns their paths as strings."""
    assert cli.main(["prepare-fmnist", str(tmp_path), "--source", str(SUBSET)]) == 0
    net = (ROOT / "examples" / folder / f"{name}_train_test.prototxt").read_text()
    (tmp_path / "net.prototxt").write_text(net.replace("examples/lenet/", f"{tmp_path}/"))
    solver = (ROOT / "examples" / folder / f"{name}_solver.prototxt").read_text()
    solver = re.sub(r"net: .*", f'net: "{tmp_path}/net.prototxt"', solver)
    solver = re.sub(r"test_iter: \d+", f"test_iter: {test_iter}", solver)
    if max_iter is not None:
        solver = re.sub(r"max_iter: \d+", f"max_iter: {max_iter}", solver)
    solver = re.sub(r'snapshot_prefix: "[^"]*/', f'snapshot_prefix: "{tmp_path}/', solver)
    (tmp_path / "solver.prototxt").write_text(solver)
    return str(tmp_path / "net.prototxt"), str(tmp_path / "solver.prototxt")
