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
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import espresso
from espresso.compress.model_file import to_caffemodel
from espresso.compress.runtime import CompressedLayer

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
    weight_bytes = net.arena_data.nbytes + sum(layer.nbytes for layer in compressed)
    return net, held, weight_bytes


def test_images(count=1000):
    """Fashion-MNIST test images scaled as the LeNet Data layer scales them (x / 256): real
    inputs, about half of whose pixels are zero (the sparse kernels skip zero inputs)."""
    from espresso.data.fmnist import fashion_mnist_dir
    from espresso.data.idx import read_idx

    where = fashion_mnist_dir().path
    path = next(Path(where).glob("t10k-images-idx3-ubyte*"))
    return (read_idx(str(path))[:count].astype(np.float32) / 256)[:, None]


def time_forward(net, images, repeats=7):
    """Median over `repeats` of the mean batch-1 forward time over `images` (seconds); also the
    mean time per layer (forward_range(i, i), same images)."""
    data = net.blobs["data"].data
    net.forward(data=images[:1])
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            data[...] = image
            net.forward_range(0, len(net.layers) - 1)
        runs.append((time.perf_counter() - start) / len(images))
    per_layer = np.zeros(len(net.layers))
    for image in images:
        data[...] = image
        for i in range(len(net.layers)):
            t = time.perf_counter()
            net.forward_range(i, i)
            per_layer[i] += time.perf_counter() - t
    return statistics.median(runs), per_layer / len(images)


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
    (t_dense, dense_layers), (t_small, small_layers) = time_forward(dense, images), time_forward(small, images)
    compressible = [i for i, layer in enumerate(small.layers) if isinstance(layer, CompressedLayer)]
    fc_dense, fc_small = dense_layers[compressible].sum(), small_layers[compressible].sum()
    result = {"model": args.model, "dense_ms": t_dense * 1e3, "compressed_ms": t_small * 1e3,
              "speedup": t_dense / t_small, "compressed_layers_dense_ms": fc_dense * 1e3,
              "compressed_layers_ms": fc_small * 1e3, "compressed_layers_speedup": fc_dense / fc_small,
              "per_layer_ms": {name: [d * 1e3, c * 1e3] for name, d, c in
                               zip(small.layer_dict, dense_layers, small_layers)},
              "dense_weight_bytes": dense_weights,
              "compressed_weight_bytes": small_weights, "weight_memory_ratio": dense_weights / small_weights,
              "dense_held_bytes": dense_held, "compressed_held_bytes": small_held,
              "held_ratio": dense_held / small_held, "file_bytes": Path(args.model).stat().st_size,
              "numba": __import__("espresso.compress.sparse", fromlist=["numba"]).numba is not None}
    print(f"batch-1 forward: dense {t_dense * 1e3:.4f} ms, compressed {t_small * 1e3:.4f} ms "
          f"({result['speedup']:.2f}x faster); the compressed layers alone: {fc_dense * 1e3:.4f} ms vs "
          f"{fc_small * 1e3:.4f} ms ({result['compressed_layers_speedup']:.2f}x)")
    for name, (d, c) in result["per_layer_ms"].items():
        print(f"  {name:8s} dense {d:.4f} ms  compressed {c:.4f} ms")
    print(f"weight memory: dense {dense_weights} B, compressed {small_weights} B "
          f"({result['weight_memory_ratio']:.1f}x smaller); held by the net (tracemalloc): "
          f"{dense_held} B vs {small_held} B ({result['held_ratio']:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
