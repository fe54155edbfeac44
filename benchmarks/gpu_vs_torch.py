"""Espresso vs PyTorch on one NVIDIA GPU: LeNet, LeNet-300-100 and CaffeNet training and inference.

Both frameworks run side by side in one process, on the same device, from the same weights.

Cases (--cases picks some; the names are the keys of the JSON):
  lenet_train_b64, _b256, _b1024  one SGD step of examples/lenet/lenet_train_test.prototxt with its Data
                        layers replaced by an Input layer holding a fixed batch (the first images of the
                        embedded Fashion-MNIST subset, scaled by 1/256), lenet_solver.prototxt's settings
                        (momentum 0.9, weight decay 5e-4, "inv" lr, lr_mult 1/2)
  lenet_infer_b1, _b64  one forward of lenet_deploy.prototxt (the trained lenet_iter_10000 weights, softmax)
  lenet300_train_b64    the same for examples/lenet_300_100 (784-300-100-10) and its solver
  caffenet_train_fp32   CaffeNet (benchmarks/nets/caffenet_train.prototxt and caffenet_solver.prototxt),
                        batch 256 of random 227x227x3 images, float32 convolutions and GEMMs on both sides
  caffenet_train_tf32   the same with TF32 allowed: PyTorch's matmul and cuDNN flags; Espresso's
                        backend.set_tf32(True) when it exists, else a subprocess with ESPRESSO_TF32=1
  caffenet_infer_b1, _b64  CaffeNet's deploy forward (no loss, softmax "prob"), batch 1 or 64
Columns, all from the same initial weights (Espresso's, copied into PyTorch):
  Espresso       Solver.step(n) or Net.run_forward (pycaffe's forward without the copy of the output to
                 the host: it stays on the device, as PyTorch's), then backend.synchronize()
  PyTorch eager  torch.optim.SGD, param groups for Caffe's lr_mult / decay_mult, the solver's lr policy
                 as LambdaLR, cudnn.benchmark on, the loss left on the device (no per-step sync);
                 inference: eval() under torch.inference_mode, output left on the device
  PyTorch graph  a torch.cuda.CUDAGraph of the whole step (zero_grad(set_to_none=False), forward, loss,
                 backward, fused SGD whose per-group lr is a device tensor recomputed inside the graph
                 from an on-device iteration counter), captured after a warm-up on a side stream; for
                 inference a graph of the forward.  A failed capture is recorded and the run goes on.
Timing: after a warm-up, each column runs --blocks blocks of N iterations (N chosen so a block lasts
>= 0.25 s), the columns interleaved per block in alternating order; the median ms/iter is reported.
Agreement: before timing, each float32 training case trains 3 steps in both frameworks from the same
weights on the same batch (CaffeNet without its dropout layers, which are random) and reports the
largest relative difference of the losses (and of the first gradients).
Peak device memory: a fresh subprocess per (column, case) (this script with --only): PyTorch's
max_memory_reserved / max_memory_allocated, Espresso's backend.peak_memory() (or, while that does not
exist, the CuPy default pool's total_bytes at the end).  PyTorch's process times its cuDNN algorithms
(cudnn.benchmark); Espresso's takes the choices the timing pass left in its on-disk cache, as a later
run on a machine does, and a second Espresso process with an empty cache times them, as the first
run does (the "1st" column).

    python benchmarks/gpu_vs_torch.py [--quick] [--cases a,b] [--no-memory] [--out DIR]
    python benchmarks/gpu_vs_torch.py --device cpu --quick --out /tmp/gvt   # a dry run on the CPU

Writes DIR/gpu_vs_torch.json and DIR/gpu_vs_torch.txt (default DIR: benchmarks/results).  --device cpu
runs the whole harness with PyTorch CPU and Espresso's CPU backend (no graphs, no memory, CaffeNet at
batch 2): its numbers mean nothing.  PyTorch is a peer for this benchmark only.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lenet_cpu import load_batch, source_digest, torch_steps

ROOT = Path(__file__).resolve().parents[1]
LENET, MLP, NETS = ROOT / "examples" / "lenet", ROOT / "examples" / "lenet_300_100", ROOT / "benchmarks" / "nets"
NETDEFS = {
    "lenet": {"train": LENET / "lenet_train_test.prototxt", "solver": LENET / "lenet_solver.prototxt",
              "deploy": LENET / "lenet_deploy.prototxt", "weights": LENET / "lenet_iter_10000.caffemodel",
              "shape": (1, 28, 28)},
    "lenet300": {"train": MLP / "lenet_300_100_train_test.prototxt", "solver": MLP / "lenet_300_100_solver.prototxt",
                 "shape": (1, 28, 28)},
    "caffenet": {"train": NETS / "caffenet_train.prototxt", "solver": NETS / "caffenet_solver.prototxt",
                 "shape": (3, 227, 227)},
}
CASES = {  # name: (net, train or infer, batch, tf32)
    "lenet_train_b64": ("lenet", "train", 64, False),
    "lenet_train_b256": ("lenet", "train", 256, False),
    "lenet_train_b1024": ("lenet", "train", 1024, False),
    "lenet_infer_b1": ("lenet", "infer", 1, False),
    "lenet_infer_b64": ("lenet", "infer", 64, False),
    "lenet300_train_b64": ("lenet300", "train", 64, False),
    "caffenet_train_fp32": ("caffenet", "train", 256, False),
    "caffenet_train_tf32": ("caffenet", "train", 256, True),
    "caffenet_infer_b1": ("caffenet", "infer", 1, False),
    "caffenet_infer_b64": ("caffenet", "infer", 64, False),
}
CPU_BATCH = {"caffenet_train_fp32": 2, "caffenet_train_tf32": 2}  # --device cpu
COLUMNS = ("espresso", "torch_eager", "torch_graph")
FULL = {"warmup": 20, "blocks": 5, "block_s": 0.25, "mem_iters": 20}
QUICK = {"warmup": 3, "blocks": 2, "block_s": 0.02, "mem_iters": 3}
AGREE_STEPS, AGREE_TOL = 3, 1e-4


def case_spec(name, device):
    net, kind, batch, tf32 = CASES[name]
    return net, kind, CPU_BATCH.get(name, batch) if device == "cpu" else batch, tf32


def batch_data(net, batch):
    """(images float32, labels int64): Fashion-MNIST for the LeNets, uniform [-128, 128) for CaffeNet
    (the range of mean-subtracted pixels) with random labels."""
    if net != "caffenet":
        return load_batch(batch)
    rng = np.random.default_rng(0)
    return rng.uniform(-128, 128, (batch, *NETDEFS[net]["shape"])).astype(np.float32), rng.integers(0, 1000, batch)


class Env:
    """Both frameworks on one device; sync, TF32 switches, memory figures."""

    def __init__(self, device):
        import torch

        import espresso
        from espresso import backend

        self.device, self.cuda, self.torch, self.espresso = device, device == "cuda", torch, espresso
        self.tdev = torch.device("cuda:0" if self.cuda else "cpu")
        self.columns = COLUMNS if self.cuda else COLUMNS[:2]  # no CUDA graphs on the CPU
        if self.cuda:
            espresso.set_device(0)
            espresso.set_mode_gpu()
            torch.backends.cudnn.benchmark = True
        else:
            espresso.set_mode_cpu()
        self.backend = backend.get("cuda:0" if self.cuda else "cpu")
        self.set_torch_tf32(False)

    def set_torch_tf32(self, on):
        self.torch.backends.cuda.matmul.allow_tf32 = on
        self.torch.backends.cudnn.allow_tf32 = on

    def espresso_tf32(self, on):
        """Switch Espresso's TF32 in this process (a no-op on the CPU)."""
        self.backend.set_tf32(on)
        return True

    def sync(self, column=None):
        if column in (None, "espresso"):
            self.backend.synchronize()
        if column != "espresso" and self.cuda:
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.cuda:
            self.sync()
            self.torch.cuda.empty_cache()
            self.backend.xp.get_default_memory_pool().free_all_blocks()

    def memory(self, column):
        if not self.cuda:
            return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if column != "espresso":
            cuda = self.torch.cuda
            return {"peak_mib": cuda.max_memory_reserved() / 2**20, "reserved_mib": cuda.max_memory_reserved() / 2**20,
                    "allocated_mib": cuda.max_memory_allocated() / 2**20}
        return {"peak_mib": self.backend.peak_memory() / 2**20, "source": "backend.peak_memory()"}


# *** Espresso ***
def train_param(net, batch, dropout=True):
    """The net's train prototxt with its Data/Input layers replaced by one Input layer (data, label)."""
    from espresso.net import load_net_param
    from espresso.proto import caffe_pb2

    source = load_net_param(str(NETDEFS[net]["train"]))[0]
    param = caffe_pb2.NetParameter(name=source.name)
    feed = param.layer.add(name="data", type="Input", top=["data", "label"])
    feed.input_param.shape.add(dim=[batch, *NETDEFS[net]["shape"]])
    feed.input_param.shape.add(dim=[batch])
    skip = {"Data", "Input"} | (set() if dropout else {"Dropout"})
    param.layer.extend(layer for layer in source.layer if layer.type not in skip)
    return param


def deploy_param(net, batch):
    """The net's deploy prototxt at `batch`, or its train net without label and loss plus a Softmax."""
    from espresso.net import load_net_param

    if "deploy" in NETDEFS[net]:
        param = load_net_param(str(NETDEFS[net]["deploy"]))[0]
        param.layer[0].input_param.shape[0].dim[0] = batch
        return param
    param = train_param(net, batch)
    feed, loss = param.layer[0], next(layer for layer in param.layer if layer.type == "SoftmaxWithLoss")
    logits = loss.bottom[0]
    feed.top.remove("label")
    del feed.input_param.shape[1]
    param.layer.remove(loss)
    param.layer.add(name="prob", type="Softmax", bottom=[logits], top=["prob"])
    return param


def solver_param(net):
    from espresso.solver import read_solver_param

    return read_solver_param(str(NETDEFS[net]["solver"]))


def espresso_solver(env, net, x, labels, dropout=True, seed=1):
    """An SGD solver with the net's solver settings (testing, display, snapshots off) on the Input-fed
    train net, its inputs holding the batch."""
    param = solver_param(net)
    param.ClearField("net")
    param.net_param.CopyFrom(train_param(net, x.shape[0], dropout))
    del param.test_iter[:]
    param.test_interval = param.display = param.snapshot = 0
    param.snapshot_after_train = False
    param.max_iter = 1 << 30
    param.random_seed = seed
    solver = env.espresso.get_solver(param)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = labels  # Caffe keeps labels as floats
    solver.net.sync()  # the host views' changes reach the device now
    return solver


def host_params(net):
    """{layer: [weight, bias]} host copies of a net's params."""
    return {name: [np.array(b.data) for b in blobs] for name, blobs in net.params.items()}


# *** PyTorch ***
def torch_model(env, net, weights=None, dropout=True):
    """The net in PyTorch, its modules named as the Caffe layers; `weights` ({layer: [w, b]}) copied in."""
    from collections import OrderedDict

    from torch import nn

    def pool(k, s):
        return nn.MaxPool2d(k, s, ceil_mode=True)  # Caffe rounds pooled sizes up

    if net == "lenet":
        layers = [("conv1", nn.Conv2d(1, 20, 5)), ("pool1", pool(2, 2)), ("conv2", nn.Conv2d(20, 50, 5)),
                  ("pool2", pool(2, 2)), ("flat", nn.Flatten()), ("ip1", nn.Linear(800, 500)),
                  ("relu1", nn.ReLU(inplace=True)), ("ip2", nn.Linear(500, 10))]
    elif net == "lenet300":
        layers = [("flat", nn.Flatten()), ("ip1", nn.Linear(784, 300)), ("relu1", nn.ReLU(inplace=True)),
                  ("ip2", nn.Linear(300, 100)), ("relu2", nn.ReLU(inplace=True)), ("ip3", nn.Linear(100, 10))]
    else:
        def lrn():
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)  # Caffe's ACROSS_CHANNELS LRN

        def drop():
            return nn.Dropout(0.5) if dropout else nn.Identity()

        layers = [("conv1", nn.Conv2d(3, 96, 11, stride=4)), ("relu1", nn.ReLU(inplace=True)), ("pool1", pool(3, 2)),
                  ("norm1", lrn()), ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)),
                  ("relu2", nn.ReLU(inplace=True)), ("pool2", pool(3, 2)), ("norm2", lrn()),
                  ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU(inplace=True)),
                  ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", nn.ReLU(inplace=True)),
                  ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", nn.ReLU(inplace=True)),
                  ("pool5", pool(3, 2)), ("flat", nn.Flatten()), ("fc6", nn.Linear(9216, 4096)),
                  ("relu6", nn.ReLU(inplace=True)), ("drop6", drop()), ("fc7", nn.Linear(4096, 4096)),
                  ("relu7", nn.ReLU(inplace=True)), ("drop7", drop()), ("fc8", nn.Linear(4096, 1000))]
    model = nn.Sequential(OrderedDict(layers)).to(env.tdev)
    with env.torch.no_grad():
        for name, (w, b) in (weights or {}).items():
            getattr(model, name).weight.copy_(env.torch.from_numpy(w))
            getattr(model, name).bias.copy_(env.torch.from_numpy(b))
    return model


def lr_factor(sp, it):
    """Caffe's lr policy as a factor of base_lr at iteration `it` (a number, or a tensor on the device)."""
    if sp.lr_policy == "inv":
        return (1 + sp.gamma * it) ** -sp.power
    if sp.lr_policy == "step":
        return sp.gamma ** (it // sp.stepsize)
    if sp.lr_policy == "fixed":
        return it * 0 + 1.0
    raise ValueError(f"lr_policy {sp.lr_policy!r} is not mirrored in PyTorch here")


def torch_groups(model, net, sp):
    """SGD param groups with Caffe's per-param lr_mult / decay_mult (from the train prototxt)."""
    specs = {layer.name: list(layer.param) for layer in train_param(net, 1).layer}
    groups = {}
    for name, module in model.named_children():
        for i, p in enumerate(getattr(module, attr, None) for attr in ("weight", "bias")):
            if p is not None:
                spec = specs[name][i] if i < len(specs[name]) else None
                key = (spec.lr_mult, spec.decay_mult) if spec else (1.0, 1.0)
                groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": sp.base_lr * lr, "weight_decay": sp.weight_decay * decay, "lr_mult": lr}
            for (lr, decay), ps in groups.items()]


def torch_static(env, x, labels):
    return env.torch.from_numpy(x).to(env.tdev), env.torch.from_numpy(np.asarray(labels, np.int64)).to(env.tdev)


def eager_trainer(env, model, net, x, labels):
    """run(n): n SGD steps as Caffe's solver takes them; returns the last loss (a tensor, never
    read back per step)."""
    torch, sp = env.torch, solver_param(net)
    opt = torch.optim.SGD(torch_groups(model, net, sp), lr=sp.base_lr, momentum=sp.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(sp, it))
    return torch_steps(model, opt, sched, *torch_static(env, x, labels), read_loss=False)


def graph_trainer(env, model, net, x, labels, tensor_lr=True):
    """run(n): n replays of a CUDA graph of the whole step; the lr is computed in the graph from an
    iteration counter on the device (tensor_lr=False: a float lr, frozen at capture).  The warm-up's
    updates are undone after capture: the first replay starts from the initial weights at iteration 0."""
    from torch.nn import functional as F

    torch, sp = env.torch, solver_param(net)
    groups = torch_groups(model, net, sp)
    if tensor_lr:
        for g in groups:
            g["lr"] = torch.tensor(g["lr"], dtype=torch.float32, device=env.tdev)
    opt = torch.optim.SGD(groups, lr=sp.base_lr, momentum=sp.momentum, fused=tensor_lr or None)
    it = torch.zeros((), device=env.tdev)
    xt, yt = torch_static(env, x, labels)
    initial = [p.detach().to("cpu", copy=True) for p in model.parameters()]  # not counted in device memory
    model.train()

    def step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        if tensor_lr:
            factor = lr_factor(sp, it)
            for g in opt.param_groups:
                g["lr"].copy_(factor * (sp.base_lr * g["lr_mult"]))
        opt.step()
        it.add_(1)
        return loss

    graph, loss = cuda_graph(torch, step)
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
        for state in opt.state.values():
            state["momentum_buffer"].zero_()
        it.zero_()
    torch.cuda.synchronize()
    return replayer(graph, loss, model, opt, xt, yt, it)


def cuda_graph(torch, fn, warmup=3):
    """(graph, its static output) of fn(), captured after `warmup` calls on a side stream (PyTorch's recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replayer(graph, out, *static):
    """run(n): n replays.  `static` keeps alive what the graph reads and writes (model, optimizer
    state, inputs): freed, PyTorch's allocator would hand that memory to other tensors."""

    def run(n, _static=static):
        for _ in range(n):
            graph.replay()
        return out
    return run


def torch_infer(env, model, x, graph=False):
    from torch.nn import functional as F

    torch = env.torch
    xt = torch.from_numpy(x).to(env.tdev)
    model.eval()
    if not graph:
        def run(n):
            with torch.inference_mode():
                for _ in range(n):
                    out = F.softmax(model(xt), dim=1)
            return out
        return run
    with torch.inference_mode():
        return replayer(*cuda_graph(torch, lambda: F.softmax(model(xt), dim=1)), model, xt)


def build(env, column, case, weights=None, notes=None):
    """(run(n), the initial weights when column is Espresso) for one column of one case."""
    net, kind, batch, _ = case_spec(case, env.device)
    x, labels = batch_data(net, batch)
    if column == "espresso":
        if kind == "train":
            solver = espresso_solver(env, net, x, labels)
            return solver.step, host_params(solver.net)
        enet = env.espresso.Net(deploy_param(net, batch), phase=env.espresso.TEST)
        trained = NETDEFS[net].get("weights")
        if trained is not None and trained.exists():
            enet.copy_from(str(trained))
        elif trained is not None:  # a fresh checkout: the main job (tools/run.sh) makes the trained weights
            rng = np.random.default_rng(0)
            for blobs in enet.params.values():
                for blob in blobs:
                    blob.data[...] = rng.standard_normal(blob.shape).astype(np.float32) * 0.1
            (notes if notes is not None else []).append(f"{trained.name} not found (the main job writes it): "
                                                        "random weights, which take the same time")
        enet.blobs["data"].data[...] = x
        enet.sync()

        last = len(enet.layers) - 1

        def forward(n):  # the output stays on the device, as PyTorch's does
            for _ in range(n):
                enet.run_forward(0, last)
        return forward, host_params(enet)
    model = torch_model(env, net, weights)
    if kind == "infer":
        return torch_infer(env, model, x, graph=column == "torch_graph"), None
    if column == "torch_eager":
        return eager_trainer(env, model, net, x, labels), None
    try:
        return graph_trainer(env, model, net, x, labels), None
    except Exception as e:  # fall back to a graph with the lr frozen at capture
        (notes if notes is not None else []).append(f"tensor-lr graph capture failed ({type(e).__name__}: {e}); "
                                                    "the graph column keeps the lr constant")
        env.sync()
        return graph_trainer(env, torch_model(env, net, weights), net, x, labels, tensor_lr=False), None


# *** agreement ***
def _max_rel(pairs):
    """max |a - b| / max |a| over (a, b) array pairs, in float64."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in pairs]
    return max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) for a, b in pairs)


def check_agreement(env, case):
    """Espresso vs PyTorch eager (and graph) from Espresso's initial weights on the same batch, no
    dropout: the first gradients, then the losses of AGREE_STEPS SGD steps."""
    from torch.nn import functional as F

    net, _, batch, _ = case_spec(case, env.device)
    x, labels = batch_data(net, batch)
    solver = espresso_solver(env, net, x, labels, dropout=False, seed=7)
    weights = host_params(solver.net)
    model = torch_model(env, net, weights, dropout=False)
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    xt, yt = torch_static(env, x, labels)
    F.cross_entropy(model(xt), yt).backward()
    grads = [(blob.diff, getattr(model, name).weight.grad if i == 0 else getattr(model, name).bias.grad)
             for name, blobs in solver.net.params.items() for i, blob in enumerate(blobs)]
    result = {"dropout_removed": net == "caffenet", "steps": AGREE_STEPS,
              "max_rel_grad_diff_step0": _max_rel((np.array(e), t.detach().cpu().numpy()) for e, t in grads)}
    train = eager_trainer(env, model, net, x, labels)
    e_losses, t_losses = [], []
    for _ in range(AGREE_STEPS):
        solver.step(1)
        e_losses.append(float(solver.net.blobs["loss"].data))
        t_losses.append(train(1).item())
    result.update(espresso_losses=e_losses, torch_losses=t_losses,
                  max_rel_loss_diff=max(abs(e - t) / abs(e) for e, t in zip(e_losses, t_losses)))
    result["ok"] = result["max_rel_loss_diff"] <= AGREE_TOL
    if env.cuda:
        try:
            replay = graph_trainer(env, torch_model(env, net, weights, dropout=False), net, x, labels)
            g_losses = [replay(1).item() for _ in range(AGREE_STEPS)]
            result.update(torch_graph_losses=g_losses,
                          graph_vs_eager_max_rel=max(abs(g - t) / abs(t) for g, t in zip(g_losses, t_losses)))
        except Exception as e:
            result["torch_graph_error"] = f"{type(e).__name__}: {e}"
    return result


# *** timing ***
def time_columns(env, runs, cfg, errors):
    """{column: [ms/iter of each block]}, {column: iterations per block}; a failing column is dropped."""
    clock, sizes = time.perf_counter, {}
    for col, run in list(runs.items()):
        try:
            run(cfg["warmup"])
            env.sync(col)
            n = 1
            while True:  # double n until a run lasts a quarter block
                start = clock()
                run(n)
                env.sync(col)
                took = clock() - start
                if took >= cfg["block_s"] / 4 or n >= 1 << 16:
                    break
                n *= 2
            sizes[col] = max(1, math.ceil(n * cfg["block_s"] / max(took, 1e-9)))
        except Exception as e:
            errors[col] = f"{type(e).__name__}: {e}"
            del runs[col]
    blocks = {col: [] for col in runs}
    order = list(runs)
    for b in range(cfg["blocks"]):
        for col in order if b % 2 == 0 else order[::-1]:
            env.sync()
            start = clock()
            runs[col](sizes[col])
            env.sync(col)
            blocks[col].append((clock() - start) / sizes[col] * 1e3)
    return blocks, sizes


def run_child(args, column, case, timing=False, empty_cache=False):
    """This script in a fresh process for one (column, case): its JSON line, or {"error": ...}.
    `empty_cache`: Espresso's choices cache empty, as on a machine that never ran it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", column, "--cases", case, "--device", args.device]
    cmd += ["--quick"] * args.quick + ["--time"] * timing
    env = {k: v for k, v in os.environ.items() if k != "ESPRESSO_TF32"}
    if column == "espresso" and CASES[case][3]:
        env["ESPRESSO_TF32"] = "1"
    try:
        with tempfile.TemporaryDirectory() as cache:
            if empty_cache:
                env["ESPRESSO_CACHE_DIR"] = cache
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def child_main(args, cfg):
    env = Env(args.device)
    column, case = args.only, args.cases
    if CASES[case][3]:
        env.set_torch_tf32(True)
        env.espresso_tf32(True)  # where it exists; else ESPRESSO_TF32=1, set by the parent
    run, _ = build(env, column, case)
    out = {"column": column, "case": case}
    if args.time:
        errors = {}
        blocks, sizes = time_columns(env, {column: run}, cfg, errors)
        if errors:
            raise RuntimeError(errors[column])
        out.update(blocks_ms=blocks[column], iters_per_block=sizes[column])
    else:
        run(cfg["warmup"] + cfg["mem_iters"])
    env.sync(column)
    out["memory"] = env.memory(column)
    print(json.dumps(out))


def measure_case(env, case, args, cfg):
    net, kind, batch, tf32 = case_spec(case, env.device)
    res = {"net": net, "kind": kind, "batch": batch, "tf32": tf32, "errors": {}, "notes": []}
    if kind == "train" and not tf32:
        print("  agreement check ...", flush=True)
        res["agreement"] = a = check_agreement(env, case)
        print(f"  losses max rel diff {a['max_rel_loss_diff']:.1e} ({'ok' if a['ok'] else 'FAIL'}), first grads "
              f"{a['max_rel_grad_diff_step0']:.1e}" + (", dropout removed" if a["dropout_removed"] else ""), flush=True)
        env.free()
    env.set_torch_tf32(tf32)
    espresso_here = env.espresso_tf32(True) if tf32 else True
    runs, weights = {}, None
    for col in env.columns:
        if col != "espresso" or espresso_here:
            try:
                runs[col], w = build(env, col, case, weights, res["notes"])
                weights = weights or w
            except Exception as e:
                res["errors"][col] = f"{type(e).__name__}: {e}"
                env.sync()
    blocks, sizes = time_columns(env, runs, cfg, res["errors"])
    if not espresso_here:
        child = run_child(args, "espresso", case, timing=True)
        res["notes"].append("Espresso TF32 timed in a subprocess with ESPRESSO_TF32=1 (backend has no "
                            "set_tf32), not interleaved with PyTorch")
        if "error" in child:
            res["errors"]["espresso"] = child["error"]
        else:
            blocks["espresso"], sizes["espresso"] = child["blocks_ms"], child["iters_per_block"]
            res["espresso_tf32_child_memory"] = child["memory"]
    env.set_torch_tf32(False)
    if tf32 and espresso_here:
        env.espresso_tf32(False)
    for col, times in blocks.items():
        med = statistics.median(times)
        res[col] = {"median_ms": med, "images_per_s": batch * 1e3 / med, "blocks_ms": times,
                    "iters_per_block": sizes[col]}
    for peer in ("torch_eager", "torch_graph"):
        if "espresso" in res and peer in res:
            res[f"speedup_vs_{peer}"] = res[peer]["median_ms"] / res["espresso"]["median_ms"]
    del runs
    env.free()
    return res


# *** reporting ***
def machine_info(env):
    torch, info = env.torch, {}
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = None
    if env.cuda:
        info.update(gpu=torch.cuda.get_device_name(0), torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["gpu"] = None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": env.device,
            **info, "torch": torch.__version__, "espresso": env.espresso.__version__,
            "espresso_source_sha256": source_digest(), "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "espresso_backend": env.backend.describe(),
            "torch_cudnn_benchmark": env.cuda}


def _cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def format_table(cases, memory):
    head = (f"{'case':<22}{'batch':>6}{'Espresso ms':>13}{'torch eager':>13}{'torch graph':>13}"
            f"{'x vs eager':>12}{'x vs graph':>12}{'peak MiB E':>12}{'E 1st':>7}{'peak MiB T':>12}")
    lines = [head]
    for name, r in cases.items():
        ms = [r.get(col, {}).get("median_ms") for col in COLUMNS]
        mem = memory.get(name, {})
        mem_e, mem_first, mem_t = (mem.get(col, {}).get("memory", {}).get("peak_mib")
                                   for col in ("espresso", "espresso_first_run", "torch_eager"))
        lines.append(f"{name:<22}{r['batch']:>6}" + "".join(f"{_cell(v, '.3f'):>13}" for v in ms)
                     + f"{_cell(r.get('speedup_vs_torch_eager'), '.2f'):>12}"
                     + f"{_cell(r.get('speedup_vs_torch_graph'), '.2f'):>12}"
                     + f"{_cell(mem_e, '.0f'):>12}{_cell(mem_first, '.0f'):>7}{_cell(mem_t, '.0f'):>12}")
    lines.append("ms = median ms per iteration (training step or forward); x vs eager / graph = PyTorch ms / "
                 "Espresso ms: > 1 means Espresso is faster; peak MiB E = Espresso with its timed choices "
                 "cached, E 1st = timing them (a first run); T = PyTorch eager max_memory_reserved "
                 "(cudnn.benchmark)")
    return "\n".join(lines)


def report_text(result):
    m, s = result["machine"], result["settings"]
    lines = [f"Espresso vs PyTorch on {m['gpu'] or 'the CPU (a dry run: no graphs, no memory)'}  ({m['date']})",
             f"espresso {m['espresso']} (sources {m['espresso_source_sha256']}), torch {m['torch']} (CUDA "
             f"{m.get('torch_cuda')}, cuDNN {m.get('cudnn')}), cupy {m['cupy']}, numpy {m['numpy']}, "
             f"Python {m['python']}",
             f"{s['blocks']} interleaved blocks of >= {s['block_s']} s per column after {s['warmup']} warm-up "
             f"iterations" + ("  [--quick or --device cpu: a smoke test, not a measurement]" if s["quick"] else ""),
             "", result["table"], ""]
    for name, r in result["cases"].items():
        lines.append(f"{name} (batch {r['batch']}{', TF32' if r['tf32'] else ', float32'}): " + ", ".join(
            f"{col} {r[col]['images_per_s']:.0f} img/s" for col in COLUMNS if col in r))
        a = r.get("agreement")
        if a:
            lines.append(f"  agreement ({a['steps']} steps{', dropout removed' if a['dropout_removed'] else ''}): "
                         f"losses max rel diff {a['max_rel_loss_diff']:.1e} {'ok' if a['ok'] else 'FAIL'}; "
                         f"first grads {a['max_rel_grad_diff_step0']:.1e}; espresso "
                         + " ".join(f"{v:.6f}" for v in a["espresso_losses"]) + "; torch "
                         + " ".join(f"{v:.6f}" for v in a["torch_losses"])
                         + (f"; graph vs eager {a['graph_vs_eager_max_rel']:.1e}" if "torch_graph_losses" in a else ""))
            if "torch_graph_error" in a:
                lines.append(f"  graph agreement error: {a['torch_graph_error']}")
        lines += [f"  note: {n}" for n in r["notes"]] + [f"  error [{c}]: {e}" for c, e in r["errors"].items()]
        for col, child in result["memory"].get(name, {}).items():
            lines.append(f"  memory [{col}]: " + (child["error"] if "error" in child else ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in child["memory"].items())))
    failed = [name for name, r in result["cases"].items() if not r.get("agreement", {}).get("ok", True)]
    lines += ["", f"AGREEMENT FAILED (losses differ by > {AGREE_TOL:g}): {', '.join(failed)}" if failed else
              f"agreement: every checked case's losses within {AGREE_TOL:g} relative",
              "first grads = max |diff| / max |grad| per param: informative only, since float32 rounding flips a "
              "few near-tied max-pool windows, which moves a position's whole gradient",
              "PyTorch eager uses torch.optim.SGD + LambdaLR and never syncs per step; PyTorch graph's lr comes "
              "from a device tensor updated inside the graph; Espresso's Solver.step replays its own graph of the "
              "whole iteration and reads the losses back at display time (never, with display 0)."]
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few iterations, small blocks: a smoke test")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of the harness (PyTorch CPU, Espresso's CPU backend)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the results go")
    ap.add_argument("--only", choices=COLUMNS, help=argparse.SUPPRESS)
    ap.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    return args


def main():
    args = parse_args(sys.argv[1:])
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing espresso
    cfg = QUICK if args.quick or args.device == "cpu" else FULL
    if args.only:
        return child_main(args, cfg)
    if os.environ.pop("ESPRESSO_TF32", None):
        print("ESPRESSO_TF32 is unset for this run: TF32 is measured only in caffenet_train_tf32")
    env = Env(args.device)
    cases = {}
    for case in args.cases.split(","):
        print(f"{case} ...", flush=True)
        cases[case] = r = measure_case(env, case, args, cfg)
        print("  " + ", ".join(f"{col} {r[col]['median_ms']:.3f} ms" for col in COLUMNS if col in r)
              + "".join(f"; {col} error: {e}" for col, e in r["errors"].items()), flush=True)
    memory = {}
    save(env, cfg, cases, memory, args.out)  # the timings survive a memory phase cut short
    if env.cuda and not args.no_memory:
        print("peak memory (a fresh process per column and case) ...", flush=True)
        for case in cases:
            memory[case] = {col: run_child(args, col, case) for col in env.columns}
            memory[case]["espresso_first_run"] = run_child(args, "espresso", case, empty_cache=True)
            save(env, cfg, cases, memory, args.out)
    print("\n" + report_text(save(env, cfg, cases, memory, args.out)))
    print(f"\nwrote {Path(args.out) / 'gpu_vs_torch.json'} and {Path(args.out) / 'gpu_vs_torch.txt'}")


def save(env, cfg, cases, memory, out):
    """Write DIR/gpu_vs_torch.{json,txt} with what has been measured so far; returns the result."""
    result = {"machine": machine_info(env), "settings": {**cfg, "quick": cfg is QUICK, "cases": list(cases)},
              "cases": cases, "memory": memory}
    result["table"] = format_table(cases, memory)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_vs_torch.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_vs_torch.txt").write_text(report_text(result) + "\n")
    return result


if __name__ == "__main__":
    main()
