"""Write the embedded Fashion-MNIST subset (espresso/datasets/fmnist_subset/) from the full set.

A stratified, seeded choice: 500 training images per class (5000) and 100 test images per class
(1000), kept in their original order, written as gzip IDX files with the original names.

    python tools/make_fmnist_subset.py [--source /usr/share/datasets/fashion-mnist] [--out DIR]
"""

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from espresso.data.fmnist import EMBEDDED_DIR, STEMS, idx_files  # noqa: E402
from espresso.data.idx import read_mnist, write_idx  # noqa: E402

SEED = 20170825  # Fashion-MNIST's release date
PER_CLASS = {"train": 500, "test": 100}

README = """# Embedded Fashion-MNIST subset

A small, stratified subset of Fashion-MNIST, so that Espresso's LeNet example runs with no
download. Espresso uses the full data set instead when it can find it (see
`espresso.data.fashion_mnist_dir`: an explicit directory, `$ESPRESSO_DATA`, or
`/usr/share/datasets/fashion-mnist`).

- Source: Fashion-MNIST by Zalando Research (https://github.com/zalandoresearch/fashion-mnist),
  MIT license, Copyright (c) 2017 Zalando SE; read from Debian's `dataset-fashion-mnist`
  package ({source}).
- Selection: for each of the 10 classes, {train} training images ({train_total} in all) and
  {test} test images ({test_total} in all), drawn without replacement with NumPy's
  `default_rng({seed})` (one `choice` per split and class, classes in order 0..9, training split
  first), then kept in their original order.
- Format: the original IDX file names, gzip-compressed (mtime 0, so the bytes are reproducible).
- Regenerate: `python tools/make_fmnist_subset.py --source {source}`

| file | sha256 |
| --- | --- |
{hashes}

## License of the data (MIT)

The MIT License (MIT) Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def choose(labels, per_class, rng):
    """Indices of `per_class` items of each class, in original order."""
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picked))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(EMBEDDED_DIR))
    args = parser.parse_args()
    files = idx_files(args.source)
    if files is None:
        raise SystemExit(f"{args.source}: Fashion-MNIST files not found (apt install dataset-fashion-mnist)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for split, per_class in PER_CLASS.items():
        images, labels = read_mnist(files[f"{split}_images"], files[f"{split}_labels"])
        keep = choose(labels, per_class, rng)
        write_idx(out / f"{STEMS[split + '_images']}.gz", images[keep])
        write_idx(out / f"{STEMS[split + '_labels']}.gz", labels[keep])
        print(f"{split}: {len(keep)} of {len(labels)} images")
    hashes = "\n".join(f"| {p.name} | {hashlib.sha256(p.read_bytes()).hexdigest()} |"
                       for p in sorted(out.glob("*.gz")))
    (out / "README.md").write_text(README.format(
        source=args.source, seed=SEED, hashes=hashes, train=PER_CLASS["train"], test=PER_CLASS["test"],
        train_total=10 * PER_CLASS["train"], test_total=10 * PER_CLASS["test"]))


if __name__ == "__main__":
    main()
