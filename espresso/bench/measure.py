"""The measurements of one group of cases (a model on a device, in one framework), in a process
of its own: `python -m espresso.bench.measure SPEC_JSON` prints one JSON line per case.

Its first result (batch-1 inference) gives the cold start: process start, imports, net
building, kernel compilation, first iteration, timed from before the parent spawned it.  Then,
for each case: warm-up, then `repeats` blocks of N iterations (N sized so a block lasts
min_seconds), each timed and metered for energy; batch-1 inference also times single iterations
for the latency distribution; the peak host RSS and device memory of each case (started over
between cases); per-layer forward and backward times of Espresso's training net.  Espresso's
inference is Net.run_forward (the output stays on the device, as PyTorch's); training is
Solver.step (SGD, lr 0.001, momentum 0.9, weight decay 5e-4, fixed policy), its CUDA graph on a GPU.
"""

import gc
import json
import math
import sys
import time

import numpy as np

import espresso
from espresso import backend as backends
from espresso.bench import models
from espresso.bench.energy import Meter
from espresso.proto import caffe_pb2

LATENCY_SAMPLES = 300


def espresso_case(model, train, batch, rng):
    """(step(n), sync(), net, net_param) of one Espresso case, inputs filled with random data."""
    param = models.net_param(model, batch, train)
    if train:
        solver_param = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=5e-4, lr_policy="fixed",
                                                 max_iter=10**9, display=0, snapshot_after_train=False)
        solver_param.net_param.CopyFrom(param)
        solver = espresso.SGDSolver(solver_param)
        net, step = solver.net, solver.step
    else:
        net = espresso.Net(param, espresso.TEST)
        if model in models.COMPRESSED:
            net.copy_from(str(models.COMPRESSED[model][1]))

        def step(n):
            for _ in range(n):
                net.run_forward()
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    if train:
        net.blobs["label"].data[...] = rng.integers(0, models.classes(model), batch)
    return step, net.backend.synchronize, net, param


def torch_case(model, train, batch, device, rng, graph):
    """(step(n), sync(), case) of one PyTorch case: the net of Espresso's initial weights (built at
    batch 1 on the CPU for them and for the blob shapes), random inputs of `batch` items."""
    from espresso.bench.torch_peer import TorchCase

    espresso.set_mode_cpu()
    _, _, net, param = espresso_case(model, train, 1, rng)
    inputs = {"data": rng.standard_normal((batch, *net.blobs["data"].shape[1:])).astype(np.float32)}
    if train:
        inputs["label"] = rng.integers(0, models.classes(model), batch).astype(np.float32)
    case = TorchCase(param, net, inputs, train, device, graph)
    return case.step, case.sync, case


def time_case(step, sync, batch, repeats, min_seconds, meter, latency):
    """Timing, energy and (batch-1 inference) latency of one case, warmed up."""
    step(1)
    sync()
    start = time.perf_counter()
    step(1)
    sync()
    n = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    blocks = []
    for _ in range(repeats):
        with meter.measure() as m:
            step(n)
            sync()
        blocks.append({"iterations": n, "seconds": m.seconds, "joules": m.joules})
    out = {"blocks": blocks}
    if latency:
        samples = []
        for _ in range(min(LATENCY_SAMPLES, n * repeats)):
            start = time.perf_counter()
            step(1)
            sync()
            samples.append((time.perf_counter() - start) * 1e3)
        out["latency_ms"] = samples
    return out


def layer_times(net, iterations):
    """Per-layer forward and backward milliseconds of a warmed-up net, averaged (eager; on a GPU,
    CUDA events)."""
    n, backend = len(net.engine_layers), net.backend
    forward_ms, backward_ms = np.zeros(n), np.zeros(n)
    for _ in range(iterations):
        marks = [backend.mark()]
        for i in range(n):
            net.forward_layers(i, i)
            marks.append(backend.mark())
        for i in reversed(range(n)):
            net.backward_range(i, i)
            marks.append(backend.mark())
        ms = [backend.elapsed_ms(a, b) for a, b in zip(marks, marks[1:])]
        forward_ms += ms[:n]
        backward_ms += ms[n:][::-1]
    return forward_ms / iterations, backward_ms / iterations


def run_group(spec):
    """Every case of spec (model, device, framework, cases [(mode, batch)], repeats,
    min_seconds, spawned), printing one JSON line per case (the first with the cold start)."""
    device, framework, model = spec["device"], spec["framework"], spec["model"]
    on_gpu = device == "gpu" and framework == "espresso"  # (PyTorch's process never starts CuPy)
    backend = backends.get(f"cuda:{spec.get('gpu', 0)}" if on_gpu else "cpu")
    if on_gpu:
        espresso.set_device(spec.get("gpu", 0))
        espresso.set_mode_gpu()
    meter = Meter(device, spec.get("gpu", 0), spec.get("watts_per_core", 5.0))
    meter.idle_watts = spec.get("idle_watts")
    rng, too_slow = np.random.default_rng(0), {}
    for k, (mode, batch) in enumerate(spec["cases"]):
        if mode in too_slow:  # not even built: a big batch of a slow case may not fit the host
            print(json.dumps({"model": model, "mode": mode, "batch": batch, "device": device,
                              "framework": framework, "skipped": too_slow[mode]}), flush=True)
            continue
        gc.collect()
        backend.reset_peak_memory()
        train = mode == "train"
        if framework == "espresso":
            step, sync, net, _ = espresso_case(model, train, batch, rng)
        else:
            step, sync, net = torch_case(model, train, batch, device, rng, graph=framework == "torch graph")
            _reset_torch_peak(device)
        record = {"model": model, "mode": mode, "batch": batch, "device": device, "framework": framework}
        if k == 0:
            step(1)
            sync()
            record["cold_start_s"] = time.time() - spec["spawned"]
        start = time.perf_counter()
        step(1)
        sync()
        if time.perf_counter() - start > spec.get("max_iteration_s", 5.0):  # larger batches only take longer
            too_slow[mode] = f"an iteration at batch {batch} took over {spec.get('max_iteration_s', 5.0)} s"
        record.update(time_case(step, sync, batch, spec["repeats"], spec["min_seconds"], meter,
                                latency=mode == "infer" and batch == 1))
        record["host_peak_bytes"] = backends.get("cpu").peak_memory()
        record["device_peak_bytes"] = _device_peak(net, backend, framework) if device == "gpu" else None
        if framework == "espresso" and train and batch == spec.get("layer_batch"):
            forward, backward = layer_times(net, 3)
            record["layers"] = {"names": list(net._layer_names), "forward_ms": forward.tolist(),
                                "backward_ms": backward.tolist()}
        print(json.dumps(record), flush=True)
        del step, sync, net


def _reset_torch_peak(device):
    if device == "gpu":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _device_peak(net, backend, framework):
    if framework == "espresso":
        return backend.peak_memory()
    import torch

    return torch.cuda.max_memory_reserved()


if __name__ == "__main__":
    run_group(json.loads(sys.argv[1]))
