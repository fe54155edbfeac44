"""Loading a compressed model into a built Net, and the layers that run it compressed.

`load_compressed(net, path)` is what `Net.copy_from` calls for a file that starts with the
compressed-model magic bytes.  Weights are matched by layer name, as Caffe copies them.  In a
TEST-phase net, each InnerProduct and (group 1) Convolution layer with compressed weights is
replaced by a `CompressedLayer` that keeps only its CSR arrays or code matrix and codebook
(`sparse.SparseMatrix`), and the dense copies of those weights are released from the net's
parameter arena, so the loaded net's weight memory is that of the compressed form.  A TRAIN
net (fine-tuning from a compressed file), other layer types, and any net when
ESPRESSO_COMPRESSED_DENSE=1 get plain dense weights.

Weights written by the int8 stage run as `Int8Layer`s (espresso/compress/int8.py; on a GPU,
`Int8GpuLayer`s) and 16-bit float ones as `HalfLayer`s (espresso/compress/half.py, on a GPU;
on the CPU they load as float32).  A compressed layer is inference-only (backward refuses).
`net.params[name][0].data` decodes the weights into a new read-only array on each access.  When
the weights are shared with another net's dense ones (the solver's test nets share the train
net's), the layer runs dense on those shared weights.
"""

import logging
import math
import os
import sys

import numpy as np

from espresso import graphs
from espresso.compress.model_file import CompressedWeights, HalfFloats, read_model
from espresso.compress.sparse import SparseMatrix, pack
from espresso.errors import ModelFileError, NetError, ShapeError
from espresso.layers.vision import conv_output_spatial

log = logging.getLogger("espresso")


def load_compressed(net, path):
    """Copy a compressed model's weights into `net` by layer name (Caffe's rule: unknown
    layers are skipped); in TEST nets, run compressible layers compressed."""
    name = os.path.basename(os.fspath(path))
    records = read_model(path)
    index = {n: i for i, n in enumerate(net.layer_dict)}
    swap = net.phase == 1 and os.environ.get("ESPRESSO_COMPRESSED_DENSE", "0") in ("", "0")
    replaced = []
    for layer_name, _type, blobs in records:
        i = index.get(layer_name)
        if i is None:
            continue
        layer = net.engine_layers[i]
        _check_blobs(name, layer, blobs)
        stand_in = _stand_in(layer, blobs[0], net) if swap else None
        if stand_in is not None:
            net.replace_layer(i, stand_in(layer, blobs[0]))
            replaced.append(layer.blobs[0])
            blobs = blobs[1:]
            targets = layer.blobs[1:]
        else:
            targets = layer.blobs
        for blob, value in zip(targets, blobs):
            array = value if isinstance(value, np.ndarray) else value.dense()
            blob.data[...] = net.backend.to_device(array.reshape(blob.shape), net.dtype)
    if replaced:
        net.release_params(replaced)  # the dense copies go (unless the net shares params)
        _fuse_runs(net)


def _stand_in(layer, weights, net):
    """The layer class to run `weights` with in a TEST net: HalfLayer for 16-bit floats (on a
    GPU), Int8Layer or Int8GpuLayer for int8 weights, CompressedLayer for other compressed ones, or
    None (dense, in the net's own layer)."""
    if isinstance(weights, HalfFloats):
        if net.backend.name == "cpu":
            return None
        from espresso.compress.half import HalfLayer, can_run

        return HalfLayer if can_run(layer) else None
    if getattr(weights, "input_scale", 0):
        try:
            from espresso.compress.int8 import Int8GpuLayer, Int8Layer, _can_run
        except ImportError:  # no Numba: the weights run dequantized, in float
            log.warning("layer '%s': int8 layers need Numba (pip install 'espresso-nn[fast]'); running it in "
                        "float32", layer.name)
            return None
        return (Int8Layer if net.backend.name == "cpu" else Int8GpuLayer) if _can_run(layer) else None
    if isinstance(weights, CompressedWeights) and _can_run_compressed(layer):
        return CompressedLayer
    return None


def _fuse_runs(net):
    """Find the fused runs (see FusedRun): a compressed InnerProduct, then its in-place ReLU
    if one follows, then the next compressed InnerProduct reading that top, and so on."""
    i, names = 0, list(net.layer_dict)
    while i < len(net.engine_layers):
        end = i
        head = net.engine_layers[i]
        if isinstance(head, CompressedLayer) and head.chain and head.type == "InnerProduct" and head.shared is None:
            while end + 1 < len(net.engine_layers) and _continues_run(net, names, end, type(head)):
                end += 1
        if end > i:
            FusedRun(net, i, end + 1)
        i = end + 1


def _continues_run(net, names, i, kind):
    """Whether layer i + 1 reads the top of layer i, the last of a run of `kind` layers, and
    joins the run."""
    layer, after, top = net.engine_layers[i], net.engine_layers[i + 1], net.top_names[names[i]]
    if after.type == "ReLU":  # in place, plain, after a compressed InnerProduct
        return (layer.type == "InnerProduct" and after.p.negative_slope == 0
                and net.bottom_names[names[i + 1]] == top == net.top_names[names[i + 1]])
    return (type(after) is kind and after.type == "InnerProduct" and after.shared is None
            and net.bottom_names[names[i + 1]] == top)


class FusedRun:
    """Layers start..stop-1 of a TEST net found by _fuse_runs, e.g. ip1 -> relu1 -> ip2 ->
    relu2 -> ip3, run as one: the first of them that a forward pass reaches computes the rest
    of the run (on the CPU with Numba, one call for all its InnerProducts with the ReLUs
    applied inside), writing every top as the layers would; the later ones then pass.  A pass
    is known by the net's loop that calls the layers (its frame, held so that it stays
    unique): a later pass that starts inside the run (forward(start="relu1"), after writing
    into blobs["ip1"]) computes from there and never reuses the older values.  NOTE: so a
    forward that ends inside a run (end="ip1") computes the whole run, and sees ip1 rectified."""

    def __init__(self, net, start, stop):
        for i in range(start, stop):
            if net.engine_layers[i].type == "ReLU":
                net.replace_layer(i, FusedReLU(net.engine_layers[i]))
        self.layers, self.backend = net.engine_layers[start:stop], net.backend
        self.bottoms, self.tops = net.bottom_vecs[start:stop], net.top_vecs[start:stop]
        self.caller, self.next, self.version, self.calls = None, 0, None, None
        for k, layer in enumerate(self.layers):
            layer.run, layer.position = self, k
        self.fc = [k for k, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]
        relus = [k + 1 < len(self.layers) and isinstance(self.layers[k + 1], FusedReLU) for k in self.fc]
        self.bind = type(self.layers[0]).chain([self.layers[k] for k in self.fc], relus)

    def forward_from(self, k, caller):
        """A pass (the net's loop `caller`) reaches layer k first: compute layers k.. ."""
        self.caller, self.next = caller, k + 1
        if self.version != graphs.version(self.backend):  # some blob changed: size the later tops, as the net would
            for layer, bottom, top in zip(self.layers[k:], self.bottoms[k:], self.tops[k:]):
                layer.reshape(bottom, top)
            self.version, self.calls = graphs.version(self.backend), self._bind()
        if self.calls is None:  # no common kernel: one layer after the other
            for layer, bottom, top in zip(self.layers[k:], self.bottoms[k:], self.tops[k:]):
                layer.compute(bottom, top)
            return
        if k not in self.fc:  # a pass that starts at a ReLU
            self.layers[k].compute(self.bottoms[k], self.tops[k])
        self.calls[k]()

    def _bind(self):
        """Per layer k, the kernel call for the InnerProducts after it, on the current blobs."""
        layers = [self.layers[k].inner for k in self.fc]
        if self.bind is None or any(self.layers[k].shared is not None for k in self.fc) or \
                len({layer.M for layer in layers}) > 1:
            return None
        x = self.bottoms[self.fc[0]][0].data.reshape(layers[0].M, layers[0].K)
        ys = tuple(self.tops[k][0].data.reshape(layer.M, layer.N) for k, layer in zip(self.fc, layers))
        biases = tuple(layer.blobs[1].data if len(layer.blobs) > 1 else self.layers[k].no_bias
                       for k, layer in zip(self.fc, layers))
        firsts = [sum(f < k for f in self.fc) for k in range(len(self.layers))]  # the first after k
        return [self.bind(first, biases, x, ys) if first < len(ys) else _nothing for first in firsts]


def _nothing():
    pass


class _Wrapper:
    """A layer of a built net standing in for `inner`, whose attributes it shows, and which
    may belong to a FusedRun."""

    run = None
    batch_parts = None  # its forward is its own: not the inner layer's parts (Net's chains)

    def __init__(self, inner):
        self.inner = inner
        # read by the net on every run: as attributes, not through __getattr__ (0.5 us a lookup)
        self.loss_weights, self.is_loss = inner.loss_weights, inner.is_loss

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, bottom, top):
        run = self.run
        if run is None:
            return self.compute(bottom, top)
        caller = sys._getframe(1)
        if caller is run.caller and self.position == run.next:  # computed by an earlier layer of this pass
            run.next += 1
        else:
            run.forward_from(self.position, caller)


class FusedReLU(_Wrapper):
    """An in-place ReLU in a FusedRun."""

    def compute(self, bottom, top):
        self.inner.forward(bottom, top)


def _check_blobs(name, layer, blobs):
    if len(blobs) != len(layer.blobs):
        raise ModelFileError(f"{name}: layer '{layer.name}': {len(blobs)} blobs in file, {len(layer.blobs)} in net")
    for k, (value, blob) in enumerate(zip(blobs, layer.blobs)):
        if tuple(value.shape) != tuple(blob.shape):
            raise ShapeError(f"{name}: layer '{layer.name}': param {k} shape {tuple(value.shape)} does not match "
                             f"net {blob.shape}; rename the layer to learn it from scratch")


def _can_run_compressed(layer):
    if layer.type == "InnerProduct":
        return True
    return layer.type == "Convolution" and layer.p.group == 1 and layer.axis == 1


class CompressedBlob:
    """The weight blob of a CompressedLayer: a Blob's read-only surface, decoded on each read,
    never stored dense."""

    def __init__(self, layer, shape):
        self.layer, self.backend, self.dtype, self.name = layer, layer.backend, layer.dtype, ""
        self.shape = tuple(shape)

    @property
    def count(self):
        return math.prod(self.shape)

    @property
    def num_axes(self):
        return len(self.shape)

    def reshape(self, *shape):
        raise NetError(f"{self.layer.where}: compressed weights cannot be reshaped")

    @property
    def data(self):
        if self.layer.shared is not None:
            return self.layer.shared
        array = self.layer.dense_weights()
        if isinstance(array, np.ndarray):
            array.flags.writeable = False
        return array

    @property
    def diff(self):
        raise NetError(f"{self.layer.where}: compressed weights have no gradient (inference only)")

    def host_data(self):
        return self.backend.to_host(self.data)

    def host_diff(self):
        return np.zeros(self.shape, self.dtype)

    def share_data(self, other):
        if other.count != self.count:
            raise ShapeError(f"cannot share data of {other.shape} with {self.shape}")
        self.layer.run_dense(other.data.reshape(self.shape))

    def bind(self, data, diff=None):
        raise NetError(f"{self.layer.where}: compressed weights cannot be rebound")

    def __repr__(self):
        return f"CompressedBlob({self.layer.inner.name!r}, shape={self.shape})"


class CompressedLayer(_Wrapper):
    """An InnerProduct or Convolution layer of a built net, running from compressed weights.
    Everything but the weights, forward and backward is the original layer's."""

    def __init__(self, layer, weights):
        super().__init__(layer)
        self.shared = None
        shape = tuple(weights.shape)
        if layer.type == "InnerProduct":
            rows, cols = layer.N, layer.K
            self.matrix = SparseMatrix(weights, rows, cols, layer.backend, layer.dtype, layer.p.transpose,
                                       by_column=True)
        else:
            rows, cols = shape[0], math.prod(shape[1:])
            self.matrix = SparseMatrix(weights, rows, cols, layer.backend, layer.dtype)
            layer.core, layer.core_shape = None, None  # the dense GEMM's column buffers
        self.blobs = [CompressedBlob(self, shape)] + layer.blobs[1:]
        self.col = self.rows_buffer = self.work = None
        self._views, self._product = (None, None), None

    def __repr__(self):
        return f"<CompressedLayer '{self.inner.name}' ({self.inner.type}), {self.matrix.nnz} weights stored>"

    @staticmethod
    def chain(layers, relus):
        """FusedRun's binder for a run of these layers (sparse.pack's), or None."""
        return pack([layer.matrix for layer in layers], relus)

    @property
    def no_bias(self):
        return self.matrix._no_bias

    @property
    def nbytes(self):
        return self.matrix.nbytes

    def dense_weights(self):
        shape = self.blobs[0].shape
        w = self.matrix.dense()  # (num_output, K)
        if self.inner.type == "InnerProduct" and self.inner.p.transpose:
            w = w.T.copy()
        return w.reshape(shape)

    def run_dense(self, array):
        """Run on dense weights from elsewhere (shared by another net) from now on."""
        self.inner.blobs[0].share_data(_ArrayHolder(array))
        self.shared, self.matrix = array, None
        self.inner.core_shape = None
        if self.run is not None:
            self.run.version = None  # the run now goes one layer after the other

    def reshape(self, bottom, top):
        if self.shared is not None or self.inner.type == "InnerProduct":
            return self.inner.reshape(bottom, top)
        inner, shape = self.inner, bottom[0].shape
        out = conv_output_spatial(inner, shape[2:])
        for blob in top:
            blob.reshape((shape[0], inner.p.num_output) + out)
        width = math.prod(out) * shape[0]
        xp, k = self.xp, self.k
        self.col = xp.empty((self.matrix.cols, width), self.dtype)
        self.rows_buffer = xp.empty((self.matrix.rows, width), self.dtype)
        self.batch_last = shape[0] > 1  # one image: the two column layouts coincide; the plain one needs no staging
        size = k.im2col_workspace_size(tuple(shape), inner.pad, self.batch_last)
        self.work = xp.empty(size, self.dtype) if size else None

    def compute(self, bottom, top):
        """The layer's own computation, or the original layer's on weights shared from another net."""
        inner = self.inner
        if self.shared is None:
            return self.compute_compressed(bottom, top)
        if inner.type == "Convolution" and inner.core_shape is None:
            inner.reshape(bottom, top)
        inner.forward(bottom, top)

    def compute_compressed(self, bottom, top):
        inner = self.inner
        bias = inner.blobs[1].data if len(inner.blobs) > 1 else None
        if inner.type == "InnerProduct":
            x, y = bottom[0].data, top[0].data
            if x is not self._views[0] or y is not self._views[1]:  # first run, or reshaped
                self._views = (x, y, x.reshape(inner.M, inner.K), y.reshape(inner.M, inner.N))
                self._product = self.matrix.product_t(bias)
            self._product(self._views[2], self._views[3])
            return
        if self.col is None or self.col.shape[1] != math.prod(top[0].shape[2:]) * bottom[0].shape[0]:
            self.reshape(bottom, top)  # the first run after the swap
        for b, t in zip(bottom, top):
            self._conv(b.data, t.data, bias)

    def _conv(self, x, y, bias):
        inner, n = self.inner, x.shape[0]
        self.k.im2col(x, self.col, inner.kernel, inner.stride, inner.pad, inner.dilation, self.batch_last, self.work)
        self.matrix.matmul(self.col, self.rows_buffer)
        rows = self.rows_buffer.reshape(self.matrix.rows, -1, n).transpose(2, 0, 1)
        flat = y.reshape(n, self.matrix.rows, -1)
        if bias is None:
            flat[...] = rows
        else:
            self.xp.add(rows, bias[:, None], out=flat)

    def backward(self, top, propagate_down, bottom):
        if self.shared is not None:
            return self.inner.backward(top, propagate_down, bottom)
        raise NetError(f"{self.inner.where}: runs from compressed weights, which are inference-only; load the "
                       "file into a TRAIN net (or set ESPRESSO_COMPRESSED_DENSE=1) to train")


class _ArrayHolder:
    """The minimal Blob surface Blob.share_data reads."""

    def __init__(self, array):
        self.data, self.count = array, array.size
