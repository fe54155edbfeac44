"""Make the model `espresso demo` ships: Caffe's LeNet trained on the full Fashion-MNIST with
Caffe's solver (10,000 iterations, a fixed seed), Deep-Compressed with the paper's recipe, into
espresso/demo/model/ (lenet_fmnist.prototxt, lenet_fmnist.espz, labels.txt).

    python tools/make_demo_model.py [--work /tmp/espresso-demo-model]

Needs the full Fashion-MNIST (Debian's dataset-fashion-mnist); the accuracies go to
benchmarks/results/demo_model.txt.
"""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import espresso
from espresso import cli
from espresso.data.fmnist import SYSTEM_DIR, fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "espresso" / "demo" / "model"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def accuracy(model, weights):
    net = espresso.Net(str(model), espresso.TEST, weights=str(weights))
    scores = [float(net.forward()["accuracy"]) for _ in range(100)]  # 100 batches of 100: the test set
    return sum(scores) / len(scores)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/espresso-demo-model")
    args = ap.parse_args()
    if fashion_mnist_dir().path != SYSTEM_DIR:
        sys.exit(f"the full Fashion-MNIST is needed in {SYSTEM_DIR} (apt install dataset-fashion-mnist)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    assert cli.main(["prepare-fmnist", str(work)]) == 0
    net = (ROOT / "examples/lenet/lenet_train_test.prototxt").read_text().replace("examples/lenet/", f"{work}/")
    (work / "train_test.prototxt").write_text(net)
    solver = (ROOT / "examples/lenet/lenet_solver.prototxt").read_text()
    solver = re.sub(r"net: .*", f'net: "{work}/train_test.prototxt"', solver)
    solver = re.sub(r"snapshot_prefix: .*", f'snapshot_prefix: "{work}/lenet"', solver) + "random_seed: 1701\n"
    (work / "solver.prototxt").write_text(solver)
    assert cli.main(["train", "--solver", str(work / "solver.prototxt")]) == 0
    dense = work / "lenet_iter_10000.caffemodel"
    OUT.mkdir(parents=True, exist_ok=True)
    assert cli.main(["compress", "--model", str(work / "train_test.prototxt"), "--weights", str(dense),
                     "--solver", str(work / "solver.prototxt"), "-o", str(OUT / "lenet_fmnist.espz")]) == 0
    shutil.copy(ROOT / "examples/lenet/lenet_deploy.prototxt", OUT / "lenet_fmnist.prototxt")
    (OUT / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    dense_accuracy = accuracy(work / "train_test.prototxt", dense)
    compressed_accuracy = accuracy(work / "train_test.prototxt", OUT / "lenet_fmnist.espz")
    sizes = os.path.getsize(dense), os.path.getsize(OUT / "lenet_fmnist.espz")
    report = (f"# python {' '.join(sys.argv)}\n"
              f"dense LeNet, 10,000 iterations: test accuracy {dense_accuracy:.4f}, {sizes[0]} bytes\n"
              f"Deep-Compressed (shipped): test accuracy {compressed_accuracy:.4f}, {sizes[1]} bytes "
              f"({sizes[0] / sizes[1]:.1f}x)\n")
    (ROOT / "benchmarks" / "results" / "demo_model.txt").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
