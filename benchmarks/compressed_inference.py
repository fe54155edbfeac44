"""Batch-1 CPU inference of a compressed model against the dense one, and the memory each
holds for its weights.  Both nets are built from the same deploy prototxt in one process;
the dense one loads the decompressed .caffemodel (the very same weight values).

    python benchmarks/compressed_inference.py benchmarks/results/compress/lenet_300_100.espz [--lenet]

Memory: "weight bytes" are the arrays a net keeps for its parameters (the dense arena, plus
the CSR/code arrays of the compressed layers); "held by the net" is what tracemalloc sees
still allocated after building and loading the net (blobs, workspaces and all).
"""

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import espresso
from espresso.compress.model_file import to_caffemodel
from espresso.compress.runtime import CompressedBlob, CompressedLayer

MLP = """name: "LeNet-300-100"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 28 dim: 28 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 300 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 100 } }
layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip3" top: "prob" }
"""
LENET = Path(__file__).resolve().parents[1] / "examples" / "lenet" / "lenet_deploy.prototxt"


def build(proto, weights):
    gc.collect()
    tracemalloc.start()
    net = espresso.Net(proto, weights, espresso.TEST)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    compressed = [layer for layer in net.layers if isinstance(layer, CompressedLayer)]
    blobs = [blob for layer in net.layers for blob in layer.blobs if not isinstance(blob, CompressedBlob)]
    dense = sum(blob.data.nbytes for blob in blobs)  # the params left dense (biases)
    weight_bytes = dense + sum(layer.nbytes for layer in compressed)
    return net, held, weight_bytes


def test_images(count=1000):
    """Fashion-MNIST test images scaled as the LeNet Data layer scales them (x / 256): real
    inputs, about half of whose pixels are zero (the sparse kernels skip zero inputs)."""
    from espresso.data.fmnist import fashion_mnist_dir
    from espresso.data.idx import read_idx

    where = fashion_mnist_dir().path
    path = next(Path(where).glob("t10k-images-idx3-ubyte*"))
    return (read_idx(str(path))[:count].astype(np.float32) / 256)[:, None]


def units(net):
    """(label, first, last) per timed unit: each layer alone, and a fused run of the compressed
    runtime as one (a layer of a run timed alone would compute the rest of its run)."""
    names, out, i = list(net.layer_dict), [], 0
    while i < len(net.layers):
        run = getattr(net.layers[i], "run", None)
        j = i if run is None else i + len(run.layers) - 1
        out.append((names[i] if i == j else f"{names[i]}..{names[j]}", i, j))
        i = j + 1
    return out


def time_pass(net, images, spans):
    """Mean batch-1 time over `images` (seconds) of each (first, last) span of layers, each
    span run by run_forward as the net runs it; spans [(0, last)] time whole passes."""
    data, times = net.blobs["data"].data, np.zeros(len(spans))
    clock = time.perf_counter
    for image in images:
        data[...] = image
        for k, (first, last) in enumerate(spans):
            t = clock()
            net.run_forward(first, last)
            times[k] += clock() - t
    return times / len(images)


def time_forward(dense, small, images, repeats=15):
    """Interleaved (dense, compressed, then the other way round): per repeat each net's mean
    batch-1 forward time, then per unit of the compressed net (same spans on the dense one)."""
    last = len(small.layers) - 1
    spans = [(first, end) for _, first, end in units(small)]
    whole, parts = [[], []], [[], []]
    for r in range(repeats):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            net = (dense, small)[k]
            whole[k].append(time_pass(net, images, [(0, last)])[0])
            parts[k].append(time_pass(net, images, spans))
    return np.array(whole), np.median(parts, axis=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a compressed model file (.espz)")
    parser.add_argument("--lenet", action="store_true", help="the model is Caffe's LeNet (else LeNet-300-100)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    espresso.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        proto = str(LENET) if args.lenet else str(Path(tmp) / "deploy.prototxt")
        if not args.lenet:
            Path(proto).write_text(MLP)
        dense_file = str(Path(tmp) / "dense.caffemodel")
        to_caffemodel(args.model, dense_file)
        dense, dense_held, dense_weights = build(proto, dense_file)
        small, small_held, small_weights = build(proto, args.model)
    images = test_images()
    for image in images[:20]:
        assert np.allclose(dense.forward(data=image[None])["prob"], small.forward(data=image[None])["prob"], atol=1e-5)
    whole, (dense_units, small_units) = time_forward(dense, small, images)
    t_dense, t_small = np.median(whole, axis=1)
    ratios = whole[0] / whole[1]  # per repeat, dense and compressed timed back to back
    labels = [label for label, _, _ in units(small)]
    compressed = [k for k, (_, first, end) in enumerate(units(small))
                  if any(isinstance(layer, CompressedLayer) for layer in small.layers[first:end + 1])]
    fc_dense, fc_small = dense_units[compressed].sum(), small_units[compressed].sum()
    result = {"model": args.model, "dense_ms": t_dense * 1e3, "compressed_ms": t_small * 1e3,
              "speedup": t_dense / t_small, "speedup_min": ratios.min(), "speedup_median": np.median(ratios),
              "speedup_max": ratios.max(), "dense_min_ms": whole[0].min() * 1e3,
              "compressed_min_ms": whole[1].min() * 1e3, "repeats": len(ratios),
              "compressed_layers_dense_ms": fc_dense * 1e3,
              "compressed_layers_ms": fc_small * 1e3, "compressed_layers_speedup": fc_dense / fc_small,
              "per_layer_ms": {label: [d * 1e3, c * 1e3] for label, d, c in zip(labels, dense_units, small_units)},
              "dense_weight_bytes": dense_weights,
              "compressed_weight_bytes": small_weights, "weight_memory_ratio": dense_weights / small_weights,
              "dense_held_bytes": dense_held, "compressed_held_bytes": small_held,
              "held_ratio": dense_held / small_held, "file_bytes": Path(args.model).stat().st_size,
              "numba": __import__("espresso.compress.sparse", fromlist=["numba"]).numba is not None}
    result = {k: float(v) if isinstance(v, np.floating) else v for k, v in result.items()}
    print(f"batch-1 forward, median of {len(ratios)} interleaved repeats: dense {t_dense * 1e3:.4f} ms, "
          f"compressed {t_small * 1e3:.4f} ms ({result['speedup']:.2f}x faster; per repeat "
          f"{ratios.min():.2f}x min, {np.median(ratios):.2f}x median, {ratios.max():.2f}x max; fastest repeats "
          f"{result['dense_min_ms']:.4f} vs {result['compressed_min_ms']:.4f} ms)")
    print(f"the units holding compressed layers alone: {fc_dense * 1e3:.4f} ms vs {fc_small * 1e3:.4f} ms "
          f"({result['compressed_layers_speedup']:.2f}x); per unit (a fused run is one):")
    for name, (d, c) in result["per_layer_ms"].items():
        print(f"  {name:10s} dense {d:.4f} ms  compressed {c:.4f} ms")
    print(f"weight memory: dense {dense_weights} B, compressed {small_weights} B "
          f"({result['weight_memory_ratio']:.1f}x smaller); held by the net (tracemalloc): "
          f"{dense_held} B vs {small_held} B ({result['held_ratio']:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
