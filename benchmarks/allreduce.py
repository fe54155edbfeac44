"""What data-parallel training's gradient all-reduce costs on this machine: Group.average
(espresso/parallel.py: MPI_Allreduce in buckets, then the 1/N scale) on float32 arenas the sizes
of LeNet's, ResNet-50's and CaffeNet's gradients; median [min, max] of 10 after a warm-up, with
the bus bandwidth of a ring all-reduce (each rank moves 2 (N - 1) / N of the bytes).

    mpiexec -n 2 python benchmarks/allreduce.py [--out results.md]
"""

import argparse
import time
from pathlib import Path

import numpy as np

import espresso

SIZES = {"LeNet": 431_080, "ResNet-50": 25_557_032, "CaffeNet": 60_965_224}  # float32 parameters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    group = espresso.parallel.start()
    n = group.size
    lines = [f"# Gradient all-reduce over {n} MPI ranks (Group.average, float32)", "",
             "| gradients of | MB | ms: median [min, max] of 10 | bus bandwidth GB/s |", "|---|---|---|---|"]
    for name, count in SIZES.items():
        flat = np.ones(count, np.float32)
        group.average(flat)
        times = []
        for _ in range(10):
            group.comm.Barrier()
            start = time.perf_counter()
            group.average(flat)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        bus = 2 * (n - 1) / n * flat.nbytes / median / 1e9
        lines.append(f"| {name} | {flat.nbytes / 1e6:.1f} | {1e3 * median:.2f} [{1e3 * min(times):.2f}, "
                     f"{1e3 * max(times):.2f}] | {bus:.2f} |")
    if group.rank == 0:
        print("\n".join(lines))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
