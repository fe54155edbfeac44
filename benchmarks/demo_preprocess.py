"""How much of LeNet's Fashion-MNIST accuracy survives a photo, with and without the demo's
preprocessing (espresso/demo/preprocess.py).

Each Fashion-MNIST test image is re-rendered as a photo of a garment on a light table: negated
(dark garment on light), scaled up to 80-200 px, placed at a random spot of a 160-320 px colour
canvas whose background is lit unevenly (a gradient and low-frequency noise, a light tint), given
Gaussian grain (sigma 2-8), blurred (radius 0.3-1.5) and JPEG-compressed (quality 30-90); every
choice drawn from --seed and the image's index.  LeNet then classifies the
originals, the photos through plain_input (grey, squashed to 28x28) and the photos through
to_input.  The LeNet is --weights (with --model, default examples/lenet/lenet_deploy.prototxt), or
one trained here first with the project's CLI (`espresso prepare-fmnist`, `espresso train` on the
example's solver cut to --train-iters iterations).

    python benchmarks/demo_preprocess.py                     # trains a LeNet (about a minute)
    python benchmarks/demo_preprocess.py --weights benchmarks/results/real_caffe/lenet_iter_10000.caffemodel
"""

import argparse
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import espresso as caffe
from espresso.data.fmnist import fashion_mnist_dir, idx_files
from espresso.data.idx import read_idx
from espresso.demo.preprocess import plain_input, to_input

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "examples" / "lenet"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# *** the photos ***
def render_photo(item, rng):
    """A colour JPEG-decoded photo (HxWx3 uint8) of the 28x28 Fashion-MNIST `item`: dark on a light table."""
    height, width = rng.integers(160, 321, size=2)
    side = min(int(rng.integers(80, 201)), min(height, width) - 8)
    cover = np.asarray(Image.fromarray(item).resize((side, side), Image.BICUBIC), np.float32)[..., None] / 255
    cover = np.clip(cover, 0, 1)  # bicubic overshoots at edges
    photo = _table(height, width, rng)
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    spot = photo[top:top + side, left:left + side]
    spot[...] = spot * (1 - cover) + rng.uniform(0, 100, 3) * cover  # the garment's own colour
    photo += rng.normal(0, rng.uniform(2, 8), photo.shape)
    blurred = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    jpeg = io.BytesIO()
    blurred.save(jpeg, "JPEG", quality=int(rng.integers(30, 91)))
    return np.asarray(Image.open(jpeg).convert("RGB"))


def _table(height, width, rng):
    """(height, width, 3) float32 light background: a base grey, a linear gradient in a random
    direction, low-frequency noise (a 5x5 grid upsampled), a light colour tint."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (x / width - 0.5) + np.sin(angle) * (y / height - 0.5)
    blobs = Image.fromarray(rng.normal(0, 1, (5, 5)).astype(np.float32)).resize((width, height), Image.BICUBIC)
    grey = rng.uniform(170, 235) + rng.uniform(0, 50) * ramp + rng.uniform(3, 12) * np.asarray(blobs)
    tint = 1 - rng.uniform(0, 0.15, 3)
    return (grey[..., None] * tint).astype(np.float32)


# *** the model ***
def train_lenet(work, iterations):
    """Train the LeNet example for `iterations` with the CLI in `work`; the .caffemodel's path."""
    cli = [sys.executable, "-m", "espresso.cli"]
    subprocess.run([*cli, "prepare-fmnist", str(work)], check=True, cwd=ROOT)
    net = (LENET / "lenet_train_test.prototxt").read_text().replace("examples/lenet/", f"{work}/")
    (work / "train_test.prototxt").write_text(net)
    solver = (LENET / "lenet_solver.prototxt").read_text()
    settings = {"net": f'"{work}/train_test.prototxt"', "max_iter": iterations, "snapshot": iterations,
                "test_interval": iterations, "snapshot_prefix": f'"{work}/lenet"'}
    for key, value in settings.items():
        solver = re.sub(rf"^{key}: .*$", f"{key}: {value}", solver, flags=re.M)
    (work / "solver.prototxt").write_text(solver + "random_seed: 1701\n")  # the same LeNet on every run
    subprocess.run([*cli, "train", "--solver", str(work / "solver.prototxt")], check=True, cwd=ROOT)
    return work / f"lenet_iter_{iterations}.caffemodel"


def classify(net, inputs, batch=100):
    """Predicted classes of (N, 1, 28, 28) float32 inputs."""
    predictions = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        net.blobs["data"].reshape(*chunk.shape)
        predictions.append(net.forward(data=chunk)["prob"].argmax(axis=1))
    return np.concatenate(predictions)


# *** the measurement ***
def timed(function, photos):
    """(inputs stacked, per-photo milliseconds) of `function` over `photos`."""
    inputs, ms = [], []
    for photo in photos:
        start = time.perf_counter()
        inputs.append(function(photo))
        ms.append(1000 * (time.perf_counter() - start))
    return np.stack(inputs), np.array(ms)


def phone_photo_ms(photo, repeats=20):
    """Median milliseconds of to_input on `photo` enlarged to a 12 MP (4000x3000) phone photo."""
    big = np.asarray(Image.fromarray(photo).resize((4000, 3000), Image.BILINEAR))
    to_input(big)
    ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        to_input(big)
        ms.append(1000 * (time.perf_counter() - start))
    return float(np.median(ms))


def save_samples(path, items, plain, prepared, count=12):
    """A PNG: for the first `count` items, a row of original | photo through plain_input | through to_input."""
    rows = [np.hstack([item, *((x[0] * 256).astype(np.uint8) for x in inputs)])
            for item, *inputs in zip(items[:count], plain, prepared)]
    Image.fromarray(np.vstack(rows)).resize((3 * 28 * 4, len(rows) * 28 * 4), Image.NEAREST).save(path)


def report(args, source, weights, labels, predictions, times, phone_ms):
    lines = [f"command: python {' '.join(sys.argv)}", f"data: {source.description}, first {len(labels)} test images",
             f"model: {weights}", f"photos: seed {args.seed}", "",
             "input                   accuracy   preprocessing ms/image (median, 95th pct.)"]
    for name, predicted in predictions.items():
        accuracy = np.mean(predicted == labels)
        ms = f"{np.median(times[name]):6.2f}  {np.percentile(times[name], 95):6.2f}" if name in times else ""
        lines.append(f"{name:22s}  {accuracy:8.4f}   {ms}".rstrip())
    lines += ["", f"to_input on a 12 MP (4000x3000) photo: {phone_ms:.1f} ms (median of 20)", "",
              "per class: original / plain_input / to_input"]
    for c, name in enumerate(CLASSES):
        hits = [np.mean(p[labels == c] == c) for p in predictions.values()]
        lines.append(f"  {name:12s} " + " / ".join(f"{h:.3f}" for h in hits))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(LENET / "lenet_deploy.prototxt"), help="deploy prototxt (output 'prob')")
    parser.add_argument("--weights", help=".caffemodel; default: train one first")
    parser.add_argument("--train-iters", type=int, default=2000, help="iterations when training (default 2000)")
    parser.add_argument("--count", type=int, default=10000, help="test images used (default 10000, all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_preprocess.txt"))
    parser.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    parser.add_argument("--samples", help="also write a PNG of the first images at each stage")
    args = parser.parse_args()

    source = fashion_mnist_dir()
    files = idx_files(source.path)
    items, labels = read_idx(files["test_images"])[:args.count], read_idx(files["test_labels"])[:args.count]
    with tempfile.TemporaryDirectory() as work:
        weights = args.weights or train_lenet(Path(work), args.train_iters)
        net = caffe.Net(args.model, str(weights), caffe.TEST)
    photos = [render_photo(item, np.random.default_rng([args.seed, i])) for i, item in enumerate(items)]
    plain, plain_ms = timed(plain_input, photos)
    prepared, prepared_ms = timed(to_input, photos)
    predictions = {"original": classify(net, items[:, None].astype(np.float32) / 256),
                   "photo, plain_input": classify(net, plain), "photo, to_input": classify(net, prepared)}
    if args.samples:
        save_samples(args.samples, items, plain, prepared)
    trained = f"trained here, {args.train_iters} iterations of examples/lenet/lenet_solver.prototxt, random_seed 1701"
    text = report(args, source, args.weights or trained, labels, predictions,
                  {"photo, plain_input": plain_ms, "photo, to_input": prepared_ms}, phone_photo_ms(photos[0]))
    with open(args.out, "a" if args.append else "w") as out:
        out.write("\n" + text if args.append else text)
    print(text, end="")


if __name__ == "__main__":
    main()
