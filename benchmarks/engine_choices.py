"""Does a convolution's backward engine, chosen by timing the layer alone, hold in the whole graphed
training step (where parameter gradients run on a second stream beside the rest)?  LeNet training
steps on the GPU with some convolutions' backward engines forced, the others timed as usual, each
variant from an empty choice cache; the median of 5 blocks of 2000 steps.

    python benchmarks/engine_choices.py [--batches 64,256]

Needs a GPU.  The question it answers: LeNet b64 training runs conv2's backward through cuDNN's
FFT (about 74 us of kernels) where im2col + GEMM would take some 20 us of GEMMs alone.  On an
H100 the timed choice holds (results/perf7_h100/engine_choices_908dbb6.txt): 0.169 ms a step,
against 0.234 with conv2's backward through GEMM and 0.176-0.202 with conv1's forced.
"""

import argparse
import time

import numpy as np

import espresso
from espresso import backend as backends
from espresso.backend.cuda.choices import Choices
from espresso.bench.measure import espresso_case
from espresso.layers.vision import ConvolutionLayer

VARIANTS = [{}, {"conv2": "gemm"}, {"conv1": "gemm"}, {"conv1": "direct"}, {"conv1": "gemm", "conv2": "gemm"}, {}]


def forcing(forced):
    """ConvolutionLayer._time_choices that times as usual, then takes the forced backward engine."""
    original = ConvolutionLayer._time_choices

    def choose(layer, which, directions, options, engines, args):
        original(layer, which, directions, options, engines, args)
        want = forced.get(layer.name) if which == 1 else None
        if want in engines:
            layer.engines[1] = want

    return choose


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,256")
    args = ap.parse_args()
    gpu = backends.get("cuda:0")
    espresso.set_device(0)
    espresso.set_mode_gpu()
    forced = {}
    ConvolutionLayer._time_choices = forcing(forced)
    for batch in map(int, args.batches.split(",")):
        for variant in VARIANTS:
            forced.clear()
            forced.update(variant)
            gpu.choices = Choices(None, gpu._setup())  # nothing remembered: every layer times again
            step, sync, net, _ = espresso_case("lenet", True, batch, np.random.default_rng(0))
            step(300)
            sync()
            blocks = []
            for _ in range(5):
                start = time.perf_counter()
                step(2000)
                sync()
                blocks.append((time.perf_counter() - start) / 2000 * 1e3)
            chosen = {layer.name: layer.engines for layer in net.engine_layers if isinstance(layer, ConvolutionLayer)}
            print(f"b{batch} forced {variant}: {np.median(blocks):.4f} ms/step [{min(blocks):.4f}-{max(blocks):.4f}], "
                  f"engines {chosen}", flush=True)


if __name__ == "__main__":
    main()
