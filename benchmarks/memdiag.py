"""What holds the device memory of one `gpu_vs_torch.py` case in Espresso (CUDA only).

    python benchmarks/memdiag.py CASE [--iterations 20] [--lines N]

Builds the case as gpu_vs_torch.py does, runs it, and prints one JSON line: the peak
(backend.peak_memory(), the figure gpu_vs_torch.py reports), CuPy's default pool (reserved, in
use), the graphs' pools, the workspaces (cuBLAS and cuDNN, main and side stream) and whether
Dropout's random generator was made.  With --lines, also the allocation call tree (CuPy's
LineProfileHook), frames of 1 MiB or more.
Run it twice with the same ESPRESSO_CACHE_DIR to compare a process that times its convolution
algorithms with one that takes them from the cache.
"""

import argparse
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_vs_torch  # noqa: E402


def mib(nbytes):
    return round(nbytes / 2**20, 1)


def holdings(backend):
    pool = backend.xp.get_default_memory_pool()
    side_blas = backend._side_blas
    cudnn_main, cudnn_side = backend.cudnn.workspace_sizes() if backend.cudnn else (0, 0)
    return {"peak": mib(backend.peak_memory()), "default_total": mib(pool.total_bytes()),
            "default_used": mib(pool.used_bytes()), "graph_pools": [mib(p.total_bytes()) for p in backend._graph_pools],
            "cublas_main": mib(backend.blas.workspace.nbytes),
            "cublas_side": mib(side_blas.workspace.nbytes) if side_blas else 0,
            "cudnn_main": mib(cudnn_main), "cudnn_side": mib(cudnn_side),
            "random_generator_made": backend._rng is not None}  # (its states: 12.4 MiB of an H100)


def large_sites(hook, count, floor=1 << 20):
    """The hook's call tree (each line: a frame, the bytes allocated below it), only the frames
    that allocated at least `floor` bytes, at most `count` lines."""
    text = io.StringIO()
    hook.print_report(file=text)
    kept = []
    for line in text.getvalue().splitlines():
        size = re.search(r"\(([\d.]+)([KMG]?B),", line)
        if size and float(size.group(1)) * _UNITS[size.group(2)] >= floor:
            kept.append(line)
    return (kept or text.getvalue().splitlines())[:count]  # (the raw report if its format is not known)


_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(gpu_vs_torch.CASES))
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--lines", type=int, default=0, help="also print this many lines of the allocation tree")
    args = p.parse_args()
    env = gpu_vs_torch.Env("cuda")
    from cupy.cuda import memory_hooks

    hook = memory_hooks.LineProfileHook()
    with hook:
        run, _ = gpu_vs_torch.build(env, "espresso", args.case)
        run(args.iterations)
        env.sync("espresso")
    print(json.dumps({"case": args.case, **holdings(env.backend)}))
    for line in large_sites(hook, args.lines):
        print(line)


if __name__ == "__main__":
    main()
