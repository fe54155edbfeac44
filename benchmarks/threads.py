"""BLAS threads with and without a competing load: LeNet training steps (batch 64, Caffe's
LeNet solver) and conv2's forward alone, on the CPU backend, at 1 thread and at the default
(the physical cores this process may run on), each on a quiet machine and beside one busy
process (a Python loop spinning on a core, as another user's job on a shared machine).

Each configuration runs in a fresh process (ESPRESSO_NUM_THREADS set), the configurations
interleaved over --rounds rounds; reported: the median over rounds of each run's median
milliseconds, with the spread (min-max of the run medians).

    python benchmarks/threads.py [--steps 60] [--rounds 3] [--out benchmarks/results]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lenet_cpu import espresso_solver, load_batch

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"


def child(steps):
    """Time `steps` training steps and `steps` forwards of conv2; print their medians (ms)."""
    x, labels = load_batch(64)
    solver = espresso_solver(x, labels)
    solver.step(5)  # warm-up: first-touch allocations, Numba's compiled kernels loaded
    net = solver.net
    conv2 = net._layer_names.index("conv2")
    step, forward = [], []
    for _ in range(steps):
        start = time.perf_counter()
        solver.step(1)
        step.append(time.perf_counter() - start)
        start = time.perf_counter()
        net.forward_layers(conv2, conv2)
        forward.append(time.perf_counter() - start)
    print(json.dumps({"step_ms": 1e3 * statistics.median(step), "conv2_forward_ms": 1e3 * statistics.median(forward)}))


def run_child(threads, loaded, steps):
    env = {**os.environ, "ESPRESSO_NUM_THREADS": str(threads)}
    load = subprocess.Popen([sys.executable, "-c", BUSY]) if loaded else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if load is not None:
            load.kill()
            load.wait()
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps (and conv2 forwards) per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each configuration, interleaved")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the results go")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.steps)
    sys.path.insert(0, str(ROOT))
    from espresso.backend.cpu import physical_cores

    cores = physical_cores()
    configs = [(threads, loaded) for loaded in (False, True) for threads in sorted({1, cores})]
    runs = {config: [] for config in configs}
    for _ in range(args.rounds):
        for config in configs:
            runs[config].append(run_child(*config, args.steps))
    lines = [f"BLAS threads on {cores} physical cores (os.cpu_count() {os.cpu_count()}), LeNet batch 64, "
             f"{args.steps} steps per run, {args.rounds} runs each; median of the run medians (min-max)",
             f"{'threads':>7} {'load':>10} {'step ms':>22} {'conv2 forward ms':>24}"]
    results = []
    for (threads, loaded), values in runs.items():
        row = {"threads": threads, "busy_process": loaded}
        for key in ("step_ms", "conv2_forward_ms"):
            xs = [v[key] for v in values]
            row[key] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
        results.append(row)
        cells = [f"{row[k]['median']:8.3f} ({row[k]['min']:.3f}-{row[k]['max']:.3f})"
                 for k in ("step_ms", "conv2_forward_ms")]
        lines.append(f"{threads:>7} {'1 busy' if loaded else 'quiet':>10} {cells[0]:>22} {cells[1]:>24}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    (out / "threads.txt").write_text(text + "\n")
    (out / "threads.json").write_text(json.dumps({"cores": cores, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
