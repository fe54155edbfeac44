"""`espresso bench`: speed, memory and energy of nets on the CPU and the GPU, Espresso beside
PyTorch, in one report (espresso/bench/report.py).

Each (model, device, framework) group runs in a fresh process (espresso/bench/measure.py), so
its first result is a true cold start and its memory is its own.  Frameworks: Espresso; with
--compare torch, PyTorch eager and, on a GPU, PyTorch's CUDA graph of the whole step.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

from espresso.bench import models
from espresso.bench.energy import Meter
from espresso.errors import EspressoError

STANDARD = ["lenet", "lenet300", "lenet_dc", "lenet300_dc", "caffenet", "googlenet", "resnet50"]
BIG = {"caffenet", "googlenet", "resnet50"}
QUICK = {"batches": [1, 64], "big_batches": {"infer": [1], "train": [2]}, "repeats": 3, "min_seconds": 0.2}


def plan(names, batches, modes, quick):
    """[(model, [(mode, batch)])]: inference batches ascending, then training; compressed models
    infer only; --quick keeps the big nets at batch 1 (inference) and 2 (training)."""
    groups = []
    for name in names:
        cases = []
        for mode in modes:
            if mode == "train" and name in models.COMPRESSED:
                continue
            chosen = QUICK["big_batches"][mode] if quick and name in BIG else batches
            cases += [(mode, b) for b in sorted(chosen)]
        groups.append((name, cases))
    return groups


def machine(devices, gpu):
    """What ran: CPU model and cores, GPU and driver, library versions."""
    import numpy

    import espresso

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": numpy.__version__, "espresso": espresso.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for module in ("cupy", "torch"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    if "gpu" in devices:
        from espresso import backend

        info["gpu_backend"] = {k: str(v) for k, v in backend.get(f"cuda:{gpu}").describe().items()}
    return info


def run(names, devices, batches, modes, frameworks, report_dir, quick=False, gpu=0, repeats=None,
        min_seconds=None, watts_per_core=5.0, progress=None):
    """Measure every case; write report_dir/bench.json and the report pages; return the results.
    Each figure comes from `repeats` timed blocks of at least min_seconds (5 of 0.5 s; --quick 3 of 0.2 s)."""
    for name in names:
        if name not in models.MODELS and name not in models.COMPRESSED:
            known = ", ".join(list(models.MODELS) + list(models.COMPRESSED))
            raise EspressoError(f"unknown model '{name}' (known: {known})")
        if name in models.COMPRESSED and not models.COMPRESSED[name][1].exists():
            raise EspressoError(f"model '{name}': its compressed file {models.COMPRESSED[name][1]} is missing")
    repeats = repeats or (QUICK["repeats"] if quick else 5)
    min_seconds = min_seconds or (QUICK["min_seconds"] if quick else 0.5)
    meters = {device: Meter(device, gpu, watts_per_core) for device in devices}
    for meter in meters.values():
        meter.measure_idle()
    groups = [(name, cases, device, framework) for name, cases in plan(names, batches, modes, quick)
              for device in devices for framework in frameworks
              if not (framework == "torch graph" and device == "cpu")
              and not (framework != "espresso" and name in models.COMPRESSED)]
    os.makedirs(report_dir, exist_ok=True)
    results = {"machine": machine(devices, gpu), "energy": {d: m.describe() for d, m in meters.items()},
               "settings": {"repeats": repeats, "min_seconds": min_seconds, "quick": quick, "batches": batches,
                            "modes": modes, "frameworks": frameworks},
               "seconds": 0.0, "cases": []}
    started = time.perf_counter()
    for index, (name, cases, device, framework) in enumerate(groups):
        if progress:
            progress(index, len(groups), f"{name} on the {device.upper()}, {framework}")
        results["cases"] += _run_group(name, cases, device, framework, gpu, repeats, min_seconds, watts_per_core,
                                       meters[device].idle_watts)
        results["seconds"] = time.perf_counter() - started
        with open(os.path.join(report_dir, "bench.json"), "w") as f:  # after each group: nothing lost on a crash
            json.dump(results, f, indent=1)
    if progress:
        progress(len(groups), len(groups), "writing the report")
    from espresso.bench.report import write_report

    write_report(results, report_dir)
    return results


def _run_group(name, cases, device, framework, gpu, repeats, min_seconds, watts_per_core, idle_watts):
    spec = {"model": name, "device": device, "framework": framework, "cases": cases, "gpu": gpu,
            "repeats": repeats, "min_seconds": min_seconds, "watts_per_core": watts_per_core,
            "idle_watts": idle_watts, "layer_batch": _layer_batch(cases)}
    spec["spawned"] = time.time()
    done = subprocess.run([sys.executable, "-m", "espresso.bench.measure", json.dumps(spec)],
                          capture_output=True, text=True)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        measured = {(r["mode"], r["batch"]) for r in records}
        records += [{"model": name, "mode": m, "batch": b, "device": device, "framework": framework,
                     "skipped": f"failed: {reason}"} for m, b in cases if (m, b) not in measured]
    return records


def _layer_batch(cases):
    """The training batch whose per-layer times are reported: the largest up to 64."""
    train = sorted(b for mode, b in cases if mode == "train")
    return max([b for b in train if b <= 64] or train[:1] or [None])
