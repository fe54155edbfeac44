"""Gupta et al. (2015) on our data: LeNet trained on Fashion-MNIST in 16-bit fixed point
<16-FL, FL> for FL in {8, 10, 12, 14}, with round-to-nearest and with stochastic rounding,
against float32, all from the same initial weights with the same solver (examples/lenet's)
and the same data order.  Writes the test-accuracy curves (a PNG), the table and a JSON.
With --dynamic, in dynamic fixed point: each tensor starts at <16-FL, FL> and moves its range
by its overflow rate, so the word's precision, not its range, is what the runs compare.

    python benchmarks/fixed_point.py [--iterations 2000] [--test-interval 250] [--dynamic] \
        [--out benchmarks/results/fixed_point]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import espresso
from espresso.compress.fixed_point import FixedPoint
from espresso.data.fmnist import make_fmnist_lmdbs
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

WORD = 16


def solver_param(train_db, test_db, iterations):
    text = Path("examples/lenet/lenet_train_test.prototxt").read_text()
    text = text.replace("examples/lenet/fmnist_train_lmdb", str(train_db))
    text = text.replace("examples/lenet/fmnist_test_lmdb", str(test_db))
    p = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="inv", gamma=1e-4,
                                  power=0.75, max_iter=iterations, display=0, test_iter=[100], test_interval=iterations,
                                  snapshot_after_train=False, random_seed=1)
    p.net_param.CopyFrom(parse_text(text, caffe_pb2.NetParameter()))
    return p


def run(param, iterations, interval, fl=None, rounding=None, dynamic=False):
    """Test accuracy every `interval` iterations: [(iteration, accuracy)]."""
    solver = espresso.SGDSolver(param)
    if fl is not None:
        FixedPoint(solver.net, WORD - fl, fl, rounding, dynamic=dynamic).attach(solver)
    curve = []
    for _ in range(iterations // interval):
        try:
            solver.step(interval)
        except EspressoError as e:  # a loss gone NaN (overflowed): the run diverged
            print(f"  diverged: {e}", flush=True)
            return curve + [(solver.iter, 0.0)]
        curve.append((solver.iter, float(np.mean(solver.test(0)["accuracy"]))))
    return curve


def plot(results, path, kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, rounding in zip(axes, ("nearest", "stochastic")):
        for name, curve in results.items():
            if name == "float32" or name.endswith(rounding):
                its, acc = zip(*curve)
                ax.plot(its, acc, "k--" if name == "float32" else "-", label=name)
        ax.set(title=f"16-bit {kind}, {rounding} rounding", xlabel="iteration", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--test-interval", type=int, default=250)
    parser.add_argument("--fl", default="8,10,12,14")
    parser.add_argument("--dynamic", action="store_true", help="dynamic fixed point (each tensor its own range)")
    parser.add_argument("--out", default="benchmarks/results/fixed_point")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_db, test_db, source = make_fmnist_lmdbs(Path(tempfile.mkdtemp(prefix="fixed_point_")))
    param = solver_param(train_db, test_db, args.iterations)
    runs = [("float32", None, None)] + [(f"<{WORD - fl},{fl}> {r}", fl, r) for r in ("nearest", "stochastic")
                                        for fl in map(int, args.fl.split(","))]
    results, seconds = {}, {}
    for name, fl, rounding in runs:
        start = time.perf_counter()
        results[name] = run(param, args.iterations, args.test_interval, fl, rounding, args.dynamic)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: final accuracy {results[name][-1][1]:.4f} ({seconds[name]:.0f} s)", flush=True)
    kind, stem = ("dynamic fixed point", "fixed_point_dynamic") if args.dynamic else ("fixed point", "fixed_point")
    lines = [f"# LeNet on {source.description}, {args.iterations} iterations of batch 64, 16-bit {kind}",
             "| format | rounding | final test accuracy | best | seconds |", "|---|---|---|---|---|"]
    for name, curve in results.items():
        fmt, _, rounding = name.partition(" ")
        fmt = f"{fmt} (start)" if args.dynamic and rounding else fmt
        final = f"{curve[-1][1]:.4f}" if curve[-1][0] == args.iterations else f"diverged at {curve[-1][0]}"
        lines.append(f"| {fmt} | {rounding or '-'} | {final} | {max(a for _, a in curve):.4f} | {seconds[name]:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"source": source.description, "curves": results,
                                                 "seconds": seconds}, indent=1))
    plot(results, out / f"{stem}.png", kind)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
