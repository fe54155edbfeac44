"""Low-precision inference on the GPU against float32: float16 and bfloat16 weights and operands
(espresso/compress/half.py) and post-training int8 (espresso/compress/int8.py, Int8GpuLayer).
LeNet's test accuracy in each (a trained .caffemodel and the Fashion-MNIST test LMDB given; int8
calibrated on 20 test batches, as benchmarks/int8.py does on the CPU), and CaffeNet's batch-256
inference time (random weights; int8 calibrated on the timed batch), each net a CUDA graph
replayed, 5 repeats of 20 passes alternating; float32 without and with TF32.

    python benchmarks/precision_gpu.py --lenet-weights W.caffemodel --test-lmdb DIR [--out results.md]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import espresso
from espresso.bench.models import net_param
from espresso.compress.half import to_bits
from espresso.compress.int8 import calibrate, int8_layers, int8_records
from espresso.compress.model_file import HalfFloats, write_model
from espresso.proto import caffe_pb2
from espresso.proto.text import read_text

HALF = ("float16", "bfloat16")
STAND_INS = {"float16": "HalfLayer", "bfloat16": "HalfLayer", "int8": "Int8GpuLayer"}


def precision_file(net, kind, path, calibration):
    """`net`'s weights as a model file of `kind` weights: 16-bit floats (biases float32) or int8
    calibrated by calibrate(net, ..., **calibration)."""
    if kind == "int8":
        records = int8_records(net, calibrate(net, int8_layers(net), **calibration))
    else:
        records = [(name, layer.type, [HalfFloats(to_bits(layer.blobs[0].host_data(), kind), kind)]
                    + [np.array(b.host_data(), np.float32) for b in layer.blobs[1:]])
                   for name, layer in net.layer_dict.items() if layer.blobs]
    write_model(path, records)
    return str(path)


def low_precision_nets(param, dense, work, calibration):
    nets = {"float32": dense}
    for kind in (*HALF, "int8"):
        nets[kind] = espresso.Net(param, espresso.TEST, weights=precision_file(dense, kind, work / kind, calibration))
        assert type(nets[kind].layer_dict["conv1"]).__name__ == STAND_INS[kind]
    return nets


def lenet_accuracy(weights, lmdb, work):
    param = read_text("examples/lenet/lenet_train_test.prototxt", caffe_pb2.NetParameter())
    for layer in param.layer:
        if layer.type == "Data":
            layer.data_param.source = str(lmdb)
    dense = espresso.Net(param, espresso.TEST, weights=weights)
    nets = low_precision_nets(param, dense, work, dict(iterations=20))
    return {label: float(np.mean([float(net.forward()["accuracy"]) for _ in range(100)]))
            for label, net in nets.items()}


def caffenet_times(work, repeats=5, passes=20):
    param = net_param("caffenet", 256, train=False)
    dense = espresso.Net(param, espresso.TEST)
    x = np.random.default_rng(0).random((256, 3, 227, 227), dtype=np.float32)
    nets = low_precision_nets(param, dense, work, dict(inputs=x))
    backend = dense.backend
    times = {label: [] for label in ["float32", "float32 TF32", *HALF, "int8"]}
    for net in nets.values():
        net.blobs["data"].data[...] = x
        net.run_forward()
    for _ in range(repeats):
        for label in times:
            net = nets[label.split()[0]]
            backend.set_tf32(label.endswith("TF32"))
            net.run_forward()
            backend.synchronize()
            start = time.perf_counter()
            for _ in range(passes):
                net.run_forward()
            backend.synchronize()
            times[label].append(1e3 * (time.perf_counter() - start) / passes)
    backend.set_tf32(False)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lenet-weights", required=True)
    parser.add_argument("--test-lmdb", required=True)
    parser.add_argument("--out", default="benchmarks/results/precision_gpu.md")
    args = parser.parse_args()
    espresso.set_mode_gpu()
    work = Path(tempfile.mkdtemp(prefix="precision_"))
    accuracy = lenet_accuracy(args.lenet_weights, args.test_lmdb, work)
    times = caffenet_times(work)
    device = espresso.runtime.current_backend().describe()
    lines = [f"# Low-precision inference on {device['Device']} (cuDNN {device['cuDNN']}, CuPy {device['CuPy']})", "",
             "| weights and operands | LeNet test accuracy (10,000 images) "
             "| CaffeNet batch 256, ms: median [min, max] of 5 | speed-up over float32 |", "|---|---|---|---|"]
    base = np.median(times["float32"])
    for label, runs in times.items():
        acc = accuracy.get(label.split()[0]) if label != "float32 TF32" else None
        lines.append(f"| {label} | {'' if acc is None else f'{acc:.4f}'} | {np.median(runs):.2f} [{min(runs):.2f}, "
                     f"{max(runs):.2f}] | {base / np.median(runs):.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
