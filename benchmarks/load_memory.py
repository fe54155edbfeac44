"""Host memory of loading a large .caffemodel: VGG-16 (138 M float32 weights, 553 MB) with random
weights, written once, then a deploy net built with them in a fresh process: its peak resident
memory (Linux's VmHWM after `import espresso` and after the net) beyond what the net holds besides
its weights, against the weights' bytes (the target: at most 1.1x).

    python benchmarks/load_memory.py [--work DIR] [--repeats 3]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import espresso
from espresso import layers as L
from espresso.net_spec import NetSpec

LOAD = """
import json, sys
import espresso
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
before = status("VmHWM")  # Python, NumPy and Espresso imported
net = espresso.Net(sys.argv[1], espresso.TEST, weights=sys.argv[2])
weights = sum(blob.data.nbytes for blobs in net.params.values() for blob in blobs)
print(json.dumps({"before": before, "peak": status("VmHWM"), "held": status("VmRSS"), "weights": int(weights)}))
"""


def vgg16():
    """VGG-16's deploy net (Simonyan and Zisserman's configuration D), batch 1."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 224, 224]))
    top = n.data
    for block, (convs, width) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], 1):
        for k in range(1, convs + 1):
            conv = L.Convolution(top, num_output=width, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
            setattr(n, f"conv{block}_{k}", conv)
            top = L.ReLU(conv, in_place=True)
            setattr(n, f"relu{block}_{k}", top)
        top = L.Pooling(top, pool=0, kernel_size=2, stride=2)  # MAX
        setattr(n, f"pool{block}", top)
    for name, width in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        top = L.InnerProduct(top, num_output=width, weight_filler=dict(type="xavier"))
        setattr(n, name, top)
    n.prob = L.Softmax(top)
    param = n.to_proto()
    param.name = "VGG_ILSVRC_16_layers"
    return param


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/load_memory")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deploy, weights = work / "vgg16_deploy.prototxt", work / "vgg16.caffemodel"
    deploy.write_text(str(vgg16()))
    if not weights.exists():
        espresso.Net(str(deploy), espresso.TEST).save(str(weights))
    runs = [json.loads(subprocess.run([sys.executable, "-c", LOAD, str(deploy), str(weights)], check=True,
                                      capture_output=True, text=True).stdout) for _ in range(args.repeats)]
    weights = runs[0]["weights"]
    # what the net holds besides its weights (activations, im2col columns): held - weights
    over = [(r["peak"] - r["before"] - (r["held"] - r["before"] - weights)) / weights for r in runs]
    whole = [(r["peak"] - r["before"]) / weights for r in runs]
    print(f"VGG-16: {weights / 1e6:.0f} MB of weights; building the deploy net with them peaks at "
          f"{np.median(over):.3f}x the weights beyond the net's other buffers [{min(over):.3f}, {max(over):.3f}] "
          f"({np.median(whole):.2f}x with its {np.median([r['held'] - r['before'] - weights for r in runs]) / 1e6:.0f} "
          f"MB of activations and columns), {len(runs)} fresh processes")


if __name__ == "__main__":
    main()
