"""Stage 1 of Deep Compression: magnitude pruning, and masks that keep pruned weights at zero
while the solver retrains the net.

A layer's threshold is either `quality * std(w)` (Han et al.: the quality parameter times the
standard deviation of the layer's surviving weights) or the magnitude that prunes a target
fraction of its weights.  Masks never grow back: each pruning step ANDs with the previous mask.

`Masks.attach(solver)` keeps pruned weights dead through any update rule without touching the
solver: before the update it zeroes their gradients (so gradient clipping sees the pruned net),
and after the update it zeroes their weights and every history set of the rule (momentum,
AdaGrad/RMSProp/Adam accumulators), so neither momentum nor weight decay can revive them.
"""

import numpy as np

from espresso.backend import address
from espresso.errors import EspressoError

COMPRESSIBLE = ("InnerProduct", "Convolution")


def compressible_layers(net):
    """{layer name: layer} of the layers whose first blob (the weights) can be compressed."""
    return {name: layer for name, layer in net.layer_dict.items() if layer.type in COMPRESSIBLE and layer.blobs}


def prune_mask(weights, sparsity=None, quality=None, mask=None):
    """Boolean mask of the weights to keep: prune `sparsity` of all weights (the smallest
    magnitudes), or those with |w| <= quality * std(surviving w).  `mask` (previous) is ANDed."""
    signed = np.asarray(weights, np.float64)
    w = np.abs(signed)
    keep = np.ones(w.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    if (sparsity is None) == (quality is None):
        raise EspressoError("prune_mask: give a target sparsity or a quality parameter")
    if quality is not None:
        alive = signed[keep]
        threshold = quality * alive.std() if alive.size else 0.0
        return keep & (w > threshold)
    if not 0 <= sparsity < 1:
        raise EspressoError(f"prune: sparsity must be in [0, 1), got {sparsity}")
    n_prune = int(round(sparsity * w.size))
    order = np.argsort(np.where(keep, w, -1.0), axis=None, kind="stable")  # already pruned first
    flat = keep.reshape(-1)
    flat[order[:n_prune]] = False
    return keep


def arena_offset(net, blob):
    """Offset of `blob`'s data in the net's parameter arena (shared blobs: their owner's)."""
    offset = 0
    for param in net.learnable_params:
        if param is blob or _same_memory(param.data, blob.data):
            return offset
        offset += param.count
    raise EspressoError(f"blob {blob.shape} is not a learnable parameter of the net")


def _same_memory(a, b):
    return a.shape == b.shape and address(a) == address(b)


class Masks:
    """Per-layer keep-masks over a net's weights, kept in force through a solver's updates."""

    def __init__(self, net):
        self.net, self.xp = net, net.backend.xp
        self.layers = {}  # layer name -> host boolean mask of its weight shape
        self.arena = None  # arena-sized 0/1 vector, built on the first `set`

    def set(self, name, mask):
        layer = self.net.layer_dict[name]
        blob = layer.blobs[0]
        mask = np.asarray(mask, bool).reshape(blob.shape)
        if self.arena is None:
            self.arena = self.xp.ones(self.net.arena_data.size, self.net.dtype)
        offset = arena_offset(self.net, blob)
        self.arena[offset:offset + blob.count] = self.net.backend.to_device(mask.ravel(), self.net.dtype)
        self.layers[name] = mask
        self.apply()

    def apply(self):
        """Zero the pruned weights (the whole arena in one multiply)."""
        if self.arena is not None:
            self.xp.multiply(self.net.arena_data, self.arena, out=self.net.arena_data)

    def attach(self, solver):
        """Keep the masks in force through `solver`'s updates (see the module docstring)."""
        if solver.net is not self.net:
            raise EspressoError("Masks.attach: the masks were made for another net")
        solver.add_callback(lambda: None, self._mask_gradients)
        solver.after_update.append(lambda: self.after_update(solver))

    def _mask_gradients(self):
        if self.arena is not None:
            diff = self.net.arena_diff
            self.xp.multiply(diff, self.arena, out=diff)

    def after_update(self, solver):
        if self.arena is None:
            return
        self.apply()
        for history in solver.updater.rule.history:
            self.xp.multiply(history, self.arena, out=history)

    def kept(self, name):
        return self.layers.get(name)
