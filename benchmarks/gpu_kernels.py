"""Where a GPU iteration's time goes: every kernel of one case of gpu_vs_torch.py, per iteration.

CUPTI (through torch.profiler, which records every kernel of the process, CuPy's and those replayed
from CUDA graphs included) times N iterations of a column after its warm-up.  Printed per column:
the kernels per iteration with their mean microseconds, the GPU-busy time (sum of kernel times),
and the span (first kernel start to last kernel end, / N): span - busy is the launch gaps.

    python benchmarks/gpu_kernels.py [--cases lenet_train_b64,lenet_infer_b1] [--columns espresso,torch_graph]
                                     [--iters 200] [--out FILE]
"""

import argparse
import collections
import sys

from gpu_vs_torch import CASES, COLUMNS, Env, build


def profile(env, run, iters):
    """[(kernel name, start us, end us)] of `iters` calls of run(1), after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    run(20)
    env.sync()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(iters)
        env.sync()
    kernels = []
    for e in prof.events():
        if e.device_type.name == "CUDA":  # kernels, memsets and copies
            kernels.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(kernels, key=lambda k: k[1])


def summary(kernels, iters):
    """Text: kernels per iteration, mean us each, busy and span per iteration."""
    if not kernels:
        return "  no kernels recorded (CUPTI unavailable?)\n"
    per = collections.defaultdict(list)
    for name, start, end in kernels:
        per[name].append(end - start)
    busy = sum(end - start for _, start, end in kernels) / iters
    span = (max(end for _, _, end in kernels) - kernels[0][1]) / iters
    lines = [f"  {len(kernels) / iters:.1f} kernels/iter, busy {busy:.1f} us, span {span:.1f} us, "
             f"gaps {span - busy:.1f} us per iteration"]
    for name, times in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {len(times) / iters:5.1f} x {sum(times) / len(times):7.2f} us  {name[:110]}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="lenet_train_b64,lenet_infer_b1", help=", ".join(CASES))
    ap.add_argument("--columns", default="espresso,torch_graph", help=", ".join(COLUMNS))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", help="also write the text here")
    args = ap.parse_args(argv)
    env = Env("cuda")
    text = ""
    for case in args.cases.split(","):
        for column in args.columns.split(","):
            run, _ = build(env, column, case)
            block = f"{case} / {column}\n" + summary(profile(env, run, args.iters), args.iters)
            print(block, flush=True)
            text += block + "\n"
            del run
            env.free()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
