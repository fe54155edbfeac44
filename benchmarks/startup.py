"""Start-up of a whole `espresso train` process, cold and warm (issue 20's start-up targets).

    python benchmarks/startup.py [--gpu 0] [--repeats 3] [--profile FILE] [--out FILE]

Each run is a fresh process, `python -m espresso.cli train --solver examples/lenet/lenet_solver.prototxt`,
in a scratch directory holding LeNet's prototxt files and the LMDBs `espresso prepare-fmnist` makes
there first (the full Fashion-MNIST where installed, else the embedded subset).  It is timed from
before it is spawned to its exit, and the solver's own "Training took X s" read from its log.

A cold run is a machine that has never run Espresso: the caches a run fills (CuPy's kernel binaries,
Espresso's timed algorithm choices) point at a new, empty directory.  Python's bytecode is as after
installation (pip compiles it): an untimed first run writes it into a directory of its own
(PYTHONPYCACHEPREFIX, with PYTHONDONTWRITEBYTECODE unset, since a device image may set it and
then every run compiles every module it imports again, 1.1 s on the H100 machine).  A warm run
reuses the caches of the cold run before it.  Runs alternate cold, warm.

--profile FILE also profiles one cold and one warm run (cProfile) and writes, into that one text
file, the largest cumulative and own times of each and the kernels the cold run compiled (CuPy
keeps their sources with CUPY_CACHE_SAVE_CUDA_SOURCE=1).

Prints the medians, the spread and the two ratios the issue sets (cold / warm <= 2; warm whole /
warm training <= 1.5).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLVER = "examples/lenet/lenet_solver.prototxt"
_TOOK = re.compile(r"Training took ([\d.]+) s")


def scratch_copy(template, caches):
    """A new working directory `caches` holding LeNet's files and LMDBs (copied from `template`)."""
    shutil.copytree(template, caches)
    return caches


def make_template(template):
    """`template`/examples/lenet: the solver, the net and the LMDBs."""
    lenet = template / "examples" / "lenet"
    lenet.mkdir(parents=True)
    for name in ("lenet_solver.prototxt", "lenet_train_test.prototxt"):
        shutil.copy(ROOT / "examples" / "lenet" / name, lenet)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, "-m", "espresso.cli", "prepare-fmnist", "examples/lenet"], cwd=template,
                   env=env, check=True, capture_output=True)
    return template


def run(caches, gpu, bytecode, profile=None):
    """(whole seconds, training seconds) of one `espresso train` process using `caches` and the
    Python bytecode in `bytecode`."""
    env = dict(os.environ, CUPY_CACHE_DIR=str(caches / "cupy"), ESPRESSO_CACHE_DIR=str(caches / "espresso"),
               PYTHONPYCACHEPREFIX=str(bytecode), PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if profile:
        env["CUPY_CACHE_SAVE_CUDA_SOURCE"] = "1"  # for compiled_kernels
    command = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + [
        "-m", "espresso.cli", "train", "--solver", SOLVER] + (["--gpu", gpu] if gpu is not None else [])
    start = time.perf_counter()
    done = subprocess.run(command, cwd=caches, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    took = _TOOK.search(done.stderr + done.stdout)
    if took is None:
        sys.exit(f"{' '.join(command)} logged no 'Training took':\n{done.stderr[-3000:]}")
    return whole, float(took.group(1))


def profile_text(path):
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(30)
    return text.getvalue()


def compiled_kernels(cupy_cache):
    """The kernel names in the CUDA sources CuPy's cache kept, one line per source file."""
    sources = sorted(cupy_cache.rglob("*.cu"))
    names = [", ".join(re.findall(r"__global__\s+void\s+(\w+)", f.read_text(errors="replace"))) for f in sources]
    return f"{len(sources)} kernel sources compiled:\n" + "\n".join(f"  {n}" for n in names) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", default=None, help="the GPU to train on (default: the CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", type=Path, default=None, help="one text file: profiles and compiled kernels")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args()
    runs = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as scratch:
        template, bytecode = make_template(Path(scratch) / "template"), Path(scratch) / "pyc"
        run(scratch_copy(template, Path(scratch) / "install"), args.gpu, bytecode)  # writes the bytecode only
        for i in range(args.repeats):
            caches = scratch_copy(template, Path(scratch) / f"run{i}")
            for kind in ("cold", "warm"):
                runs[kind].append(run(caches, args.gpu, bytecode))
                print(f"{kind}: whole {runs[kind][-1][0]:.2f} s, training {runs[kind][-1][1]:.2f} s", flush=True)
        if args.profile:
            caches, text = scratch_copy(template, Path(scratch) / "profiled"), ""
            for kind in ("cold", "warm"):
                whole, training = run(caches, args.gpu, bytecode, caches / f"{kind}.prof")
                text += f"### {kind}: whole {whole:.2f} s, training {training:.2f} s (profiled)\n"
                text += profile_text(caches / f"{kind}.prof")
                if kind == "cold":
                    text += compiled_kernels(caches / "cupy")
            args.profile.write_text(text)
    median = {kind: [statistics.median(r[j] for r in rs) for j in (0, 1)] for kind, rs in runs.items()}
    spread = {kind: [(min(r[j] for r in rs), max(r[j] for r in rs)) for j in (0, 1)] for kind, rs in runs.items()}
    for kind in runs:
        (w0, w1), (t0, t1) = spread[kind]
        print(f"{kind}: whole {median[kind][0]:.2f} s ({w0:.2f}-{w1:.2f}), "
              f"training {median[kind][1]:.2f} s ({t0:.2f}-{t1:.2f})")
    cold_over_warm = median["cold"][0] / median["warm"][0]
    warm_over_training = median["warm"][0] / median["warm"][1]
    print(f"cold / warm whole {cold_over_warm:.2f} (target <= 2); "
          f"warm whole / training {warm_over_training:.2f} (target <= 1.5)")
    if args.out:
        args.out.write_text(json.dumps({"device": f"gpu {args.gpu}" if args.gpu is not None else "cpu",
                                        "runs": runs, "cold_over_warm": cold_over_warm,
                                        "warm_over_training": warm_over_training}, indent=1))


if __name__ == "__main__":
    main()
