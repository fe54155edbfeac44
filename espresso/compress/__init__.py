"""Deep Compression (Han, Mao and Dally, ICLR 2016): pruning with retraining, trained
quantization, Huffman coding, a compressed model file and compressed inference.

    from espresso.compress import compress
    report = compress("net.prototxt", "w.caffemodel", "solver.prototxt", prune={"*": 0.9},
                      bits={"*": 5}, output="w.espz")
    net = espresso.Net("net.prototxt", "w.espz", espresso.TEST)   # runs sparse/shared

See docs/compression.md for the stages, the file format and the measured results.
"""

from espresso.compress.model_file import CompressedWeights, is_compressed, read_model, write_model
from espresso.compress.prune import Masks, prune_mask
from espresso.compress.quantize import SharedWeights, kmeans_share
from espresso.compress.runtime import CompressedLayer, load_compressed

__all__ = ["CompressedLayer", "CompressedWeights", "Masks", "SharedWeights", "is_compressed", "kmeans_share",
           "load_compressed", "prune_mask", "read_model", "write_model"]
