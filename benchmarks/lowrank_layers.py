"""Tucker-2's speed per layer on the CPU and the GPU: each convolution alone against its three
decomposed convolutions (espresso/compress/lowrank.py), forward, weights random (time does not
depend on them): LeNet's conv2 at the ranks EVBMF chose for the trained net
(benchmarks/results/lowrank/), and CaffeNet's two ungrouped 3x3 shapes (conv3 and a conv4 without
groups) at ranks given by hand, a quarter and a half of the channels.  Median [min, max] of 7
timed passes after a warm-up; on the GPU synchronized, float32 without TF32, cuDNN's timed choice.

    python benchmarks/lowrank_layers.py [--gpu] [--out results.md]
"""

import argparse
import time
from pathlib import Path

import numpy as np

import espresso
from espresso.compress.lowrank import _conv_pieces, _timing_net
from espresso.proto import caffe_pb2

# name, batch, input (C, H, W), num_output, kernel, pad, ranks (R_out, R_in) list
CASES = [("LeNet conv2", 64, (20, 12, 12), 50, 5, 0, [(8, 8)]),
         ("CaffeNet conv3", 64, (256, 13, 13), 384, 3, 1, [(96, 64), (192, 128)]),
         ("CaffeNet conv4 (ungrouped)", 64, (384, 13, 13), 384, 3, 1, [(96, 96), (192, 192)])]


def conv_layer(num_output, kernel, pad):
    lp = caffe_pb2.LayerParameter(name="conv", type="Convolution", bottom=["data"], top=["out"])
    p = lp.convolution_param
    p.num_output, p.pad[:], p.kernel_size[:] = num_output, [pad], [kernel]
    return lp


def forward_ms(net, backend, repeats=7):
    net.run_forward()
    backend.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.run_forward()
        backend.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def case_rows(name, batch, shape, outputs, kernel, pad, ranks_list, rng):
    lp = conv_layer(outputs, kernel, pad)
    weights = rng.standard_normal((outputs, shape[0], kernel, kernel)).astype(np.float32) * 0.05
    bias = rng.standard_normal(outputs).astype(np.float32)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    original = espresso.Net(_timing_net((batch, *shape), [lp]), espresso.TEST)
    original.params["conv"][0].data[...], original.params["conv"][1].data[...] = weights, bias
    original.blobs["data"].data[...] = x
    backend = original.backend
    before = forward_ms(original, backend)
    rows = []
    for ranks in ranks_list:
        pieces = _conv_pieces(lp, [weights, bias], ranks)
        net = espresso.Net(_timing_net((batch, *shape), [p for p, _ in pieces]), espresso.TEST)
        for piece, arrays in pieces:
            for blob, array in zip(net.params[piece.name], arrays):
                blob.data[...] = array
        net.blobs["data"].data[...] = x
        after = forward_ms(net, backend)
        macs = (outputs * shape[0] * kernel ** 2, shape[0] * ranks[1] + ranks[0] * ranks[1] * kernel ** 2
                + outputs * ranks[0])
        speedup = [b / a for b, a in zip(before, after)]
        rows.append(f"| {name} | {batch} | {ranks[0]}:{ranks[1]} | {macs[0] / macs[1]:.1f}x | "
                    f"{np.median(before):.3f} | {np.median(after):.3f} | {np.median(before) / np.median(after):.2f}x "
                    f"[{min(speedup):.2f}, {max(speedup):.2f}] |")
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.gpu:
        espresso.set_mode_gpu()
    device = espresso.runtime.current_backend().describe()
    lines = [f"# Tucker-2 per layer, forward: {', '.join(f'{k} {v}' for k, v in device.items())}", "",
             "| layer | batch | ranks R_out:R_in | fewer multiply-adds | ms before | ms after | speed-up "
             "[min, max] of 7 |", "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for case in CASES:
        lines += case_rows(*case, rng)
    out = Path(args.out or f"benchmarks/results/lowrank/layers_{'gpu' if args.gpu else 'cpu'}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
