"""ONNX import: time and memory per model, each converted in a fresh process.

    python benchmarks/onnx_import.py [--models resnet18,vgg11] [--repeat 3] [--out benchmarks/results]

The models are torchvision's (random weights), exported by PyTorch's TorchScript exporter
(weights inside the .onnx) and by its dynamo exporter (weights in an external data file).  Per
model: the weights' size; the conversion's time (median and spread of --repeat runs, the `onnx`
package's import excluded) and peak resident memory above the process's before it, for the
conversion to a NetParameter and weights, and with the Net built too.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x1_0", "googlenet", "vgg11", "alexnet"]

# the peak is VmHWM (ru_maxrss would keep the forking parent's peak across exec)
_CHILD = """
import json, sys, time
import onnx  # imported before the clock starts
from espresso.interop.onnx_import import import_onnx, set_weights
import espresso
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = peak()
start = time.perf_counter()
param, weights = import_onnx(sys.argv[1])
converted = time.perf_counter() - start
peak_convert = peak() - before
net = espresso.Net(param, espresso.TEST)
set_weights(net, weights)
total = time.perf_counter() - start
print(json.dumps({"convert_s": converted, "total_s": total, "peak_convert": peak_convert,
                  "peak_total": peak() - before}))
"""


def export(name, path, dynamo):
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import torchvision.models

    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra).eval()
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("N")},)} if dynamo else {"dynamic_axes": {"data": {0: "N"}}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=dynamo,
                          opset_version=18 if dynamo else 17, input_names=["data"], **kwargs)
    return sum(p.numel() * 4 for p in model.parameters())


def measure(path, repeat):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, check=True,
                                      capture_output=True, text=True).stdout) for _ in range(repeat)]
    return {key: sorted(run[key] for run in runs) for key in runs[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/tmp/espresso-onnx-import")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    mib = 2 ** 20
    lines = [f"# python {' '.join(sys.argv)}; {os.cpu_count()} CPUs",
             f"{'model':<28} {'weights MiB':>11} {'convert s':>16} {'+ Net s':>8} {'peak MiB convert':>17} "
             f"{'with Net':>9}"]
    for name in args.models.split(","):
        for dynamo in (False, True):
            path = Path(args.work) / f"{name}_{'dynamo' if dynamo else 'torchscript'}.onnx"
            size = export(name, path, dynamo)
            m = measure(path, args.repeat)
            convert = m["convert_s"]
            lines.append(f"{path.stem:<28} {size / mib:>11.1f} {convert[len(convert) // 2]:>7.2f} "
                         f"({convert[0]:.2f}-{convert[-1]:.2f}) {m['total_s'][len(convert) // 2]:>8.2f} "
                         f"{max(m['peak_convert']) / mib:>17.0f} {max(m['peak_total']) / mib:>9.0f}")
            print(lines[-1], flush=True)
    Path(args.out, "onnx_import.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
