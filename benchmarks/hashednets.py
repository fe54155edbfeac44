"""HashedNets against a dense net of the same size in bytes (Chen et al. 2015, their Table 1
setting on our data): a 3-layer net, 784 -> 1000 -> 10, whose two layers are HashedInnerProduct
with 1/8 and 1/64 of the weights as real ones, against a dense 784 -> h -> 10 net whose h gives
the same number of parameters.  Each trains the same iterations with the same solver on
Fashion-MNIST (the full set when installed, else the embedded subset) and is scored on the test
set.

    python benchmarks/hashednets.py [--iterations 4000] [--out benchmarks/results/hashednets.txt]
"""

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np

import espresso
from espresso.data.fmnist import make_fmnist_lmdbs
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

HIDDEN, INPUTS, CLASSES = 1000, 784, 10


def net(train_db, test_db, hidden, factor=None):
    """The 3-layer net; factor: HashedInnerProduct layers with 1/factor of the virtual weights."""
    def layer(name, bottom, outputs, inputs):
        kind = "HashedInnerProduct" if factor else "InnerProduct"
        buckets = math.ceil(outputs * inputs / factor) if factor else 0
        hashed = f"hashed_param {{ buckets: {buckets} seed: {name[-1]} }}" if factor else ""
        return (f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{name}" {hashed} '
                f'inner_product_param {{ num_output: {outputs} weight_filler {{ type: "xavier" }} }} }}')

    data = "".join(f'layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: {phase} }} '
                   f'transform_param {{ scale: 0.00390625 }} data_param {{ source: "{db}" batch_size: {batch} '
                   f'backend: LMDB }} }}' for phase, db, batch in (("TRAIN", train_db, 64), ("TEST", test_db, 100)))
    return parse_text(data + layer("ip1", "data", hidden, INPUTS) + 'layer { name: "relu" type: "ReLU" '
                      'bottom: "ip1" top: "ip1" }' + layer("ip2", "ip1", CLASSES, hidden)
                      + 'layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" '
                      'include { phase: TEST } } layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" '
                      'bottom: "label" top: "loss" }', caffe_pb2.NetParameter())


def train(param, iterations, test_iter):
    solver = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="inv", gamma=1e-4,
                                       power=0.75, max_iter=iterations, display=0, test_iter=[test_iter],
                                       test_interval=iterations, snapshot_after_train=False, random_seed=1)
    solver.net_param.CopyFrom(param)
    s = espresso.SGDSolver(solver)
    s.step(iterations)
    scores = s.test(0)
    params = sum(b.count for blobs in s.net.params.values() for b in blobs)
    return float(np.mean(scores["acc"])), params


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--out", default="benchmarks/results/hashednets.txt")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hashednets_"))
    train_db, test_db, source = make_fmnist_lmdbs(work)
    test_iter = 100  # 10,000 test images in batches of 100 (the subset's test set is smaller: it wraps)
    lines = [f"# HashedNets on {source.description}: 784-1000-10, {args.iterations} iterations of batch 64",
             "| net | parameters | test accuracy |", "|---|---|---|"]
    virtual = HIDDEN * (INPUTS + CLASSES)
    for factor in (8, 64):
        hashed_accuracy, hashed_params = train(net(train_db, test_db, HIDDEN, factor), args.iterations, test_iter)
        budget = hashed_params
        hidden = max(1, round((budget - CLASSES) / (INPUTS + 1 + CLASSES)))  # 784h + h + 10h + 10 parameters
        dense_accuracy, dense_params = train(net(train_db, test_db, hidden), args.iterations, test_iter)
        lines += [f"| HashedNet 784-1000-10, 1/{factor} of {virtual} weights | {hashed_params} | "
                  f"{hashed_accuracy:.4f} |",
                  f"| dense 784-{hidden}-10, the same size | {dense_params} | {dense_accuracy:.4f} |"]
        print("\n".join(lines[-2:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
