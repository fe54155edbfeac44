"""How long `espresso demo` takes to learn a class: the shipped model (or --model ...) on the CPU with
one BLAS thread, as the server runs it, taught "stripes" from 10 photo-like PNGs (demo_load.py's)
through the server's decoding and preprocessing, --rounds times with a reset in between.  The
first teaching also computes the features of the replayed and held-out Fashion-MNIST images
(once per loaded model).  Target: <= 3 s for 10 examples on 2 cores.

    python benchmarks/demo_teach.py [--rounds 5] [--model M --weights W --labels L] [--out benchmarks/results]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from demo_latency import ROOT, machine
from demo_load import stripes_png

import espresso
from espresso.demo.app import decode_image
from espresso.demo.classifier import Classifier
from espresso.demo.preprocess import to_input


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model")
    ap.add_argument("--weights")
    ap.add_argument("--labels")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    before = machine()
    espresso.set_num_threads(1)
    start = time.perf_counter()
    classifier = Classifier(args.model, args.weights, args.labels)
    load = time.perf_counter() - start
    rng = np.random.default_rng(0)
    examples = [to_input(decode_image(stripes_png(rng))) for _ in range(10)]
    rows = []
    for i in range(args.rounds):
        start = time.perf_counter()
        result = classifier.teach("stripes", examples)
        seconds = time.perf_counter() - start
        fresh = [to_input(decode_image(stripes_png(rng))) for _ in range(20)]
        recognized = np.mean([classifier.classify(x)["top"][0]["label"] == "stripes" for x in fresh])
        accuracy = result["accuracy"]
        rows.append(f"{i + 1:>5} {seconds:9.3f} {accuracy['old_before']:10.3f} {accuracy['old_after']:9.3f} "
                    f"{accuracy['new']:9.2f} {recognized:12.2f} {result['loss']:8.4f}")
        classifier.reset()
    report = "\n".join([f"# python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}",
                        f"model: {args.model or 'the shipped Deep-Compressed LeNet'}, loaded in {load:.2f} s; "
                        f"10 examples, {result['iterations']} iterations, 1 BLAS thread",
                        f"before: {before}", f"after:  {machine()}",
                        "round   teach s  old before  old after  examples  20 new ones  loss",
                        *rows]) + "\n"
    print(report, end="")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_teach.txt").write_text(report)


if __name__ == "__main__":
    main()
