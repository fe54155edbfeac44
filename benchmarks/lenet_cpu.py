"""Espresso vs PyTorch on the CPU: Caffe's LeNet (examples/lenet), side by side, in one run.

Measures (median of --repeats rounds that interleave the two frameworks, each after a warm-up):
  train b64   one SGD step at batch 64: Espresso's Solver.step on lenet_train_test.prototxt with its
              Data layer replaced by an in-memory Input batch, settings of lenet_solver.prototxt;
              PyTorch: the same net, Caffe's xavier init, torch.optim.SGD with Caffe's per-param
              lr_mult / weight decay (param groups) and the "inv" schedule (LambdaLR)
  infer b1    one forward of lenet_deploy.prototxt (softmax output) at batch 1 / batch 64:
  infer b64   Espresso Net.forward vs PyTorch eval() forward under torch.inference_mode
  peak RSS    ru_maxrss of a fresh process per framework (this script with --only) after the
              same number of training iterations
It also checks that the peers do the same work (both trained 5 steps from identical weights on
the same batch: the losses must agree) and profiles Espresso's training step per layer.
Data loading is excluded for both: the batch is the first 64 images of the embedded Fashion-MNIST
subset, scaled by 1/256 as the LeNet Data layer does.

    python benchmarks/lenet_cpu.py [--quick] [--threads N] [--out DIR]

Writes DIR/lenet_cpu.json and DIR/lenet_cpu.txt (default DIR: benchmarks/results).  PyTorch is
a peer for this benchmark only, never a dependency of espresso.
"""

import argparse
import collections
import cProfile
import datetime
import gc
import gzip
import hashlib
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import threadpoolctl

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "examples" / "lenet"
FMNIST = ROOT / "espresso" / "datasets" / "fmnist_subset"
BATCH = 64
# lenet_solver.prototxt's settings; the PyTorch peer uses these, Espresso reads the file (and
# `espresso_solver` checks that the two agree)
SOLVER = {"base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "gamma": 0.0001, "power": 0.75}
FULL = {"warmup": 20, "train": 200, "infer1": 2000, "infer64": 200, "repeats": 5, "rss_iters": 200,
        "profile_iters": 50}
QUICK = {"warmup": 3, "train": 10, "infer1": 50, "infer64": 5, "repeats": 2, "rss_iters": 10,
         "profile_iters": 5}
BENCHES = (("train_b64", "train", BATCH), ("infer_b1", "infer1", 1), ("infer_b64", "infer64", BATCH))
AGREE_STEPS = 5
BLOCKS = 10  # each measurement is timed in this many blocks too
SETTLE_S = 0.3  # pause before each measurement
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# *** data: the same batch for both, with no framework imported ***
def _idx_payload(path, header):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def load_batch(n=BATCH):
    """(images (n,1,28,28) float32 = bytes/256, labels (n,) int64): the first n images of the
    embedded Fashion-MNIST subset (random bytes and labels if it is missing)."""
    images, labels = FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz"
    if images.is_file() and labels.is_file():
        pixels = _idx_payload(images, 16)[: n * 784]
        classes = _idx_payload(labels, 8)[:n]
    else:
        rng = np.random.default_rng(0)
        pixels, classes = rng.integers(0, 256, n * 784, np.uint8), rng.integers(0, 10, n, np.uint8)
    x = pixels.reshape(n, 1, 28, 28).astype(np.float32) * np.float32(0.00390625)
    return x, classes.astype(np.int64)


# *** Espresso ***
def espresso_train_param(batch=BATCH):
    """lenet_train_test.prototxt with its Data layers replaced by one Input layer (data, label)."""
    from espresso.net import load_net_param
    from espresso.proto import caffe_pb2

    source = load_net_param(str(LENET / "lenet_train_test.prototxt"))[0]
    param = caffe_pb2.NetParameter(name=source.name)
    feed = param.layer.add(name="data", type="Input", top=["data", "label"])
    feed.input_param.shape.add(dim=[batch, 1, 28, 28])
    feed.input_param.shape.add(dim=[batch])
    param.layer.extend(layer for layer in source.layer if layer.type != "Data")
    return param


def espresso_solver(x, labels, seed=1):
    """An SGD solver with lenet_solver.prototxt's settings (testing, display, snapshots off) on
    the Input-fed train net, its inputs holding the batch."""
    import espresso
    from espresso.solver import read_solver_param

    espresso.set_mode_cpu()
    param = read_solver_param(str(LENET / "lenet_solver.prototxt"))
    for key, value in SOLVER.items():
        assert np.isclose(getattr(param, key), value), f"lenet_solver.prototxt {key} != {value}"
    assert param.lr_policy == "inv" and param.type == "SGD"
    param.ClearField("net")
    param.net_param.CopyFrom(espresso_train_param(x.shape[0]))
    del param.test_iter[:]
    param.test_interval = param.display = param.snapshot = 0
    param.snapshot_after_train = False
    param.max_iter = 1 << 30
    param.random_seed = seed
    solver = espresso.get_solver(param)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = labels  # Caffe keeps labels as floats
    return solver


def espresso_deploy(batch, weights_from):
    """lenet_deploy.prototxt at `batch`, sharing the weights of the train net `weights_from`."""
    import espresso
    from espresso.net import load_net_param

    param = load_net_param(str(LENET / "lenet_deploy.prototxt"))[0]
    param.layer[0].input_param.shape[0].dim[0] = batch
    net = espresso.Net(param, phase=espresso.TEST)
    net.share_with(weights_from)
    return net


def espresso_runners(x, labels):
    solver = espresso_solver(x, labels)
    nets = {1: espresso_deploy(1, solver.net), BATCH: espresso_deploy(BATCH, solver.net)}
    inputs = {1: x[:1].copy(), BATCH: x}

    def infer(batch):
        net, data = nets[batch], inputs[batch]

        def run(n):
            for _ in range(n):
                net.forward(data=data)
        return run

    return {"train_b64": solver.step, "infer_b1": infer(1), "infer_b64": infer(BATCH)}, solver, nets[1]


def espresso_initial_weights(solver):
    """{layer name: [weight, bias]} copies of the solver net's params."""
    return {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()}


# *** PyTorch ***
def torch_setup(threads):
    import torch

    torch.set_num_threads(threads)
    return torch


def torch_lenet(torch, weights=None, seed=1):
    """LeNet as in lenet_train_test.prototxt; Caffe's xavier init (U(+-sqrt(3/fan_in)), zero bias)
    unless `weights` ({layer: [w, b]} from Espresso) are given."""
    from torch import nn
    from torch.nn import functional as F

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
            self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

        def forward(self, x):
            x = F.max_pool2d(self.conv1(x), 2, 2)
            x = F.max_pool2d(self.conv2(x), 2, 2)
            return self.ip2(F.relu(self.ip1(torch.flatten(x, 1))))

    torch.manual_seed(seed)
    model = LeNet()
    with torch.no_grad():
        for name in ("conv1", "conv2", "ip1", "ip2"):
            layer = getattr(model, name)
            if weights is None:
                bound = (3.0 / layer.weight[0].numel()) ** 0.5
                layer.weight.uniform_(-bound, bound)
                layer.bias.zero_()
            else:
                layer.weight.copy_(torch.from_numpy(weights[name][0]))
                layer.bias.copy_(torch.from_numpy(weights[name][1]))
    return model


def torch_trainer(torch, model, x, labels):
    """step(n): n SGD steps as Caffe's solver takes them: lr_mult 1 for weights, 2 for biases,
    decay_mult 1, momentum, lr = base_lr * (1 + gamma * iter)^-power.  Returns the last loss.
    (torch.optim.SGD keeps lr outside its momentum buffer, Caffe inside: equal while lr is fixed,
    and the "inv" rate changes by < 0.04% over the agreement check's 5 steps.)"""

    s = SOLVER
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "lr": s["base_lr"]}, {"params": biases, "lr": 2 * s["base_lr"]}]
    opt = torch.optim.SGD(groups, lr=s["base_lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + s["gamma"] * it) ** -s["power"])
    # Espresso's forward_backward returns the loss as a float too: read back at every step
    return torch_steps(model, opt, sched, torch.from_numpy(x), torch.from_numpy(labels), read_loss=True)


def torch_steps(model, opt, sched, xt, yt, read_loss):
    """step(n): n steps of `opt` and `sched` on the batch (xt, yt) with cross-entropy; returns
    the last loss (a float when `read_loss`, which reads it back at every step)."""
    from torch.nn import functional as F

    model.train()

    def step(n):
        loss = None
        for _ in range(n):
            opt.zero_grad()
            loss = F.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
            sched.step()
            if read_loss:
                loss = loss.item()
        return loss

    return step


def torch_runners(torch, x, labels):
    from torch.nn import functional as F

    model = torch_lenet(torch)
    train = torch_trainer(torch, model, x, labels)
    inputs = {1: torch.from_numpy(x[:1].copy()), BATCH: torch.from_numpy(x)}

    def infer(batch):
        data = inputs[batch]

        def run(n):
            model.eval()
            with torch.inference_mode():
                for _ in range(n):
                    F.softmax(model(data), dim=1)
            model.train()
        return run

    return {"train_b64": train, "infer_b1": infer(1), "infer_b64": infer(BATCH)}, model


# *** measurements ***
def time_blocks(run, iters, warmup, blocks=BLOCKS):
    """(ms/iter over all `iters`, [ms/iter of each of `blocks` equal blocks]): the blocks show
    whether a burst of outside load hit part of the measurement."""
    run(warmup)
    size = max(1, iters // blocks)
    marks = [time.perf_counter()]
    for _ in range(max(1, iters // size)):
        run(size)
        marks.append(time.perf_counter())
    done = size * (len(marks) - 1)
    return (marks[-1] - marks[0]) / done * 1e3, [(b - a) / size * 1e3 for a, b in zip(marks, marks[1:])]


def measure(runners, cfg):
    """{bench: {framework: {"runs": [ms/iter per round], "blocks": [...]}}}, the rounds alternating
    which framework goes first.  A pause before each measurement lets the other framework's
    spinning BLAS/OpenMP worker threads go to sleep."""
    times = {bench: {fw: {"runs": [], "blocks": []} for fw in runners} for bench, _, _ in BENCHES}
    order = list(runners)
    for r in range(cfg["repeats"]):
        for bench, key, _ in BENCHES:
            for fw in order if r % 2 == 0 else order[::-1]:
                gc.collect()
                time.sleep(SETTLE_S)
                ms, blocks = time_blocks(runners[fw][bench], cfg[key], cfg["warmup"])
                times[bench][fw]["runs"].append(ms)
                times[bench][fw]["blocks"].extend(blocks)
        print(f"  round {r + 1}/{cfg['repeats']} (load {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{b} {times[b]['espresso']['runs'][-1]:.2f}/{times[b]['torch']['runs'][-1]:.2f} ms"
                          for b, _, _ in BENCHES), flush=True)
    return times


def summarize(times):
    out = {}
    for bench, _, batch in BENCHES:
        row = {}
        for fw, t in times[bench].items():
            med = statistics.median(t["runs"])
            row[fw] = {"median_ms": med, "images_per_s": batch * 1e3 / med, "runs_ms": t["runs"],
                       "min_round_ms": min(t["runs"]), "max_round_ms": max(t["runs"]),
                       "median_block_ms": statistics.median(t["blocks"]), "blocks_ms": t["blocks"]}
        for stat in ("median_ms", "median_block_ms", "min_round_ms"):
            row[f"ratio_{stat}"] = row["torch"][stat] / row["espresso"][stat]
        row["ratio_torch_over_espresso"] = row["ratio_median_ms"]
        out[bench] = row
    return out


def caffe_exact_trainer(torch, model, x, labels):
    """step(n) with Caffe's SGD arithmetic written out (history = momentum * history + local_rate *
    (grad + decay * w); w -= history), to separate framework arithmetic from torch.optim's form."""
    from torch.nn import functional as F

    s, it = SOLVER, [0]
    history = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

    def step(n):
        loss = None
        for _ in range(n):
            model.zero_grad()
            loss = F.cross_entropy(model(xt), yt)
            loss.backward()
            rate = s["base_lr"] * (1 + s["gamma"] * it[0]) ** -s["power"]
            with torch.no_grad():
                for name, p in model.named_parameters():
                    local_rate = rate * (2 if name.endswith("bias") else 1)
                    history[name].mul_(s["momentum"]).add_(p.grad + s["weight_decay"] * p, alpha=local_rate)
                    p.sub_(history[name])
            it[0] += 1
            loss = loss.item()
        return loss

    return step


def _max_rel(pairs):
    """max |a - b| / max |a| over (a, b) array pairs, in float64."""
    worst = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


def _param_pairs(net, model, field):
    """(Espresso array, torch array) for every param: field "data" (weights) or "diff" (grads)."""
    for name, blobs in net.params.items():
        for blob, p in zip(blobs, (getattr(model, name).weight, getattr(model, name).bias)):
            yield getattr(blob, field), (p.detach() if field == "data" else p.grad).numpy()


def check_agreement(torch, x, labels, steps=AGREE_STEPS):
    """Both frameworks from Espresso's initial weights on the same batch: the first gradients, then
    the losses of steps 0..steps (the last is the loss after `steps` updates) and the weights after
    steps + 1 updates, with torch.optim.SGD (the timed peer) and with Caffe's update written out."""
    from torch.nn import functional as F

    result = {"steps": steps}
    solver = espresso_solver(x, labels, seed=7)
    model = torch_lenet(torch, espresso_initial_weights(solver))
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
    result["max_rel_grad_diff_step0"] = _max_rel(_param_pairs(solver.net, model, "diff"))
    e_losses = None
    for peer, trainer in (("torch_optim", torch_trainer), ("caffe_rule", caffe_exact_trainer)):
        solver = espresso_solver(x, labels, seed=7)
        model = torch_lenet(torch, espresso_initial_weights(solver))
        step = trainer(torch, model, x, labels)
        losses, t_losses = [], []
        for _ in range(steps + 1):
            solver.step(1)
            losses.append(float(solver.net.blobs["loss"].data))
            t_losses.append(step(1))
        e_losses = e_losses or losses
        rel = [abs(e - t) / abs(e) for e, t in zip(losses, t_losses)]
        result[peer] = {"torch_losses": t_losses, "max_rel_loss_diff": max(rel),
                        "rel_loss_diff_last": rel[-1],
                        "max_rel_weight_diff_after": _max_rel(_param_pairs(solver.net, model, "data"))}
    result["espresso_losses"] = e_losses
    return result


def espresso_layer_profile(net, iters, solver=None, whole=None):
    """Median ms per layer forward (and, given the solver, backward and update) of `net` over
    `iters` iterations, timed one layer at a time in Net.forward_backward's order (medians: robust
    to bursts of outside load); `whole` (a callable) is timed per call the same way, to compare
    with the sum of the layers."""
    names, layers = list(net.layer_dict), list(net.layer_dict.values())
    bottoms = [[net.blobs[n] for n in net.bottom_names[name]] for name in names]
    tops = [[net.blobs[n] for n in net.top_names[name]] for name in names]
    samples = collections.defaultdict(list)
    clock = time.perf_counter

    def timed(key, fn, *args):
        t = clock()
        fn(*args)
        samples[key].append(clock() - t)

    for _ in range(iters):
        if solver:
            timed("clear_param_diffs", net.clear_param_diffs)
        for i, layer in enumerate(layers):
            timed(("forward", i), layer.forward, bottoms[i], tops[i])
        if not solver:
            continue
        for i in reversed(range(len(layers))):
            if net.layer_need_backward[i]:
                timed(("backward", i), layers[i].backward, tops[i], net.bottom_need_backward[i], bottoms[i])
        timed("solver_update", solver.apply_update)

    def ms(key):
        return statistics.median(samples[key]) * 1e3 if key in samples else 0.0

    rows = [{"layer": n, "type": layer.type, "forward_ms": ms(("forward", i)),
             "backward_ms": ms(("backward", i))} for i, (n, layer) in enumerate(zip(names, layers))]
    result = {"iters": iters, "layers": rows}
    if solver:
        result.update(clear_param_diffs=ms("clear_param_diffs"), solver_update=ms("solver_update"))
    if whole is not None:
        result["whole_ms"] = statistics.median(time_blocks(whole, iters, min(iters, 20), blocks=iters)[1])
    return result


def espresso_cprofile(solver, iters, top=15):
    profile = cProfile.Profile()
    profile.enable()
    solver.step(iters)
    profile.disable()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(top)
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return "\n".join(lines[start:start + top + 1])


def torch_op_profile(torch, train, iters, top=12):
    from torch.profiler import ProfilerActivity, profile

    train(3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(iters)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"({iters} steps; divide totals by {iters} for per-step)\n{table}"


# *** peak memory, one fresh process per framework ***
def rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def only(framework, threads, iters):
    """Child mode: import one framework, train `iters` steps, print a JSON line with its RSS."""
    after_numpy = rss_mb()
    x, labels = load_batch()
    if framework == "espresso":
        import espresso  # noqa: F401  (imported here so the import's RSS is counted apart)

        after_import = rss_mb()
        train = espresso_solver(x, labels).step
    else:
        torch = torch_setup(threads)
        after_import = rss_mb()
        train = torch_trainer(torch, torch_lenet(torch), x, labels)
    after_setup = rss_mb()
    train(min(20, iters))
    start = time.perf_counter()
    train(iters)
    ms = (time.perf_counter() - start) / iters * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(json.dumps({"framework": framework, "iters": iters, "rss_after_numpy_mb": after_numpy,
                      "rss_after_import_mb": after_import, "rss_after_setup_mb": after_setup,
                      "rss_end_mb": rss_mb(), "peak_rss_mb": peak, "isolated_train_b64_ms": ms,
                      "threads_in_process": len(os.listdir("/proc/self/task"))}))


def child_rss(framework, threads, iters):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", framework, "--threads", str(threads),
           "--rss-iters", str(iters)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


# *** reporting ***
def machine_info(threads, torch):
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "threads": threads, "python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "numpy_blas": f"{blas.get('name')} {blas.get('version')}{blas_kernels()}",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other",
            "torch_mkldnn": torch.backends.mkldnn.is_available(),
            "espresso_source_sha256": source_digest(), "espresso_numba_kernels": numba_kernels(),
            "env": {k: os.environ.get(k) for k in THREAD_VARS}}


def blas_kernels():
    """', KERNELS kernels' for an OpenBLAS (the core it runs: its AVX2 "Haswell" kernels on an
    AVX-512 CPU are up to 1.8x slower), with the OPENBLAS_CORETYPE that forced it, if any."""
    core = next((pool.get("architecture") for pool in threadpoolctl.threadpool_info()
                 if pool["internal_api"] == "openblas"), None)
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (f", {core} kernels" + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")) if core else ""


def numba_kernels():
    """The Numba version when Espresso's optional Numba CPU kernels are in use, else None."""
    try:
        from espresso.backend.cpu import kernels
    except ImportError:
        return None
    fast = getattr(kernels, "fast", None)
    return getattr(getattr(fast, "numba", None), "__version__", "yes") if fast is not None else None


def source_digest():
    """A digest of espresso/**/*.py, to tell which state of a changing checkout was measured."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "espresso").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def format_table(summary, rss):
    lines = [f"{'benchmark':<12}{'Espresso':>22}{'PyTorch':>22}{'ratio':>9}",
             f"{'':<12}{'ms/iter (images/s)':>22}{'ms/iter (images/s)':>22}{'T/E':>9}"]
    for bench, _, _ in BENCHES:
        row = summary[bench]
        cells = [f"{row[fw]['median_ms']:8.3f} ({row[fw]['images_per_s']:8.0f})"
                 for fw in ("espresso", "torch")]
        lines.append(f"{bench:<12}{cells[0]:>22}{cells[1]:>22}{row['ratio_torch_over_espresso']:9.2f}")
    e, t = rss["espresso"]["peak_rss_mb"], rss["torch"]["peak_rss_mb"]
    lines.append(f"{'peak RSS':<12}{e:19.1f} MB{t:19.1f} MB{t / e:9.2f}")
    lines.append("ratio T/E = PyTorch / Espresso: > 1 means Espresso is faster (or smaller)")
    lines.append("noise check, ms/iter: rounds min..max; median over all blocks of 1/10 of a round (ratio)")
    for bench, _, _ in BENCHES:
        row = summary[bench]
        cells = [f"{r['min_round_ms']:.3f}..{r['max_round_ms']:.3f}; {r['median_block_ms']:.3f}"
                 for r in (row["espresso"], row["torch"])]
        lines.append(f"  {bench:<10} espresso {cells[0]:<24} pytorch {cells[1]:<24}"
                     f"({row['ratio_median_block_ms']:.2f})")
    return "\n".join(lines)


def format_profile(title, profile, whole_name):
    lines = [title, f"{'layer':<10}{'type':<16}{'forward ms':>12}{'backward ms':>13}"]
    total = {"forward_ms": 0.0, "backward_ms": 0.0}
    for row in profile["layers"]:
        for key in total:
            total[key] += row[key]
        lines.append(f"{row['layer']:<10}{row['type']:<16}{row['forward_ms']:12.3f}{row['backward_ms']:13.3f}")
    lines.append(f"{'sum':<26}{total['forward_ms']:12.3f}{total['backward_ms']:13.3f}")
    extra = [key for key in ("clear_param_diffs", "solver_update") if key in profile]
    parts = [f"{key} {profile[key]:.3f} ms" for key in extra]
    summed = sum(total.values()) + sum(profile[key] for key in extra)
    parts.append(f"sum of parts {summed:.3f} ms; {whole_name} as a whole {profile['whole_ms']:.3f} ms")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def report_text(result):
    m, a, s = result["machine"], result["agreement"], result["settings"]
    rss = result["peak_rss"]
    rss_lines = [f"  {fw:<9} after numpy {r['rss_after_numpy_mb']:.1f} MB, after import "
                 f"{r['rss_after_import_mb']:.1f} MB, after setup {r['rss_after_setup_mb']:.1f} MB, peak "
                 f"{r['peak_rss_mb']:.1f} MB; train b64 alone {r['isolated_train_b64_ms']:.2f} ms/iter, "
                 f"{r['threads_in_process']} threads" for fw, r in rss.items()]
    return "\n".join([
        f"LeNet on the CPU, Espresso vs PyTorch  ({m['date']})",
        f"espresso sources {m['espresso_source_sha256']} (Numba kernels: {m['espresso_numba_kernels']}); "
        f"{m['cpu']}, {m['usable_cpus']} usable CPUs, threads {m['threads']}; Python {m['python']}, "
        f"numpy {m['numpy']} ({m['numpy_blas']}), torch {m['torch']} ({m['torch_blas']}, "
        f"mkldnn {m['torch_mkldnn']}, {m['torch_threads']} threads)",
        f"load average before {result['loadavg_before']}, after {result['loadavg_after']}",
        f"median of {s['repeats']} interleaved rounds; per round: {s['warmup']} warm-up, then "
        f"{s['train']} train / {s['infer1']} b1 / {s['infer64']} b64 iterations"
        + ("  [--quick: smoke test, not a measurement]" if s["quick"] else ""),
        "",
        result["table"],
        "",
        f"peak RSS: a fresh process per framework, {s['rss_iters']} training iterations",
        *rss_lines,
        "",
        f"agreement, from identical weights on the same batch: first gradients differ by at most "
        f"{a['max_rel_grad_diff_step0']:.1e} (relative to each param's largest); "
        f"losses of steps 0..{a['steps']}:",
        f"  {'espresso':<26} " + " ".join(f"{v:.6f}" for v in a["espresso_losses"]),
        *[f"  pytorch, {label:<17} " + " ".join(f"{v:.6f}" for v in a[peer]["torch_losses"])
          + f"  max rel diff {a[peer]['max_rel_loss_diff']:.1e} (last {a[peer]['rel_loss_diff_last']:.1e}),"
          f" weights after {a['steps'] + 1} updates {a[peer]['max_rel_weight_diff_after']:.1e}"
          for peer, label in (("torch_optim", "torch.optim.SGD"), ("caffe_rule", "Caffe's SGD rule"))],
        "  (torch.optim.SGD keeps lr outside its momentum buffer; with the changing \"inv\" rate that"
        " accounts for most of its difference)",
        "",
        result["espresso_train_profile_text"],
        "",
        result["espresso_infer_b1_profile_text"],
        "",
        f"Espresso cProfile of {s['profile_iters']} Solver.step iterations (by own time):",
        result["espresso_cprofile"],
        "",
        "PyTorch op profile of the train step (by self CPU time):",
        result["torch_op_profile"],
    ])


def run_all(args, cfg):
    print(f"LeNet CPU benchmark: threads {args.threads}{' (quick)' if args.quick else ''}", flush=True)
    loadavg_before = os.getloadavg()
    print("peak RSS (fresh processes) ...", flush=True)
    rss = {fw: child_rss(fw, args.threads, cfg["rss_iters"]) for fw in ("espresso", "torch")}
    torch = torch_setup(args.threads)
    x, labels = load_batch()
    print("agreement check ...", flush=True)
    agreement = check_agreement(torch, x, labels)
    e_runners, solver, deploy_b1 = espresso_runners(x, labels)
    t_runners, _ = torch_runners(torch, x, labels)
    print("timing ...", flush=True)
    times = measure({"espresso": e_runners, "torch": t_runners}, cfg)
    print("profiling ...", flush=True)
    train_profile = espresso_layer_profile(solver.net, cfg["profile_iters"], solver, e_runners["train_b64"])
    deploy_b1.blobs["data"].data[...] = x[:1]
    b1_iters = 20 * cfg["profile_iters"]
    b1_profile = espresso_layer_profile(deploy_b1, b1_iters, whole=e_runners["infer_b1"])
    summary = summarize(times)
    result = {"machine": machine_info(args.threads, torch),
              "settings": {**cfg, "quick": args.quick, "batch": BATCH},
              "loadavg_before": [round(v, 2) for v in loadavg_before], "results": summary, "peak_rss": rss,
              "agreement": agreement, "espresso_train_profile": train_profile,
              "espresso_infer_b1_profile": b1_profile,
              "espresso_train_profile_text": format_profile(
                  f"Espresso train step b{BATCH} by layer (median of {cfg['profile_iters']} iterations):",
                  train_profile, "Solver.step"),
              "espresso_infer_b1_profile_text": format_profile(
                  f"Espresso deploy forward b1 by layer (median of {b1_iters} iterations):", b1_profile,
                  "Net.forward(data=x)"),
              "espresso_cprofile": espresso_cprofile(solver, cfg["profile_iters"]),
              "torch_op_profile": torch_op_profile(torch, t_runners["train_b64"], cfg["profile_iters"])}
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["table"] = format_table(summary, rss)
    text = report_text(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lenet_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "lenet_cpu.txt").write_text(text + "\n")
    print("\n" + text)
    print(f"\nwrote {out / 'lenet_cpu.json'} and {out / 'lenet_cpu.txt'}")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few iterations: a smoke test, not a measurement")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="BLAS/OpenMP threads for both frameworks (default: all usable CPUs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the results go")
    ap.add_argument("--only", choices=("espresso", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--rss-iters", type=int, default=FULL["rss_iters"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main():
    args = parse_args(sys.argv[1:])
    # NumPy's OpenBLAS reads its thread count once, when loaded: set it, then restart the interpreter
    want = str(args.threads)
    if any(os.environ.get(name) != want for name in THREAD_VARS):
        os.environ.update(dict.fromkeys(THREAD_VARS, want))
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing espresso
    if args.only:
        only(args.only, args.threads, args.rss_iters)
    else:
        run_all(args, QUICK if args.quick else FULL)


if __name__ == "__main__":
    main()
