"""Where a GPU iteration's time goes: every kernel of one case of gpu_vs_torch.py, per iteration.

CUPTI (through torch.profiler, which records every kernel of the process, CuPy's and those replayed
from CUDA graphs included) times N iterations of a column after its warm-up.  Printed per column:
the kernels per iteration with their mean microseconds, the GPU-busy time (sum of kernel times),
and the span (first kernel start to last kernel end, / N): span - busy is the launch gaps.
--timeline adds one iteration's kernels in start order (offset, duration, stream): what overlaps
and what waits on what.

    python benchmarks/gpu_kernels.py [--cases lenet_train_b64,lenet_infer_b1] [--columns espresso,torch_graph]
                                     [--iters 200] [--timeline] [--out FILE]
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
            stream = getattr(e, "device_resource_id", None)  # (CUPTI's stream id, where torch keeps it)
            kernels.append((e.name, e.time_range.start, e.time_range.end, stream))
    return sorted(kernels, key=lambda k: k[1])


def summary(kernels, iters):
    """Text: kernels per iteration, mean us each, busy and span per iteration."""
    if not kernels:
        return "  no kernels recorded (CUPTI unavailable?)\n"
    per = collections.defaultdict(list)
    for name, start, end, _ in kernels:
        per[name].append(end - start)
    busy = sum(end - start for _, start, end, _ in kernels) / iters
    span = (max(end for _, _, end, _ in kernels) - kernels[0][1]) / iters
    lines = [f"  {len(kernels) / iters:.1f} kernels/iter, busy {busy:.1f} us, span {span:.1f} us, "
             f"gaps {span - busy:.1f} us per iteration"]
    for name, times in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {len(times) / iters:5.1f} x {sum(times) / len(times):7.2f} us  {name[:110]}")
    return "\n".join(lines) + "\n"


def timeline(kernels, iters):
    """Text: the kernels of one iteration in the middle of the run (those starting within one mean
    period from the middle iteration's first kernel), with their start offsets and streams."""
    period = (max(end for _, _, end, _ in kernels) - kernels[0][1]) / iters
    counts = collections.Counter(name for name, *_ in kernels)
    # an iteration's first kernel: the earliest of those that run once an iteration (not a copy
    # made once before the loop); its middle occurrence starts the window
    first = next((name for name, *_ in kernels if counts[name] == iters), kernels[0][0])
    starts = [start for name, start, _, _ in kernels if name == first]
    t0 = starts[len(starts) // 2]
    lines = ["  one iteration: start us, duration us, stream, kernel"]
    for name, start, end, stream in kernels:
        if t0 <= start < t0 + period:
            lines.append(f"  {start - t0:8.2f} {end - start:7.2f}  {stream!s:>4}  {name[:90]}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="lenet_train_b64,lenet_infer_b1", help=", ".join(CASES))
    ap.add_argument("--columns", default="espresso,torch_graph", help=", ".join(COLUMNS))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--timeline", action="store_true", help="also one iteration's kernels in start order")
    ap.add_argument("--out", help="also write the text here")
    args = ap.parse_args(argv)
    env = Env("cuda")
    text = ""
    for case in args.cases.split(","):
        for column in args.columns.split(","):
            run, _ = build(env, column, case)
            kernels = profile(env, run, args.iters)
            block = f"{case} / {column}\n" + summary(kernels, args.iters)
            if args.timeline:
                block += timeline(kernels, args.iters)
            print(block, flush=True)
            text += block + "\n"
            del run
            env.free()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
