"""The forward engines of a GPU convolution side by side: LeNet's two convolutions at batch 1, 64
and 256 (float32), each engine replayed as a CUDA graph (`backend.replay_ms`, the figure the
layer's own timing compares), in microseconds.

    python benchmarks/conv_engines.py [--batches 1,64,256] [--out FILE]

Columns: the engine the layer's timing chose (and cuDNN's algorithm), the direct kernel
(espresso/backend/cuda/direct.cu) at each number of lanes per output position and at the lanes
it picks itself (auto), cuDNN's timed algorithm (its bias added in its kernel where the algorithm
can), and im2col + GEMM where the layer keeps its columns.
"""

import argparse
import json

import numpy as np

from espresso import backend as backends
from espresso.backend.cuda import kernels
from espresso.testing import LayerRun

LENET = {"conv1": ((1, 28, 28), (20, 1, 5, 5)), "conv2": ((20, 12, 12), (50, 20, 5, 5))}


def engine_times(gpu, layer, bottom, top):
    """{engine: us} of one layer's forward."""
    def us(run):
        return round(gpu.replay_ms(run) * 1000, 2)

    times, automatic = {}, kernels._direct_lanes
    try:
        for lanes in (1, 2, 4, 8, 16, 32):
            kernels._direct_lanes = lambda positions, taps, lanes=lanes: lanes
            times[f"direct x{lanes}"] = us(lambda: layer._direct_forward(bottom, top))
    finally:
        kernels._direct_lanes = automatic
    times["direct auto"] = us(lambda: layer._direct_forward(bottom, top))
    times["cudnn"] = us(lambda: layer._cudnn_forward(bottom, top))
    if layer.core is not None:
        times["gemm"] = us(lambda: layer._gemm_forward(bottom, top))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--out", help="also write the JSON lines here")
    args = ap.parse_args()
    gpu, rng, lines = backends.get("cuda:0"), np.random.default_rng(0), []
    print(gpu.describe()["Device"])
    for batch in map(int, args.batches.split(",")):
        for name, (image, weights) in LENET.items():
            snippet = (f'type: "Convolution" convolution_param {{ num_output: {weights[0]} kernel_size: {weights[2]} '
                       'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
            run = LayerRun(snippet, [rng.standard_normal((batch, *image))], device="cuda:0", dtype=np.float32)
            run.forward()  # the layer times its engines and keeps the fastest
            line = {"layer": name, "batch": batch, "chosen": run.layer.engines[0],
                    "cudnn algorithm": int(run.layer.plan.algo["Forward"][0]),
                    "us": engine_times(gpu, run.layer, run.bottom, run.top)}
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
