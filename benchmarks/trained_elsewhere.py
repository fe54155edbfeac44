"""A LeNet trained elsewhere, end to end: trained in PyTorch (the peer, CPU), exported to ONNX,
imported into Espresso (its test accuracy must be PyTorch's), fine-tuned with an Espresso solver,
Deep-Compressed, run compressed, and sent out again to ONNX (scored in ONNX Runtime) and Core ML.

    python benchmarks/trained_elsewhere.py [--work /tmp/elsewhere] [--epochs 2] [--out benchmarks/results]

Fashion-MNIST: the full set where installed (Debian's dataset-fashion-mnist), else the embedded
subset.  Every step is one of Espresso's CLI verbs where there is one; the results go to
<out>/trained_elsewhere.txt.
"""

import argparse
import contextlib
import io
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import espresso
from espresso import cli
from espresso.data.fmnist import fashion_mnist_dir, idx_files
from espresso.data.idx import read_idx
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_text, to_text

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.00390625  # Caffe's LeNet input scale (bytes to [0, 1)), used by both frameworks
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def arrays(source, split):
    files = idx_files(source)
    images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
    return images[:, None].astype(np.float32) * SCALE, labels.astype(np.int64)


def train_in_pytorch(train, test, epochs, log):
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    start = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 63, 64):
            batch = order[i:i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
        log(f"PyTorch epoch {epoch + 1}: {time.time() - start:.0f} s")
    net.eval()
    with torch.no_grad():
        predicted = net(torch.from_numpy(test[0])).argmax(1).numpy()
    return net, predicted


def export_onnx(net, path):
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["data"], output_names=["score"],
                          dynamic_axes={"data": {0: "N"}, "score": {0: "N"}})


def espresso_predictions(net, images):
    out = []
    for i in range(0, len(images), 100):
        batch = images[i:i + 100]
        net.blobs["data"].reshape(*batch.shape)
        out.append(net.forward(data=batch)["score"].argmax(1))
    return np.concatenate(out)


def train_test_net(deploy, lmdbs, path):
    """The imported deploy net between Caffe's LeNet data layers and its loss and accuracy."""
    imported = read_text(deploy, caffe_pb2.NetParameter())
    net = parse_text(f"""name: "LeNet"
        layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
                 transform_param {{ scale: {SCALE} }}
                 data_param {{ source: "{lmdbs}/fmnist_train_lmdb" batch_size: 64 backend: LMDB }} }}
        layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
                 transform_param {{ scale: {SCALE} }}
                 data_param {{ source: "{lmdbs}/fmnist_test_lmdb" batch_size: 100 backend: LMDB }} }}""",
                     caffe_pb2.NetParameter())
    net.layer.extend(layer for layer in imported.layer if layer.type != "Input")
    net.layer.add().CopyFrom(parse_text('name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" '
                                        'top: "loss"', caffe_pb2.LayerParameter()))
    net.layer.add().CopyFrom(parse_text('name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" '
                                        'top: "accuracy" include { phase: TEST }', caffe_pb2.LayerParameter()))
    Path(path).write_text(to_text(net))


def solver(net, prefix, path, iterations, test_iter):
    Path(path).write_text(f'net: "{net}"\ntest_iter: {test_iter}\ntest_interval: {iterations}\nbase_lr: 0.001\n'
                          f'momentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\ndisplay: 0\n'
                          f'max_iter: {iterations}\nsnapshot: 0\nsnapshot_prefix: "{prefix}"\nrandom_seed: 1\n')


def score(model, weights, iterations):
    """`espresso test`'s accuracy (its log line, as a person reads it)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        import logging

        handler = logging.StreamHandler(err)
        logging.getLogger("espresso").addHandler(handler)
        try:
            assert cli.main(["test", "--model", model, "--weights", weights, "--iterations", str(iterations)]) == 0
        finally:
            logging.getLogger("espresso").removeHandler(handler)
    return float(re.findall(r"^accuracy = ([\d.]+)$", err.getvalue(), re.MULTILINE)[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/espresso-elsewhere", help="folder for the data and models")
    ap.add_argument("--epochs", type=int, default=2, help="PyTorch training epochs")
    ap.add_argument("--finetune", type=int, default=1000, help="Espresso fine-tuning iterations")
    ap.add_argument("--retrain", type=int, default=500, help="Deep Compression's retraining iterations per step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the results go")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    source = fashion_mnist_dir().path
    log(f"data: {fashion_mnist_dir().description}")
    train, test = arrays(source, "train"), arrays(source, "test")
    torch_net, torch_predicted = train_in_pytorch(train, test, args.epochs, log)
    torch_accuracy = float((torch_predicted == test[1]).mean())
    log(f"1. PyTorch LeNet, {args.epochs} epochs: test accuracy {torch_accuracy:.4f} ({len(test[1])} images)")
    export_onnx(torch_net, work / "lenet.onnx")
    started = time.time()
    assert cli.main(["convert", str(work / "lenet.onnx"), "-o", str(work / "deploy.prototxt"),
                     "--weights", str(work / "imported.caffemodel")]) == 0
    log(f"2. exported by PyTorch to ONNX, imported by espresso convert in {time.time() - started:.2f} s")
    net = espresso.Net(str(work / "deploy.prototxt"), espresso.TEST, weights=str(work / "imported.caffemodel"))
    predicted = espresso_predictions(net, test[0])
    log(f"3. Espresso on the imported net: test accuracy {(predicted == test[1]).mean():.4f}; "
        f"{int((predicted != torch_predicted).sum())} of {len(predicted)} predictions differ from PyTorch's")
    assert cli.main(["prepare-fmnist", str(work), "--source", str(source)]) == 0
    train_test_net(work / "deploy.prototxt", work, work / "train_test.prototxt")
    test_iter = len(test[1]) // 100
    solver(work / "train_test.prototxt", work / "finetuned", work / "solver.prototxt", args.finetune, test_iter)
    assert cli.main(["train", "--solver", str(work / "solver.prototxt"),
                     "--weights", str(work / "imported.caffemodel")]) == 0
    tuned = f"{work}/finetuned_iter_{args.finetune}.caffemodel"
    tuned_accuracy = score(str(work / "train_test.prototxt"), tuned, test_iter)
    log(f"4. fine-tuned {args.finetune} iterations with Espresso's SGD solver: test accuracy {tuned_accuracy:.4f}")
    assert cli.main(["compress", "--model", str(work / "train_test.prototxt"), "--weights", tuned,
                     "--solver", str(work / "solver.prototxt"), "-o", str(work / "lenet.espz"),
                     "--retrain-iters", str(args.retrain), "--quant-iters", str(args.retrain)]) == 0
    original, compressed = os.path.getsize(tuned), os.path.getsize(work / "lenet.espz")
    compressed_accuracy = score(str(work / "train_test.prototxt"), str(work / "lenet.espz"), test_iter)
    log(f"5. Deep-Compressed (the paper's recipe): {original} -> {compressed} bytes ({original / compressed:.1f}x); "
        f"run compressed: test accuracy {compressed_accuracy:.4f}")
    assert cli.main(["convert", str(work / "deploy.prototxt"), "--weights", str(work / "lenet.espz"),
                     "--onnx", str(work / "compressed.onnx")]) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(str(work / "compressed.onnx"), providers=["CPUExecutionProvider"])
    runtime = session.run(None, {"data": test[0]})[0].argmax(1)
    log(f"6. the compressed model exported to ONNX: ONNX Runtime test accuracy {(runtime == test[1]).mean():.4f}")
    package = work / "lenet.mlpackage"
    labels = work / "labels.txt"
    labels.write_text("".join(f"{name}\n" for name in CLASSES))
    assert cli.main(["convert", str(work / "deploy.prototxt"), "--weights", str(work / "lenet.espz"), "--coreml",
                     str(package), "--image-scale", str(SCALE), "--labels", str(labels)]) == 0
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    log(f"7. and to Core ML: {package.name}, an image classifier of {len(CLASSES)} labels, {size} bytes "
        f"(numbers to be checked on a Mac: tools/check_coreml_on_mac.py)")
    out = Path(args.out) / "trained_elsewhere.txt"
    out.write_text(f"# python {' '.join(sys.argv)}\n# espresso {espresso.__version__}\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
