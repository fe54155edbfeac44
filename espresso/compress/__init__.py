"""Deep Compression (Han, Mao and Dally, ICLR 2016): pruning with retraining, trained
quantization, Huffman coding, a compressed model file and compressed inference.

    from espresso.compress import compress
    report = compress("net.prototxt", "w.caffemodel", "solver.prototxt", prune={"*": 0.9},
                      bits={"*": 5}, output="w.espz")
    net = espresso.Net("net.prototxt", "w.espz", espresso.TEST)   # runs sparse/shared

See docs/compression.md for the stages, the file format and the measured results.
"""

from espresso.compress.model_file import MAGIC, CompressedWeights, is_compressed, read_model, write_model
from espresso.compress.prune import Masks, prune_mask
from espresso.compress.quantize import SharedWeights, kmeans_share
from espresso.net.files import register_format

__all__ = ["CompressedLayer", "CompressedWeights", "Masks", "SharedWeights", "compress", "is_compressed",
           "kmeans_share", "load_compressed", "prune_mask", "read_model", "write_model"]


def _load_compressed(net, path):
    from espresso.compress.runtime import load_compressed

    load_compressed(net, path)


register_format(MAGIC, _load_compressed)  # Net.copy_from reads compressed models: Net(proto, "w.espz", TEST)


def __getattr__(name):
    """The runtime (Numba kernels, layers) and the pipeline (solvers) load on first use, so that
    `import espresso` (which imports this package, registering its model files) stays light."""
    if name in ("CompressedLayer", "load_compressed"):
        from espresso.compress import runtime

        return getattr(runtime, name)
    if name == "compress":
        from espresso.compress.pipeline import compress

        return compress
    raise AttributeError(f"module 'espresso.compress' has no attribute '{name}'")
