"""Stage 2 of Deep Compression: trained quantization (weight sharing).

A layer of `bits` bits has a codebook of 2**bits values; entry 0 is fixed at 0.0 (pruned
weights and the filler zeros of the sparse format), the other 2**bits - 1 are centroids of a
1-D k-means over the layer's surviving weights, initialised linearly over [min, max] (the
paper's choice), by density (quantiles of the weights) or at random weights.

`SharedWeights.attach(solver)` fine-tunes the centroids with the solver's own update rule:
before the update every surviving weight's gradient is replaced by its cluster's gradient,
so the members of a cluster receive identical updates (weight decay and momentum included, as
they start equal) and move together, exactly as the shared centroid would; after the update
the codebook is read back and the weights are snapped to it.  The cluster's gradient is the
paper's dL/dC_k = sum of dL/dW over the weights whose index is k; by default ("mean") its
learning rate is divided by the cluster's size, since the plain sum ("sum") takes steps that
grow with the cluster: fine-tuning unpruned 4-bit LeNet-300-100 with the LeNet solver fell
to 10% accuracy with it, and reached 84.6% with the scaled rate (embedded subset).
"""

import numpy as np

from espresso.compress.prune import arena_offset
from espresso.errors import EspressoError

INITS = ("linear", "density", "random")


def kmeans_share(weights, bits, init="linear", mask=None, seed=0, iterations=100):
    """(codebook float32 (2**bits,), index uint8 of the weights' shape): index 0 = 0.0 where
    `mask` is False; the kept weights go to their nearest of 2**bits - 1 k-means centroids."""
    if not 1 <= bits <= 8:
        raise EspressoError(f"quantize: bits must be in 1..8, got {bits}")
    if init not in INITS:
        raise EspressoError(f"quantize: unknown init '{init}' (known: {', '.join(INITS)})")
    w = np.asarray(weights, np.float64)
    keep = np.ones(w.shape, bool) if mask is None else np.asarray(mask, bool)
    values = w[keep]
    k = (1 << bits) - 1
    index = np.zeros(w.shape, np.uint8)
    codebook = np.zeros(k + 1, np.float32)
    if values.size == 0 or k == 0:
        return codebook, index
    centroids = np.sort(_initial(values, k, init, seed))
    for _ in range(iterations):
        assign = _nearest(values, centroids)
        sums = np.bincount(assign, values, minlength=k)
        counts = np.bincount(assign, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)  # empty: unchanged
        order = np.argsort(updated, kind="stable")
        done = np.array_equal(updated, centroids)
        centroids = updated[order]
        if done:
            break
    codebook[1:] = centroids
    index[keep] = 1 + _nearest(values, centroids.astype(np.float32).astype(np.float64))
    return codebook, index


def _initial(values, k, init, seed):
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    rng = np.random.default_rng(seed)
    return rng.choice(values, size=k, replace=values.size < k)


def _nearest(values, sorted_centroids):
    """Index of the nearest centroid (ties to the lower one) for each value."""
    mid = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return np.searchsorted(mid, values, side="left")


class SharedWeights:
    """Quantized layers of a net whose centroids a solver fine-tunes (module docstring)."""

    def __init__(self, net, gradient="mean"):
        if gradient not in ("sum", "mean"):
            raise EspressoError(f"quantize: centroid gradient must be 'sum' or 'mean', got '{gradient}'")
        self.net, self.xp, self.mean = net, net.backend.xp, gradient == "mean"
        self.layers = {}  # name -> [offset, count, kept flat positions (device), index (device), codebook]

    def set(self, name, codebook, index):
        """Make layer `name` use `codebook[index]` (index of the weights' shape) as its weights."""
        blob = self.net.layer_dict[name].blobs[0]
        index = np.asarray(index).reshape(-1)
        positions = np.flatnonzero(index)
        to_device = self.net.backend.to_device
        entry = [arena_offset(self.net, blob), blob.count, to_device(positions),
                 to_device(index[positions].astype(np.int64)), np.asarray(codebook, np.float32).copy()]
        self.layers[name] = entry
        self._snap(entry)

    def _snap(self, entry):
        offset, count, positions, index, codebook = entry
        w = self.net.arena_data[offset:offset + count]
        cb = self.net.backend.to_device(codebook, self.net.dtype)
        w[...] = 0
        w[positions] = cb[index]

    def attach(self, solver):
        """Fine-tune the centroids through `solver`; its history is cleared for the quantized
        weights, so that the members of a cluster start (and stay) in step."""
        if solver.net is not self.net:
            raise EspressoError("SharedWeights.attach: the codebooks were made for another net")
        for offset, count, *_ in self.layers.values():
            for history in solver.updater.rule.history:
                history[offset:offset + count] = 0
        solver.add_callback(lambda: None, self.cluster_gradients)
        solver.after_update.append(self.read_codebooks)

    def cluster_gradients(self):
        """Each kept weight's gradient := the sum over its cluster; pruned weights get none."""
        xp = self.xp
        for offset, count, positions, index, codebook in self.layers.values():
            g = self.net.arena_diff[offset:offset + count]
            sums = xp.bincount(index, weights=g[positions], minlength=len(codebook)).astype(g.dtype)
            if self.mean:
                sums /= xp.maximum(xp.bincount(index, minlength=len(codebook)), 1).astype(g.dtype)
            g[...] = 0
            g[positions] = sums[index]

    def read_codebooks(self):
        """After an update: the codebook is the (common) value of each cluster's members."""
        for entry in self.layers.values():
            offset, count, positions, index, codebook = entry
            w = self.net.arena_data[offset:offset + count]
            host = np.asarray(self.net.backend.to_host(w[positions]), np.float32)
            index_host = np.asarray(self.net.backend.to_host(index))
            codebook[index_host] = host  # members are equal; the last write wins
            codebook[0] = 0.0
            self._snap(entry)

    def codebook(self, name):
        return self.layers[name][4]

    def index(self, name):
        """The layer's index array (host, uint8, weight shape)."""
        offset, count, positions, index, _ = self.layers[name]
        out = np.zeros(count, np.uint8)
        out[np.asarray(self.net.backend.to_host(positions))] = np.asarray(self.net.backend.to_host(index))
        return out.reshape(self.net.layer_dict[name].blobs[0].shape)
