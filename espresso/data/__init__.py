"""Datasets for the data layers: IDX files, LMDB Datum databases, images, the data transformer,
background prefetching, Caffe's converter tools and the embedded Fashion-MNIST subset.

Optional packages are imported only when used: `lmdb` and `plyvel` (LevelDB) (Data layer,
converters), `h5py`
(HDF5Data/HDF5Output) and Pillow (images, encoded Datums).  A missing one raises an
EspressoError that names the pip extra to install.
"""

import importlib

from espresso.errors import EspressoError, ModelFileError


class DatasetError(ModelFileError):
    """A dataset (IDX file, LMDB, HDF5 file, image list) is missing, of the wrong kind or corrupt."""


# module -> (pip package, espresso extra)
_EXTRAS = {"lmdb": ("lmdb", "data"), "plyvel": ("plyvel", "leveldb"), "h5py": ("h5py", "hdf5"),
           "PIL": ("pillow", "image")}


def require(module, what):
    """Import an optional dependency, or say which pip extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = _EXTRAS[module.split(".")[0]]
        raise EspressoError(f"{what} needs the '{package}' package: pip install {package} "
                            f"(or pip install 'espresso-nn[{extra}]')") from None


from espresso.data.fmnist import fashion_mnist_dir  # noqa: E402  (after DatasetError, which it uses)

__all__ = ["DatasetError", "fashion_mnist_dir", "require"]
