"""Loading a compressed model into a built Net, and the layers that run it compressed.

`load_compressed(net, path)` is what `Net.copy_from` calls for a file that starts with the
compressed-model magic bytes.  Weights are matched by layer name, as Caffe copies them.  In a
TEST-phase net, each InnerProduct and (group 1) Convolution layer with compressed weights is
replaced by a `CompressedLayer` that keeps only its CSR arrays or code matrix and codebook
(`sparse.SparseMatrix`), and the dense copies of those weights are released from the net's
parameter arena, so the loaded net's weight memory is that of the compressed form.  A TRAIN
net (fine-tuning from a compressed file), other layer types, and any net when
ESPRESSO_COMPRESSED_DENSE=1 get plain dense weights.

A compressed layer is inference-only (backward refuses).  `net.params[name][0].data` decodes
the weights into a new read-only array on each access.  When the weights are shared with
another net's dense ones (the solver's test nets share the train net's), the layer runs dense
on those shared weights.
"""

import math
import os

import numpy as np

from espresso.blob import Blob
from espresso.compress.model_file import CompressedWeights, read_model
from espresso.compress.sparse import SparseMatrix
from espresso.errors import ModelFileError, NetError, ShapeError
from espresso.layers.vision import conv_output_spatial


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
        layer = net.layers[i]
        _check_blobs(name, layer, blobs)
        if swap and isinstance(blobs[0], CompressedWeights) and _can_run_compressed(layer):
            net.layers[i] = CompressedLayer(layer, blobs[0])
            replaced.append(layer.blobs[0])
            blobs = blobs[1:]
            targets = layer.blobs[1:]
        else:
            targets = layer.blobs
        for blob, value in zip(targets, blobs):
            array = value.dense() if isinstance(value, CompressedWeights) else value
            blob.data[...] = net.backend.to_device(array.reshape(blob.shape), net.dtype)
    if replaced:
        _release_dense(net, replaced)
        _fuse_relus(net)


def _fuse_relus(net):
    """A compressed InnerProduct followed by a plain ReLU in place on its top applies the ReLU
    itself; the ReLU layer then passes (see FusedReLU)."""
    names, tops, bottoms = list(net.layer_dict), net.top_names, net.bottom_names
    for i, layer in enumerate(net.layers[:-1]):
        after = net.layers[i + 1]
        if not isinstance(layer, CompressedLayer) or layer.type != "InnerProduct" or after.type != "ReLU":
            continue
        blob = tops[names[i]]
        if after.p.negative_slope == 0 and bottoms[names[i + 1]] == blob and tops[names[i + 1]] == blob:
            net.layers[i + 1] = layer.fused_relu = FusedReLU(after)


class FusedReLU:
    """An in-place ReLU whose work the compressed InnerProduct before it did: it passes when
    that layer has just run (`pending`), and runs as itself otherwise (a forward started at
    the ReLU).  NOTE: so a forward that ends at the InnerProduct sees its output rectified."""

    def __init__(self, layer):
        self.inner, self.pending = layer, False
        self.loss_weights, self.is_loss = layer.loss_weights, layer.is_loss  # the net reads them every run

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, bottom, top):
        if self.pending:
            self.pending = False
            return
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


def _release_dense(net, replaced):
    """Rebuild the parameter arena without the replaced weights, so their memory is freed.
    Nets with shared params (a layer blob that is not a learnable param) keep the arena."""
    learnable = {id(b) for b in net.learnable_params}
    if any(id(b) not in learnable for layer in net.layers for b in layer.blobs if not isinstance(b, CompressedBlob)):
        return
    xp, gone = net.backend.xp, {id(b) for b in replaced}
    live = [b for b in net.learnable_params if id(b) not in gone]
    total = sum(b.count for b in live)
    data, diff = xp.zeros(total, net.dtype), xp.zeros(total, net.dtype)
    offset = 0
    for blob in live:
        data[offset:offset + blob.count] = blob.data.ravel()
        blob.bind(data[offset:offset + blob.count], diff[offset:offset + blob.count])
        offset += blob.count
    for blob in replaced:  # NOTE: a zero-stride view holds no memory; Blob.bind would copy it
        blob._data_buf = blob._data = xp.broadcast_to(xp.zeros((), net.dtype), blob.shape)
        blob._diff_buf = blob._diff = None
    net.arena_data, net.arena_diff = data, diff


class CompressedBlob(Blob):
    """The weight blob of a CompressedLayer: decoded on each read, never stored dense."""

    def __init__(self, layer, shape):
        self.layer, self.backend, self.dtype, self.name = layer, layer.backend, layer.dtype, ""
        self._shape = tuple(shape)

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
        return np.zeros(self._shape, self.dtype)

    def share_data(self, other):
        if other.count != self.count:
            raise ShapeError(f"cannot share data of {other.shape} with {self._shape}")
        self.layer.run_dense(other.data.reshape(self._shape))

    def bind(self, data, diff=None):
        raise NetError(f"{self.layer.where}: compressed weights cannot be rebound")


class CompressedLayer:
    """An InnerProduct or Convolution layer of a built net, running from compressed weights.
    Everything but the weights, forward and backward is the original layer's."""

    def __init__(self, layer, weights):
        self.inner, self.shared = layer, None
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
        # read by the net on every run: as attributes, not through __getattr__ (0.5 us a lookup)
        self.loss_weights, self.is_loss = layer.loss_weights, layer.is_loss
        self._views, self._product, self.fused_relu = (None, None), None, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __repr__(self):
        return f"<CompressedLayer '{self.inner.name}' ({self.inner.type}), {self.matrix.nnz} weights stored>"

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

    def forward(self, bottom, top):
        inner = self.inner
        if self.shared is not None:
            if inner.type == "Convolution" and inner.core_shape is None:
                inner.reshape(bottom, top)
            return inner.forward(bottom, top)
        bias = inner.blobs[1].data if len(inner.blobs) > 1 else None
        if inner.type == "InnerProduct":
            x, y = bottom[0].data, top[0].data
            if x is not self._views[0] or y is not self._views[1]:  # first run, or reshaped
                self._views = (x, y, x.reshape(inner.M, inner.K), y.reshape(inner.M, inner.N))
                self._product = self.matrix.product_t(bias, self.fused_relu is not None)
            self._product(self._views[2], self._views[3])
            if self.fused_relu is not None:
                self.fused_relu.pending = True
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
