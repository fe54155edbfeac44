"""What each convolution of one `gpu_vs_torch.py` case timed in a first run (CUDA only).

    ESPRESSO_CACHE_DIR=$(mktemp -d) python benchmarks/conv_candidates.py CASE

An empty cache makes every convolution time its choices.  Prints JSON lines: per layer and
direction, cuDNN's candidates as [algorithm, workspace MiB, ms] and the one kept; per layer, the
engine kept, the convolution's shapes (image, data, weights, ...), its workspace limit and the
MiB the default pool had in use before its timing; last, the process's peak.  A candidate's
workspace on top of what was in use is what it adds to a first run's peak.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_vs_torch  # noqa: E402

from espresso.layers import vision  # noqa: E402


def mib(nbytes):
    return round(nbytes / 2**20, 1)


def record(case):
    """Wrap the layer's timing and its choice among cuDNN's candidates to print what they saw."""
    time_choices, leanest, current = vision._BaseConvolution._time_choices, vision._leanest, {}

    def timed(layer, which, directions, options, engines, args):
        in_use = mib(layer.backend.xp.get_default_memory_pool().used_bytes())
        current.update(layer=layer.lp.name, directions=iter(directions))
        time_choices(layer, which, directions, options, engines, args)
        print(json.dumps({"case": case, "layer": layer.lp.name, "engine": layer.engines[which],
                          "in_use_before_mib": in_use, "shapes": layer.plan.key,
                          "limit_mib": mib(layer.plan.workspace_limit)}, default=int))

    def kept(options, times):
        choice = leanest(options, times)
        print(json.dumps({"case": case, "layer": current["layer"], "direction": next(current["directions"]),
                          "candidates": [[algo, mib(size), round(ms, 4)] for (algo, size), ms in zip(options, times)],
                          "kept": [choice[0], mib(choice[1])]}))
        return choice

    vision._BaseConvolution._time_choices, vision._leanest = timed, kept


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(gpu_vs_torch.CASES))
    p.add_argument("--iterations", type=int, default=3)
    args = p.parse_args()
    record(args.case)
    env = gpu_vs_torch.Env("cuda")
    run, _ = gpu_vs_torch.build(env, "espresso", args.case)
    run(args.iterations)
    env.sync("espresso")
    print(json.dumps({"case": args.case, "peak_mib": mib(env.backend.peak_memory())}))


if __name__ == "__main__":
    main()
