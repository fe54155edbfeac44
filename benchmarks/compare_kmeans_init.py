"""The paper's comparison of k-means initialisations (its Figure 4/5): quantize the same pruned
model with linear, density-based and random centroid initialisation and report the test
accuracy right after quantization and after fine-tuning the centroids.

    python benchmarks/compare_kmeans_init.py PRUNED.espz|.caffemodel --model M.prototxt --solver S.prototxt \\
        [--bits 4] [--iters 1000] [--json out.json]

PRUNED is a model pruned before (e.g. `espresso compress --prune ...` without --bits): its
zeros stay pruned (code 0), and k-means runs over the surviving weights.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from espresso.compress import compress


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights")
    parser.add_argument("--model", required=True)
    parser.add_argument("--solver", required=True)
    parser.add_argument("--bits", default="4")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--centroid-grad", default="sum", choices=["sum", "mean"])
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("linear", "density", "random"):
            r = compress(args.model, args.weights, args.solver, bits=args.bits, output=Path(tmp) / f"{init}.espz",
                         init=init, quant_iters=args.iters, centroid_grad=args.centroid_grad)
            accuracy = r["accuracy"]
            rows[init] = {"quantized": accuracy["quantized"], "finetuned": accuracy.get("quantized_finetuned"),
                          "bytes": r["compressed_bytes"], "before": r["accuracy_before"]}
            print(f"{init:8s} before {rows[init]['before']:.4f}  quantized {rows[init]['quantized']:.4f}  "
                  f"fine-tuned {rows[init]['finetuned']:.4f}  {rows[init]['bytes']} bytes", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "inits": rows}, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
