"""Post-training int8 on the CPU against float32: LeNet and LeNet-300-100 trained on
Fashion-MNIST with their example solvers, then `espresso compress --int8` (calibrated on 20
test batches), and LeNet-300-100 with pruning + quantization + int8 (Deep Compression's stages,
as benchmarks/compress_lenet.sh runs them, then int8).  Reports top-1 accuracy on the 10,000
test images, the file sizes, and inference time at batch 1 and 64, float and int8 nets timed
alternately in one process (median per repeat; the spread over --repeats).

    python benchmarks/int8.py [--iterations 10000] [--repeats 5] [--out benchmarks/results/int8]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import espresso
from espresso.compress import compress
from espresso.data.fmnist import make_fmnist_lmdbs
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_text, write_text

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"lenet": ROOT / "examples/lenet", "lenet_300_100": ROOT / "examples/lenet_300_100"}
COMBINED = {"prune": {"*": 0.95, "ip3": 0.8}, "bits": {"*": 5}, "prune_steps": 3, "centroid_grad": "sum"}


def prepared(name, work, dbs, iterations):
    """(train_test prototxt, solver prototxt) over the LMDBs in `work`, and the trained weights."""
    folder = MODELS[name]
    net = read_text(folder / f"{name}_train_test.prototxt", caffe_pb2.NetParameter())
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = str(dbs[layer.include[0].phase])
    write_text(work / f"{name}_net.prototxt", net)
    solver = read_text(folder / f"{name}_solver.prototxt", caffe_pb2.SolverParameter())
    solver.net, solver.max_iter, solver.snapshot, solver.display = str(work / f"{name}_net.prototxt"), iterations, 0, 0
    solver.snapshot_prefix, solver.test_interval = str(work / name), iterations
    write_text(work / f"{name}_solver.prototxt", solver)
    weights = work / f"{name}_iter_{iterations}.caffemodel"
    if not weights.exists():
        espresso.SGDSolver(str(work / f"{name}_solver.prototxt")).solve()
    return str(work / f"{name}_net.prototxt"), str(work / f"{name}_solver.prototxt"), str(weights)


def deploy(net_path, batch):
    """The train/test net as a deploy net: an Input of `batch` images, no data/loss/accuracy."""
    net = read_text(net_path, caffe_pb2.NetParameter())
    out = parse_text(f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 1 '
                     'dim: 28 dim: 28 } } }', caffe_pb2.NetParameter())
    for layer in net.layer:
        if layer.type not in ("Data", "Accuracy", "SoftmaxWithLoss"):
            out.layer.add().CopyFrom(layer)
    return out


def timed(nets, batch, repeats, rng):
    """{label: [median ms per repeat]} of forward passes, the nets alternating within a repeat."""
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    runs = 300 if batch == 1 else 30
    times = {label: [] for label in nets}
    for net in nets.values():
        net.blobs["data"].data[...] = x
        for _ in range(10):
            net.run_forward()
    for _ in range(repeats):
        for label, net in nets.items():
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                net.run_forward()
                samples.append(time.perf_counter() - start)
            times[label].append(1e3 * float(np.median(samples)))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10000, help="baseline training iterations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stage-iters", type=int, default=2000, help="retraining iterations per pruning round, and "
                        "of the quantized weights")
    parser.add_argument("--work", default="", help="folder for LMDBs and trained models (kept between runs)")
    parser.add_argument("--out", default="benchmarks/results/int8")
    args = parser.parse_args()
    out, rng = Path(args.out), np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="int8_"))
    train_db, test_db, source = make_fmnist_lmdbs(work, overwrite=True)
    dbs = {0: train_db, 1: test_db}
    results, files = {"source": source.description, "models": {}}, {}
    for name in MODELS:
        net, solver, weights = prepared(name, work, dbs, args.iterations)
        combined = dict(COMBINED, retrain_iters=args.stage_iters, quant_iters=args.stage_iters)
        stages = {"int8": {}, **({"pruned+quantized+int8": combined} if name == "lenet_300_100" else {})}
        for stage, options in stages.items():
            path = out / f"{name}_{stage.replace('+', '_')}.espz"
            report = compress(net, weights, solver, output=path, int8={"iterations": 20}, **options)
            results["models"].setdefault(name, {})[stage] = {
                key: report[key] for key in ("ratio", "accuracy_before", "accuracy_after", "original_bytes",
                                             "compressed_bytes")}
            files[(name, stage)] = path
        for batch in (1, 64):
            proto = deploy(net, batch)
            nets = {"float32": espresso.Net(proto, espresso.TEST, weights=weights)}
            for stage in stages:
                nets[stage] = espresso.Net(proto, espresso.TEST, weights=os.fspath(files[(name, stage)]))
            times = timed(nets, batch, args.repeats, rng)
            for stage in stages:
                ratios = [f / q for f, q in zip(times["float32"], times[stage])]
                results["models"][name][stage][f"b{batch}"] = {
                    "float32_ms": times["float32"], "ms": times[stage], "speedup_median": float(np.median(ratios)),
                    "speedup_min": min(ratios), "speedup_max": max(ratios)}
    lines = [f"# int8 on the CPU, {source.description}; speed-up = float32 ms / int8 ms, median [min, max] of "
             f"{args.repeats} alternating repeats", "",
             "| model | stage | size ratio | accuracy float32 | accuracy after | b1 speed-up | b64 speed-up |",
             "|---|---|---|---|---|---|---|"]
    for name, stages in results["models"].items():
        for stage, r in stages.items():
            speed = [f"{r[b]['speedup_median']:.2f}x [{r[b]['speedup_min']:.2f}, {r[b]['speedup_max']:.2f}] "
                     f"({np.median(r[b]['float32_ms']):.3f} -> {np.median(r[b]['ms']):.3f} ms)" for b in ("b1", "b64")]
            lines.append(f"| {name} | {stage} | {r['ratio']:.1f}x | {r['accuracy_before']:.4f} | "
                         f"{r['accuracy_after']:.4f} | {speed[0]} | {speed[1]} |")
    (out / "int8.md").write_text("\n".join(lines) + "\n")
    (out / "int8.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
