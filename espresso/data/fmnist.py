"""Where Fashion-MNIST comes from, and turning it into the LMDBs the LeNet example reads.

Fashion-MNIST (Zalando Research, MIT license) ships in the MNIST IDX format.  Espresso embeds
a stratified subset (5000 train / 1000 test images; see datasets/fmnist_subset/README.md) so
that the example runs anywhere; the full set is used when it can be found.
"""

import os
import shutil
from pathlib import Path
from typing import NamedTuple

from espresso.data import DatasetError

STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "datasets" / "fmnist_subset"


class DataSource(NamedTuple):
    path: Path
    description: str


def idx_files(directory):
    """{train_images, train_labels, test_images, test_labels: path} in `directory` (each file plain
    or .gz), or None if one is missing."""
    found = {}
    for name, stem in STEMS.items():
        paths = [Path(directory) / (stem + ext) for ext in ("", ".gz")]
        existing = [p for p in paths if p.is_file()]
        if not existing:
            return None
        found[name] = existing[0]
    return found


def fashion_mnist_dir(explicit=None):
    """DataSource(directory, description) of the Fashion-MNIST files to use, preferring: `explicit`,
    then $ESPRESSO_DATA (the directory itself or its fashion-mnist/ subdirectory), then the system
    copy at /usr/share/datasets/fashion-mnist, then the embedded subset.  A directory the user
    named that lacks the files is an error, never silently replaced."""
    wanted = ", ".join(f"{s}[.gz]" for s in STEMS.values())
    if explicit is not None:
        if idx_files(explicit) is None:
            raise DatasetError(f"{explicit}: no Fashion-MNIST files there (expected {wanted})")
        return DataSource(Path(explicit), f"Fashion-MNIST in {explicit} (given)")
    env = os.environ.get("ESPRESSO_DATA")
    if env:
        for candidate in (Path(env), Path(env) / "fashion-mnist"):
            if idx_files(candidate) is not None:
                return DataSource(candidate, f"Fashion-MNIST in {candidate} (from $ESPRESSO_DATA)")
        raise DatasetError(f"$ESPRESSO_DATA={env}: no Fashion-MNIST files in it or in its fashion-mnist/ "
                           f"subdirectory (expected {wanted})")
    if idx_files(SYSTEM_DIR) is not None:
        return DataSource(SYSTEM_DIR, f"the full Fashion-MNIST in {SYSTEM_DIR}")
    return DataSource(EMBEDDED_DIR, f"the embedded Fashion-MNIST subset, 5000 train / 1000 test, in {EMBEDDED_DIR}")


def make_fmnist_lmdbs(out_dir, source=None, overwrite=False, progress=None):
    """Convert Fashion-MNIST (from fashion_mnist_dir(source)) into out_dir/fmnist_train_lmdb and
    out_dir/fmnist_test_lmdb, the sources of the LeNet example.  Returns (train, test, DataSource)."""
    from espresso.data.convert import convert_mnist

    where = fashion_mnist_dir(source)
    files = idx_files(where.path)
    os.makedirs(out_dir, exist_ok=True)
    dbs = []
    for split in ("train", "test"):
        db = Path(out_dir) / f"fmnist_{split}_lmdb"
        if overwrite and db.exists():
            shutil.rmtree(db)
        convert_mnist(files[f"{split}_images"], files[f"{split}_labels"], db, progress)
        dbs.append(db)
    return dbs[0], dbs[1], where
