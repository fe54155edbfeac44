"""Where a model of `espresso bench`'s suite spends its GPU time: the kernels of Espresso's
iteration against PyTorch's (eager), timed by CUPTI through torch.profiler (which records every
kernel of the process, CuPy's included), both in float32, in one process.

    python benchmarks/model_kernels.py [--model resnet50] [--batch 64] [--train] [--iters 5] [--top 22]
    python benchmarks/model_kernels.py --device cpu --model lenet   # a dry run: PyTorch's CPU ops only
"""

import argparse
import collections

import numpy as np


def kernels(step, sync, iters, device):
    """({kernel name: ms per iteration}, {kernel name: launches per iteration}) after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    step(2)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if device == "gpu" else ProfilerActivity.CPU]) as prof:
        step(iters)
        sync()
    ms, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name == ("CUDA" if device == "gpu" else "CPU"):
            ms[e.name[:90]] += (e.time_range.end - e.time_range.start) / iters / 1000
            count[e.name[:90]] += 1 / iters
    return ms, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train", action="store_true", help="a training step (default: a forward)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=22, help="kernels listed per framework")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    args = ap.parse_args()
    import espresso
    from espresso.bench.measure import espresso_case, torch_case

    rng = np.random.default_rng(0)
    torch_step, torch_sync, _ = torch_case(args.model, args.train, args.batch, args.device, rng, graph=False)
    if args.device == "gpu":
        espresso.set_device(0)
        espresso.set_mode_gpu()
    step, sync, _, _ = espresso_case(args.model, args.train, args.batch, rng)
    mode = "training step" if args.train else "forward"
    for name, (ms, count) in (("espresso", kernels(step, sync, args.iters, args.device)),
                              ("torch eager", kernels(torch_step, torch_sync, args.iters, args.device))):
        print(f"== {args.model} b{args.batch} {mode}, {name}: {sum(ms.values()):.2f} ms of kernels, "
              f"{sum(count.values()):.0f} kernels per iteration")
        for kernel, value in ms.most_common(args.top):
            print(f"  {value:7.3f} ms {count[kernel]:5.0f}x  {kernel}")


if __name__ == "__main__":
    main()
