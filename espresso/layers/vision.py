"""Vision layers: Convolution, Deconvolution, Im2col, Pooling, SPP, LRN, Crop.

Spatial parameters in either Caffe spelling (repeated kernel_size/stride/pad/dilation, or the
2-D kernel_h/_w, stride_h/_w, pad_h/_w) are read by one helper, `spatial_params`.  The engine
fields (CAFFE, CUDNN) are accepted and ignored: every engine computes the same values here.
"""

import functools
import itertools
import json
import math

import numpy as np

from espresso.blob import allocate_diffs
from espresso.errors import NetError, ShapeError
from espresso.layer import Layer, register
from espresso.proto import caffe_pb2

COLUMN_BUDGET = 256 << 20  # bytes of im2col columns per layer; larger batches run in chunks
# The batch-last column layout (one GEMM over the batch, transposes on the output side) wins
# over the batch-major one (a GEMM per image) when output maps are small or the columns tall;
# measured with LeNet/CIFAR/VGG-like shapes on 2 cores.
BATCH_LAST_BELOW = 256  # output pixels per image
BATCH_LAST_ROWS = 128  # column rows: C_in/group * prod(kernel)
# Where the backend has im2row (the CPU), columns of at least this many rows (the tall ones
# batch-last takes otherwise) take the pixel-rows layout instead (see _ColumnGemm), for chunks of
# 2 or more images: at batch 1, LeNet's inference took 0.27 against 0.22 ms in pixel rows
PIXEL_ROWS = 128
MAX_PARTS = 16  # at most this many partial products for a long weight-gradient GEMM (GPU)
# A weight gradient computed aside (a second stream) while the bottom gradient is computed needs
# a second column buffer for the latter: only up to this size; larger layers keep one stream
SPARE_COLUMNS = 64 << 20
# The direct kernel (a GPU's `direct_conv_forward`) is timed for a forward of at most this many
# multiply-adds: beyond, cuDNN wins by far and timing the kernel would only cost time
DIRECT_WORK = 1 << 28
# cuDNN algorithms timed within this fraction of the fastest count as tied (timing noise: LeNet
# b256's conv2 filter gradient took the one of 42.5 MiB workspace in some processes, of 12.2 in
# others); of tied ones, the one of least workspace is kept
TIED_WITHIN = 0.05

_POOL = caffe_pb2.PoolingParameter
_LRN = caffe_pb2.LRNParameter


# *** spatial parameters ***
_SPATIAL = (("kernel", "kernel_size", None), ("stride", "stride", 1), ("pad", "pad", 0),
            ("dilation", "dilation", 1))


def spatial_params(layer, num_spatial):
    """(kernel, stride, pad, dilation), each a num_spatial-tuple, from layer.p (a
    ConvolutionParameter or PoolingParameter) in either spelling, checked as Caffe checks them.
    kernel is None when none is given."""
    return tuple(_axis_values(layer, short, field, default, num_spatial)
                 for short, field, default in _SPATIAL)


def _axis_values(layer, short, field, default, num_spatial):
    p, fields = layer.p, layer.p.DESCRIPTOR.fields_by_name
    if field not in fields:  # pooling has no dilation
        return (default,) * num_spatial
    repeated = fields[field].is_repeated  # ConvolutionParameter's lists; PoolingParameter's are single
    given = list(getattr(p, field)) if repeated else [getattr(p, field)] * p.HasField(field)
    h, w = f"{short}_h", f"{short}_w"
    name = f"{layer.param}.{field}"
    if h in fields and (p.HasField(h) or p.HasField(w)):
        if num_spatial != 2:
            layer.fail(f"{layer.param}.{h}/{w}: only for 2 spatial axes, got {num_spatial}")
        if given:
            layer.fail(f"{name}: give it or {h}/{w}, not both")
        if not repeated and not (p.HasField(h) and p.HasField(w)):
            layer.fail(f"{layer.param}.{h}/{w}: give both")
        values = (getattr(p, h), getattr(p, w))
    elif not given:
        if default is None:
            return None
        values = (default,) * num_spatial
    elif len(given) in (1, num_spatial):
        values = tuple(given) if len(given) == num_spatial else (given[0],) * num_spatial
    else:
        layer.fail(f"{name}: give one value or one per spatial axis ({num_spatial}), got {len(given)}")
    if short != "pad" and any(v < 1 for v in values):
        layer.fail(f"{name}: must be > 0, got {values}")
    return values


def _images(array, lo, hi):
    """array[lo:hi], or the array itself where that is all of it (a view costs on a GPU)."""
    return array if lo == 0 and hi == array.shape[0] else array[lo:hi]


# *** convolution ***
def column_bytes(layer, num, image_shape, data_shape):
    """Bytes of the im2col columns of `num` images: (Ci * prod(kernel)) x (output pixels)."""
    return image_shape[0] * math.prod(layer.kernel) * math.prod(data_shape[1:]) * num * layer.dtype.itemsize


class _ColumnGemm:
    """A (de)convolution's geometry and buffers for one bottom shape.

    The image side (n, Ci, *S) unfolds into columns with rows (c, k...); the data side
    (n, Cd, *O) has one row per channel; per group g, data_g = W_g @ col_g with W viewed as
    (G, Cd/G, Ci/G*prod(K)).  Convolution: image = bottom, data = top; Deconvolution: the
    reverse.  Three layouts:
    - pixel rows, for tall columns of 2 or more images where the backend has im2row (the CPU;
      2-D, one group, not a 1x1 kernel that skips im2col): the transposes, one row per output
      pixel, (n*L, prod(K)*Ci) and (n*L, Cd), each row in (k..., c) order and W copied to
      match.  OpenBLAS runs GEMMs faster with the pixels as the long side: LeNet's conv2 on 32
      images, its three GEMMs 3.3 against 4.0 ms alone, 3.9 against 4.4 ms in a training step.
    - batch-last, for small output maps or other tall columns: one GEMM per group over the
      whole batch, transposes on the data side.
    - batch-major otherwise: a batched GEMM straight into the blob; 1x1 stride-1 unpadded
      kernels skip im2col.
    The products (data_product, image_product, weight_grad) take each layout's orientation.
    """

    def __init__(self, layer, num, image_shape, data_shape):
        self.xp, self.k, dtype = layer.xp, layer.k, layer.dtype
        self.geometry = (layer.kernel, layer.stride, layer.pad, layer.dilation)
        self.num, self.group = num, layer.p.group
        self.ci, self.cd = image_shape[0], data_shape[0]
        self.length = math.prod(data_shape[1:])  # L: output pixels per image
        self.taps = math.prod(layer.kernel)
        self.rows_per_group = self.ci // self.group * self.taps  # Kg
        self.chunk = max(1, min(num, COLUMN_BUDGET // max(column_bytes(layer, 1, image_shape, data_shape), 1)))
        tall, many = self.rows_per_group >= BATCH_LAST_ROWS, self.chunk > 1
        unit = all(k == 1 for k in layer.kernel) and all(s == 1 for s in layer.stride) and not any(layer.pad)
        self.pixel_rows = (many and self.rows_per_group >= PIXEL_ROWS and not unit and self.group == 1
                           and len(layer.kernel) == 2 and self.k.im2row is not None)
        self.batch_last = many and not self.pixel_rows and (tall or self.length < BATCH_LAST_BELOW)
        self.skip = unit and not self.batch_last
        n, empty, staged = self.chunk, self.xp.empty, self.batch_last or self.pixel_rows
        self.col = None if self.skip else empty(self.ci * self.taps * self.length * n, dtype)
        work = self.k.im2col_workspace_size((n, self.ci, *image_shape[1:]), layer.pad, staged)
        self.work = empty(work, dtype) if work and not self.skip else None
        self.rows = empty(self.cd * self.length * n, dtype) if staged else None
        self.filter_copy = empty(self.cd * self.rows_per_group, dtype) if self.pixel_rows else None
        self.split_k = self.batch_last and layer.backend.splits_long_gemms
        parts = (MAX_PARTS if self.split_k else 1) if staged else n
        needs_tmp = parts > 1 or not self.batch_last
        self.wtmp = empty(parts * self.cd * self.rows_per_group, dtype) if needs_tmp else None
        self.spares = None  # (column buffer, workspace) for a bottom gradient beside a weight gradient
        self.weight_part = None  # a later part's weight gradient, added to the diff after the parts
        self.cols_ready = False  # the column buffer holds the columns of the last forward's bottom

    def chunks(self):
        return [(lo, min(lo + self.chunk, self.num)) for lo in range(0, self.num, self.chunk)]

    def zeroed_weight_part(self, diff):
        """A zeroed buffer shaped as the weights' diff, for this part's weight gradient."""
        if self.weight_part is None:
            self.weight_part = self.xp.zeros_like(diff)
        else:
            self.weight_part[...] = 0
        return self.weight_part

    def weights(self, array):
        """W (or its diff) as (G, Cd/G, Kg)."""
        return array.reshape(self.group, self.cd // self.group, self.rows_per_group)

    def filters(self, weights):
        """The weights W as the products take them: (G, Cd/G, Kg), each row in the columns'
        order; for pixel rows a copy in (k..., c) order (this core's: the parts copy apart)."""
        if not self.pixel_rows:
            return self.weights(weights)
        copy = self.filter_copy.reshape(self.cd, self.taps, self.ci)
        copy[...] = weights.reshape(self.cd, self.ci, self.taps).swapaxes(1, 2)
        return copy.reshape(1, self.cd, self.rows_per_group)

    def data_product(self, filters, col, out):
        """out = W @ col: the data side's rows from the columns."""
        if self.pixel_rows:
            self.k.matmul(col, filters[0].T, out=out)
        else:
            self.k.matmul(filters, col, out=out)

    def image_product(self, filters, rows, out):
        """out = W^T @ rows: columns from the data side's rows."""
        if self.pixel_rows:
            self.k.matmul(rows, filters[0], out=out)
        else:
            self.k.matmul(filters.swapaxes(-1, -2), rows, out=out)

    def can_overlap(self, bottoms):
        """Whether the weight gradient may run aside (concurrently): one bottom, one chunk (so
        the rows of the top gradient are loaded once) and spare columns of a modest size."""
        return bottoms == 1 and self.chunk == self.num and (self.col is None or self.col.nbytes <= SPARE_COLUMNS)

    def _spare(self):
        if self.spares is None:
            self.spares = (self.xp.empty_like(self.col), None if self.work is None else self.xp.empty_like(self.work))
        return self.spares

    # image side
    def _col(self, n, spare=False):
        g, kg, length = self.group, self.rows_per_group, self.length
        if self.pixel_rows:
            shape = (n * length, kg)
        else:
            shape = (g, kg, length * n) if self.batch_last else (n, g, kg, length)
        return (self._spare()[0] if spare else self.col)[: math.prod(shape)].reshape(shape)

    def columns(self, image, ready=False):
        """Columns of image (n, Ci, *S): (n, G, Kg, L), (G, Kg, L*n) batch-last, or (n*L, Kg)
        pixel rows.  `ready`: the buffer already holds them (the same bottom as the last call)."""
        n = image.shape[0]
        if self.skip:
            return image.reshape(n, self.group, self.rows_per_group, self.length)
        col = self._col(n)
        if not ready and self.pixel_rows:
            self.k.im2row(image, col, *self.geometry, self.work)
        elif not ready:
            self.k.im2col(image, col, *self.geometry, self.batch_last, self.work)
        return col

    def image_target(self, image, spare=False):
        """Where column-space results for image (n, Ci, *S) go before `to_image`; `spare`: not
        the buffer `columns` fills (a weight gradient running aside may still read that)."""
        if self.skip:
            return image.reshape(image.shape[0], self.group, self.rows_per_group, self.length)
        return self._col(image.shape[0], spare)

    def to_image(self, col, image, spare=False):
        if self.pixel_rows:
            self.k.row2im(col, image, *self.geometry, self.work)
        elif not self.skip:
            self.k.col2im(col, image, *self.geometry, self.batch_last, self._spare()[1] if spare else self.work)

    # data side
    def _rows(self, n):
        if self.pixel_rows:
            shape = (n * self.length, self.cd)
        else:
            shape = (self.group, self.cd // self.group, self.length * n)
        return self.rows[: math.prod(shape)].reshape(shape)

    def _as_data(self, rows, n):
        """Batch-last or pixel rows viewed as data (n, Cd, L)."""
        if self.pixel_rows:
            return rows.reshape(n, self.length, self.cd).transpose(0, 2, 1)
        return rows.reshape(self.cd, self.length, n).transpose(2, 0, 1)

    def data_target(self, data):
        """Where a GEMM result for data (n, Cd, *O) goes before `store_data`."""
        n = data.shape[0]
        return self._rows(n) if self.rows is not None else data.reshape(n, self.group, -1, self.length)

    def load_data(self, data):
        """data (n, Cd, *O) as GEMM rows: (n, G, Cd/G, L), batch-last (G, Cd/G, L*n) or pixel
        rows (n*L, Cd)."""
        n = data.shape[0]
        if self.rows is None:
            return data.reshape(n, self.group, -1, self.length)
        rows = self._rows(n)
        self._as_data(rows, n)[...] = data.reshape(n, self.cd, self.length)
        return rows

    def store_data(self, rows, data, bias=None):
        """Finish data (n, Cd, *O) from `data_target` rows, adding the per-channel bias."""
        n = data.shape[0]
        flat = data.reshape(n, self.cd, self.length)
        if self.rows is not None:
            result = self._as_data(rows, n)
            if bias is None:
                flat[...] = result
            else:
                self.xp.add(result, bias[:, None], out=flat)
        elif bias is not None:
            flat += bias[:, None]

    def _parts(self, columns):
        """Slices of the batch-last weight-gradient GEMM's inner dimension (its K = L * n): a GPU
        keeps a small output (Cd x Kg) busy on all its multiprocessors only when a long K is
        split into partial products, summed after (cuBLAS alone ran CaffeNet's conv2 at 15
        TFLOP/s).  1 on the CPU."""
        if not self.split_k or self.cd * self.rows_per_group >= 1 << 20 or columns < 8192:
            return 1
        return next(s for s in range(min(MAX_PARTS, columns // 2048), 0, -1) if columns % s == 0)

    def weight_grad(self, rows, col, diff):
        """diff (G, Cd/G, Kg) += rows @ col^T, summed over the batch (diff in W's own order)."""
        if self.pixel_rows:  # rows^T @ col, from (k..., c) order back to (c, k...)
            tmp = self.wtmp[: diff.size].reshape(self.cd, self.taps, self.ci)
            self.k.matmul(rows.T, col, out=tmp.reshape(self.cd, -1))
            target = diff.reshape(self.cd, self.ci, self.taps)
            target += tmp.swapaxes(1, 2)
            return
        if self.batch_last:
            parts, columns = self._parts(rows.shape[-1]), rows.shape[-1]
            if parts == 1:  # one GEMM over the batch, accumulating (beta = 1) as Caffe's
                self.k.matmul(rows, col.swapaxes(-1, -2), out=diff, accumulate=True)
                return
            g, cdg, kg = diff.shape
            r = rows.reshape(g, cdg, parts, columns // parts).transpose(2, 0, 1, 3)
            c = col.reshape(g, kg, parts, columns // parts).transpose(2, 0, 3, 1)
            tmp = self.wtmp[: parts * diff.size].reshape(parts, g, cdg, kg)
            self.k.matmul(r, c, out=tmp)
        else:
            shape = rows.shape[:-1] + (self.rows_per_group,)
            tmp = self.wtmp[: math.prod(shape)].reshape(shape)
            self.k.matmul(rows, col.swapaxes(-1, -2), out=tmp)
        diff += tmp.sum(axis=0)


def _leanest(options, times):
    """Of the (algorithm, workspace bytes) options, the one of least workspace among those
    timed within TIED_WITHIN of the fastest (the faster where workspaces are equal)."""
    bound = min(times) * (1 + TIED_WITHIN)
    return min((size, ms, (algo, size)) for (algo, size), ms in zip(options, times) if ms <= bound)[2]


def conv_output_spatial(layer, spatial):
    """Caffe's convolution output size per axis: (size + 2 pad - extent) // stride + 1, where
    extent = dilation * (kernel - 1) + 1.  A kernel wider than the padded input is refused
    (Caffe's integer division would still report one output there)."""
    out = []
    for size, k, s, p, d in zip(spatial, layer.kernel, layer.stride, layer.pad, layer.dilation):
        extent = d * (k - 1) + 1
        if size + 2 * p < extent:
            layer.fail(f"kernel extent {extent} exceeds the padded input: size {size} + 2 * pad {p}",
                       ShapeError)
        out.append((size + 2 * p - extent) // s + 1)
    return tuple(out)


class _BaseConvolution(Layer):
    """Shared by Convolution and Deconvolution (Caffe's BaseConvolutionLayer)."""

    param = "convolution_param"
    min_bottoms = min_tops = 1
    equal_bottoms_tops = True
    transposed = False  # Deconvolution: bottom and top swap roles

    def setup(self, bottom, top):
        p, axes = self.p, bottom[0].num_axes
        if not -axes <= p.axis < axes:
            self.fail(f"convolution_param.axis: {p.axis} out of range for {axes} axes")
        self.axis = p.axis % axes
        self.kernel, self.stride, self.pad, self.dilation = spatial_params(self, axes - self.axis - 1)
        if self.kernel is None:
            self.fail("convolution_param.kernel_size: give it once or once per spatial axis "
                      "(or kernel_h and kernel_w)")
        if p.num_output < 1:
            self.fail(f"convolution_param.num_output: must be > 0, got {p.num_output}")
        self.channels = bottom[0].shape[self.axis]
        if p.group < 1 or self.channels % p.group or p.num_output % p.group:
            self.fail(f"convolution_param.group: {p.group} must divide both the input channels "
                      f"({self.channels}) and num_output ({p.num_output})")
        c_out, c_in = (self.channels, p.num_output) if self.transposed else (p.num_output, self.channels)
        self.blobs = [self.new_blob((c_out, c_in // p.group, *self.kernel), p.weight_filler)]
        if p.bias_term:
            self.blobs.append(self.new_blob((p.num_output,), p.bias_filler))
        self.cores = self.plan = self.core_shape = self.engines = self.channel_sums = self.part_sums = None
        self.bottom_count = len(bottom)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + len(self.kernel) or shape[self.axis] != self.channels:
            self.fail(f"bottom shape {shape} does not fit the layer set up for {self.channels} channels "
                      f"at axis {self.axis} and {len(self.kernel)} spatial axes", ShapeError)
        for i, blob in enumerate(bottom[1:], 1):
            if blob.shape != shape:
                self.fail(f"bottom {i} shape {blob.shape} differs from bottom 0 shape {shape}", ShapeError)
        out = self.output_spatial(shape[self.axis + 1:])
        self.top_pixels = math.prod(out)
        for blob in top:
            blob.reshape(shape[: self.axis] + (self.p.num_output,) + out)
        if shape != self.core_shape:
            self.num = math.prod(shape[: self.axis])
            image, data = (self.channels,) + shape[self.axis + 1:], (self.p.num_output,) + out
            if self.transposed:
                image, data = data, image
            self.plan = self._cudnn_plan(image, data)
            # larger im2col buffers are not even tried where cuDNN is
            self.gemm_ok = not self.plan or column_bytes(self, self.num, image, data) <= self.plan.timed_columns
            # the batch's parts (backend.batch_ranges: threads on a CPU) each with their buffers,
            # made where cuDNN is only when im2col + GEMM runs (`_gemm_cores`)
            self.ranges, self.core_geometry, self.cores = self.backend.batch_ranges(self.num), (image, data), None
            if not self.plan:
                self._gemm_cores()
            self.engines = [None, None] if self.plan else ["gemm", "gemm"]  # forward, backward
            self.core_shape = shape
            if len(self.ranges) > 1 and self.p.bias_term:  # each part's channel sums in its rows
                self.part_sums = self.xp.empty((len(bottom), self.num, self.p.num_output), self.dtype)
            # a convolution's parts run in the net's chains (Layer.batch_parts); a deconvolution's
            # bias gradient needs its whole top diff first
            split = len(self.ranges) > 1 and not self.plan and not self.transposed
            self.batch_parts = self.ranges if split else None
        self.ones(max(self.top_pixels, self.num))  # sized here: not first made by work put aside

    def _cudnn_plan(self, image, data):
        """cuDNN's plan for a 2-D convolution where the backend has cuDNN (and is not in
        deterministic mode), else None."""
        cudnn = self.backend.cudnn
        if cudnn is None or self.backend.deterministic or len(self.kernel) != 2:
            return None
        return cudnn.plan((self.num, *image), (self.num, *data), self.blobs[0].shape, self.stride, self.pad,
                          self.dilation, self.p.group, self.dtype)

    def forward(self, bottom, top):
        engine = self.engines[0] or self._choose(0, bottom, top)
        getattr(self, f"_{engine}_forward")(bottom, top)  # _cudnn_forward, _gemm_forward or _direct_forward

    def backward(self, top, propagate_down, bottom):
        engine = self.engines[1] or self._choose(1, top, propagate_down, bottom)
        if engine == "direct" and any(propagate_down):  # (chosen where no bottom gradient was wanted)
            engine = "cudnn"
        getattr(self, f"_{engine}_backward")(top, propagate_down, bottom)

    def _choose(self, which, *args):
        """The first forward (0) or backward (1) at a shape: time im2col + GEMM (and, for a small
        forward, the direct kernel) and cuDNN's candidate algorithms on this layer's blobs (as
        graph replays), and keep the fastest engine and algorithm (of algorithms timed within
        TIED_WITHIN of the fastest, the one of least workspace).  Param diffs are restored
        after (timing accumulates).  The choice is kept in the backend's on-disk cache, and
        taken from it when there."""
        engines = {}
        if which == 0:
            directions = ["BackwardData" if self.transposed else "Forward"]
            engines["cudnn"], engines["gemm"] = self._cudnn_forward, self._gemm_forward
            if self._direct_allowed():
                engines["direct"] = self._direct_forward
        else:
            to_image = "Forward" if self.transposed else "BackwardData"
            directions = ["BackwardFilter"] * self._want_params()[0] + [to_image] * any(args[1])
            engines["cudnn"], engines["gemm"] = self._cudnn_backward, self._gemm_backward
            if self._direct_grad_allowed(args[1]):
                engines["direct"] = self._direct_backward
        if not self.gemm_ok:
            del engines["gemm"]
        options = {direction: self.plan.options(direction) for direction in directions}
        key = json.dumps([self.backend.cudnn.policy, self.backend.cudnn.tf32, self.plan.key, self.transposed,
                          self.p.bias_term, len(args[0]), directions, sorted(engines)],
                         default=int)  # (numpy integers)
        if not self._recall(self.backend.choices.get(key), options, which, engines):
            self._time_choices(which, directions, options, engines, args)
            self.backend.choices.put(key, {"algos": {d: self.plan.algo[d][0] for d in directions},
                                           "engine": self.engines[which]})
        self._drop_unused_cores()
        return self.engines[which]

    def _gemm_cores(self):
        """The parts' im2col + GEMM buffers (_ColumnGemm), made when first needed."""
        if self.cores is None:
            self.cores = [_ColumnGemm(self, hi - lo, *self.core_geometry) for lo, hi in self.ranges]
        return self.cores

    def _drop_unused_cores(self):
        """Give back the column buffers where no direction chosen so far takes im2col + GEMM (a
        later choice that does makes them again): 12 MB in LeNet's b64, 47 MB at b256."""
        if "gemm" not in self.engines:
            self.cores = None

    def _direct_allowed(self):
        """Whether the backend's direct kernel may run this forward (timed against the others): a
        2-D convolution of (N, C, H, W) blobs, of at most DIRECT_WORK multiply-adds."""
        work = self.num * self.p.num_output * self.top_pixels * self.blobs[0].data[0].size
        return self.k.direct_conv_forward is not None and self._plain() and work <= DIRECT_WORK

    def _direct_grad_allowed(self, propagate_down):
        """Whether the backend's direct weight gradient may run this backward: no bottom
        gradient wanted, and filters of few taps (a first layer's)."""
        grad = self.k.direct_conv_weight_grad
        return (grad is not None and self._plain() and not any(propagate_down) and self._want_params()[0]
                and self.blobs[0].data[0].size <= grad.max_taps)

    def _plain(self):
        """A 2-D convolution (not transposed) of (N, C, H, W) blobs: what the direct kernels take."""
        return not self.transposed and self.axis == 1 and len(self.kernel) == 2

    def _recall(self, known, options, which, engines):
        """Take a cached choice (True), unless there is none, it is malformed, or it is no longer
        among the options (another workspace limit) or the engines offered now (gemm without its
        columns, direct where the backend has no such kernel)."""
        try:
            engine, algos = known["engine"], {d: [o for o in options[d] if o[0] == known["algos"][d]] for d in options}
        except (TypeError, KeyError):
            return False
        if engine not in engines or not all(algos.values()):
            return False
        for direction, (option, *_) in algos.items():
            self.plan.algo[direction] = option
        self.engines[which] = engine
        return True

    def _time_choices(self, which, directions, options, engines, args):
        """The other engines first, then (their columns given back, so that the candidates'
        workspaces do not come on top of them in the first run's peak) cuDNN's algorithms, each
        direction's and the chosen ones together with cuDNN's workspaces emptied first; after,
        the workspaces are as they were (Cudnn.resize_workspaces)."""
        cudnn = self.backend.cudnn
        held = cudnn.workspace_sizes()
        saved = [blob.diff.copy() for blob in self.blobs] if which else []
        times = {name: self._time(run, *args) for name, run in engines.items() if name != "cudnn"}
        self._drop_unused_cores()
        for direction in directions:
            cudnn.resize_workspaces((0, 0))
            candidates = [self._time(self._with_algo, direction, option, engines["cudnn"], args)
                          for option in options[direction]]
            self.plan.algo[direction] = _leanest(options[direction], candidates)
        cudnn.resize_workspaces((0, 0))
        times["cudnn"] = self._time(engines["cudnn"], *args)
        self.engines[which] = min(times, key=times.get)
        cudnn.resize_workspaces(held)
        for blob, diff in zip(self.blobs, saved):
            blob.diff[...] = diff

    def _with_algo(self, direction, option, run, args):
        self.plan.algo[direction] = option
        run(*args)

    def _time(self, run, *args):
        return self.backend.replay_ms(lambda: run(*args))

    def _cudnn_forward(self, bottom, top):
        plan, weights = self.plan, self.blobs[0].data
        self._columns_stale()  # the GEMM path's columns (if any) are not of this bottom
        bias = self.blobs[1].data if self.p.bias_term else None
        for b, t in zip(bottom, top):
            if not self.transposed:
                plan.forward(b.data, weights, t.data, bias)  # (the bias added in cuDNN's kernel, where it can)
            else:
                plan.backward_data(weights, b.data, t.data)
                if bias is not None:
                    plan.add_bias(bias, t.data, "image")

    def _direct_forward(self, bottom, top):
        self._columns_stale()
        bias = self.blobs[1].data if self.p.bias_term else None
        for b, t in zip(bottom, top):
            self.k.direct_conv_forward(b.data, self.blobs[0].data, bias, t.data, self.stride, self.pad,
                                       self.dilation, self.p.group)

    def _direct_backward(self, top, propagate_down, bottom):
        bias = self.blobs[1].diff if self._want_params()[1] else None
        for t, b in zip(top, bottom):  # (no bottom gradient: _direct_grad_allowed)
            self.k.direct_conv_weight_grad(b.data, t.diff, self.blobs[0].diff, bias, self.stride, self.pad,
                                           self.dilation, self.p.group)

    def _cudnn_backward(self, top, propagate_down, bottom):
        plan, weights = self.plan, self.blobs[0].data
        want_weights, want_bias = self._want_params()
        workspace = plan.chosen("BackwardFilter")[1] if want_weights else 0
        for i, (t, b) in enumerate(zip(top, bottom)):
            # param grads go aside (the rest of the pass does not wait for them) while the main
            # stream computes a bottom gradient; with none to compute, the weights' run on the main
            # stream (else idle, while the side may still be busy with the layers above: LeNet's
            # conv1 waited 15 us so), and the bias sums aside beside them (queued first: an aside
            # waits for the work queued before it)
            with self.backend.aside():
                if want_bias:
                    self._bias_grad(t.diff)
            with self.backend.aside(workspace, when=any(propagate_down)):
                if want_weights:
                    image, data = (t.diff, b.data) if self.transposed else (b.data, t.diff)
                    plan.backward_filter(image, data, self.blobs[0].diff)
            if propagate_down[i] and self.transposed:
                plan.forward(t.diff, weights, b.diff)
            elif propagate_down[i]:
                plan.backward_data(weights, t.diff, b.diff)

    def output_spatial(self, spatial):
        return conv_output_spatial(self, spatial)

    def _batch(self, blob_array, channels):
        """A blob's array as (num, channels, *spatial)."""
        return blob_array.reshape((self.num, channels) + blob_array.shape[self.axis + 1:])

    def _bias_grad(self, dy):
        """bias diff += top diff dy (n, C, *O) summed over n and space: two GEMVs with ones
        (Caffe's bias_multiplier); a reduction to C outputs ran 5x slower (LeNet, H100)."""
        c = self.p.num_output
        n = dy.size // (c * self.top_pixels)
        if self.channel_sums is None or self.channel_sums.size < n * c:
            self.channel_sums = self.xp.empty(n * c, self.dtype)
        sums = self.channel_sums[: n * c].reshape(n, c)
        self._channel_sums(dy, sums)
        self.add_row_sums(sums, self.blobs[1].diff)

    def _channel_sums(self, dy, sums):
        """sums (n, C) = dy (n, C, *O) summed over space (the first of _bias_grad's GEMVs)."""
        n, c = sums.shape
        self.k.matmul(dy.reshape(n, c, self.top_pixels), self.ones(self.top_pixels)[:, None], out=sums.reshape(n, c, 1))

    def _columns_stale(self):
        for core in self.cores or ():
            core.cols_ready = False

    def _want_params(self):
        down = self.param_propagate_down
        return down[0], self.p.bias_term and down[1]

    # *** im2col + GEMM over the batch's parts ***
    def _weight_target(self, core):
        """Where a part's weight gradient accumulates: the diff for the first part, a zeroed
        buffer of its own for the others (summed by _add_weight_parts after)."""
        diff = self.blobs[0].diff
        return core.weights(diff if core is self.cores[0] else core.zeroed_weight_part(diff))

    def _add_weight_parts(self):
        diff = self.blobs[0].diff
        for core in self.cores[1:]:
            diff += core.weight_part


@register
class ConvolutionLayer(_BaseConvolution):
    """y = W * x + b over the spatial axes after `axis`.  Honors convolution_param: num_output,
    bias_term, kernel_size/stride/pad/dilation (or kernel_h/_w, stride_h/_w, pad_h/_w), group,
    weight_filler, bias_filler, axis, force_nd_im2col (same result), engine (ignored).
    Backward reuses the columns of the last forward (bottom unchanged in between)."""

    type = "Convolution"
    legacy = "CONVOLUTION"

    def _gemm_forward(self, bottom, top):
        self._gemm_cores()
        self.backend.over_ranges(self.ranges, functools.partial(self.forward_part, bottom, top))

    def forward_part(self, bottom, top, part, lo, hi):
        core, bias = self.cores[part], self.blobs[1].data if self.p.bias_term else None
        filters = core.filters(self.blobs[0].data)
        for b, t in zip(bottom, top):
            x = _images(self._batch(b.data, self.channels), lo, hi)
            y = _images(self._batch(t.data, self.p.num_output), lo, hi)
            for a, z in core.chunks():
                rows = core.data_target(y[a:z])
                core.data_product(filters, core.columns(x[a:z]), rows)
                core.store_data(rows, y[a:z], bias)
        core.cols_ready = self.bottom_count == 1 and core.chunk == core.num

    def _gemm_backward(self, top, propagate_down, bottom):
        if len(self._gemm_cores()) > 1:  # a split batch, as the net runs a chain of such layers
            allocate_diffs(top + bottom + self.blobs)
            self.backend.over_ranges(self.ranges, functools.partial(self.backward_part, top, propagate_down, bottom))
            self.backward_parts_done(top, propagate_down, bottom)
            return
        core, (want_weights, want_bias) = self.cores[0], self._want_params()
        overlap = want_weights and core.can_overlap(len(bottom))
        for i, (t, b) in enumerate(zip(top, bottom)):
            dy, x = self._batch(t.diff, self.p.num_output), self._batch(b.data, self.channels)
            with self.backend.aside(when=overlap):  # as in _cudnn_backward
                if want_bias:
                    self._bias_grad(dy)
            dx = self._batch(b.diff, self.channels) if propagate_down[i] else None
            self._backward_chunks(core, dy, x, dx, core.weights(self.blobs[0].diff) if want_weights else None, overlap)

    def backward_part(self, top, propagate_down, bottom, part, lo, hi):
        core, (want_weights, want_bias) = self.cores[part], self._want_params()
        diff = self._weight_target(core) if want_weights else None
        for i, (t, b) in enumerate(zip(top, bottom)):
            dy = _images(self._batch(t.diff, self.p.num_output), lo, hi)
            if want_bias:  # this part's rows of the channel sums (_bias_grad's first GEMV)
                self._channel_sums(dy, self.part_sums[i, lo:hi])
            dx = _images(self._batch(b.diff, self.channels), lo, hi) if propagate_down[i] else None
            self._backward_chunks(core, dy, _images(self._batch(b.data, self.channels), lo, hi), dx, diff, False)

    def backward_parts_done(self, top, propagate_down, bottom):
        want_weights, want_bias = self._want_params()
        for sums in self.part_sums[: len(top)] if want_bias else ():  # _bias_grad's second GEMV
            self.add_row_sums(sums, self.blobs[1].diff)
        if want_weights:
            self._add_weight_parts()

    def _backward_chunks(self, core, dy, x, dx, diff, overlap):
        """The weight gradient (into diff, unless None) and the bottom gradient dx (unless None)
        of one part's images, chunk by chunk; `overlap`: the weight gradient aside (a GPU's)."""
        filters = None if dx is None else core.filters(self.blobs[0].data)  # (a copy in pixel rows)
        for lo, hi in core.chunks():
            rows = core.load_data(dy[lo:hi])
            with self.backend.aside(when=overlap and dx is not None) as aside:
                if diff is not None:
                    core.weight_grad(rows, core.columns(x[lo:hi], ready=core.cols_ready), diff)
            if dx is not None:
                target = core.image_target(dx[lo:hi], spare=aside)
                core.image_product(filters, rows, target)
                core.to_image(target, dx[lo:hi], spare=aside)
                core.cols_ready = False  # the column buffer may hold the bottom gradient


@register
class DeconvolutionLayer(_BaseConvolution):
    """The transpose of Convolution (its forward is Convolution's backward to the input);
    weights (C_in, num_output/group, *kernel); output = stride*(in-1) + dilation*(k-1) + 1 -
    2*pad.  Honors the same convolution_param fields as Convolution."""

    type = "Deconvolution"
    legacy = "DECONVOLUTION"
    transposed = True

    def output_spatial(self, spatial):
        out = tuple(s * (i - 1) + d * (k - 1) + 1 - 2 * p
                    for i, k, s, p, d in zip(spatial, self.kernel, self.stride, self.pad, self.dilation))
        if any(o < 1 for o in out):
            self.fail(f"output size {out} from input {tuple(spatial)} is empty", ShapeError)
        return out

    def _gemm_forward(self, bottom, top):
        self._gemm_cores()
        self.backend.over_ranges(self.ranges, functools.partial(self.forward_part, bottom, top))

    def forward_part(self, bottom, top, part, lo, hi):
        core = self.cores[part]
        filters = core.filters(self.blobs[0].data)
        for b, t in zip(bottom, top):
            x = _images(self._batch(b.data, self.channels), lo, hi)
            y = _images(self._batch(t.data, self.p.num_output), lo, hi)
            for a, z in core.chunks():
                col = core.image_target(y[a:z])
                core.image_product(filters, core.load_data(x[a:z]), col)
                core.to_image(col, y[a:z])
            if self.p.bias_term:
                y.reshape(hi - lo, self.p.num_output, -1)[...] += self.blobs[1].data[:, None]

    def _gemm_backward(self, top, propagate_down, bottom):
        self._gemm_cores()
        want_weights, want_bias = self._want_params()
        for t in top if want_bias else ():
            self._bias_grad(self._batch(t.diff, self.p.num_output))
        allocate_diffs(top + bottom + self.blobs)
        self.backend.over_ranges(self.ranges, functools.partial(self.backward_part, top, propagate_down, bottom))
        if want_weights:
            self._add_weight_parts()

    def backward_part(self, top, propagate_down, bottom, part, lo, hi):
        core = self.cores[part]
        filters = core.filters(self.blobs[0].data) if any(propagate_down) else None
        diff = self._weight_target(core) if self._want_params()[0] else None
        for i, (t, b) in enumerate(zip(top, bottom)):
            dy = _images(self._batch(t.diff, self.p.num_output), lo, hi)
            x = _images(self._batch(b.data, self.channels), lo, hi)
            dx = _images(self._batch(b.diff, self.channels), lo, hi) if propagate_down[i] else None
            for a, z in core.chunks():
                col = core.columns(dy[a:z])
                if diff is not None:
                    core.weight_grad(core.load_data(x[a:z]), col, diff)
                if dx is not None:
                    rows = core.data_target(dx[a:z])
                    core.data_product(filters, col, rows)
                    core.store_data(rows, dx[a:z])


@register
class Im2colLayer(Layer):
    """Caffe's im2col as a layer: top (N, C*prod(kernel), *out), rows ordered (c, k...).
    Honors convolution_param: kernel_size/stride/pad/dilation (or the _h/_w forms), axis,
    force_nd_im2col (same result), engine (ignored)."""

    type = "Im2col"
    legacy = "IM2COL"
    param = "convolution_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        self.reject_fields(self.p, "convolution_param",
                           ("num_output", "bias_term", "group", "weight_filler", "bias_filler"))
        axes = bottom[0].num_axes
        if not -axes <= self.p.axis < axes:
            self.fail(f"convolution_param.axis: {self.p.axis} out of range for {axes} axes")
        self.axis = self.p.axis % axes
        self.kernel, self.stride, self.pad, self.dilation = spatial_params(self, axes - self.axis - 1)
        if self.kernel is None:
            self.fail("convolution_param.kernel_size: give it once or once per spatial axis")
        self.shape = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + len(self.kernel):
            self.fail(f"bottom shape {shape} does not have {len(self.kernel)} spatial axes after "
                      f"axis {self.axis}", ShapeError)
        spatial = shape[self.axis + 1:]
        out = conv_output_spatial(self, spatial)
        top[0].reshape(shape[: self.axis] + (shape[self.axis] * math.prod(self.kernel),) + out)
        if shape != self.shape:
            self.shape, self.num = shape, math.prod(shape[: self.axis])
            self.image = (self.num,) + shape[self.axis:]
            size = self.k.im2col_workspace_size(self.image, self.pad, False)
            self.work = self.xp.empty(size, self.dtype) if size else None

    def forward(self, bottom, top):
        self.k.im2col(bottom[0].data.reshape(self.image), top[0].data, self.kernel, self.stride,
                      self.pad, self.dilation, False, self.work)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.k.col2im(top[0].diff, bottom[0].diff.reshape(self.image), self.kernel, self.stride,
                          self.pad, self.dilation, False, self.work)


# *** pooling ***
def pooled_size(layer, spatial, kernel, stride, pad, ceil=True):
    """Caffe's pooled output size per axis: ceil (or floor) of (size + 2 pad - kernel) / stride,
    plus one, less one when padded and the last window would start in the padding."""
    out = []
    for size, k, s, p in zip(spatial, kernel, stride, pad):
        span = size + 2 * p - k  # may be negative: a kernel wider than the input is clipped to it
        count = (-(-span // s) if ceil else span // s) + 1
        if count < 1:
            layer.fail(f"kernel {tuple(kernel)} leaves no output of the padded input {tuple(spatial)} "
                       f"+ 2 * {tuple(pad)}", ShapeError)
        if any(pad) and (count - 1) * s >= size + p:
            count -= 1
        if (count - 1) * s - p >= size:  # Caffe would pool an empty window here (-FLT_MAX or NaN)
            layer.fail(f"the last pooling window starts past the input (size {size}, kernel {k}, "
                       f"stride {s}, pad {p})", ShapeError)
        out.append(count)
    return tuple(out)


class _Pooler:
    """One pooling geometry on one input shape with its buffers (used by Pooling, SPP, LRN).
    MAX and AVE run the batch's parts side by side (backend.batch_ranges), each with its share
    of the workspace; STOCHASTIC draws its numbers for the whole batch, in one part."""

    def __init__(self, layer, method, x_shape, kernel, stride, pad, ceil=True):
        self.layer, self.method, self.k = layer, method, layer.k
        self.kernel, self.stride, self.pad = tuple(kernel), tuple(stride), tuple(pad)
        self.y_shape = x_shape[:2] + pooled_size(layer, x_shape[2:], kernel, stride, pad, ceil)
        num = x_shape[0]
        self.ranges = layer.backend.batch_ranges(num) if method != _POOL.STOCHASTIC else [(0, num)]
        sizes = [self.k.pool_workspace_size((hi - lo, *x_shape[1:]), (hi - lo, *self.y_shape[1:]), self.kernel,
                                            self.stride, self.pad) for lo, hi in self.ranges]
        self.work_ends = list(itertools.accumulate(sizes))
        xp = layer.xp
        self.work = xp.empty(self.work_ends[-1], layer.dtype) if self.work_ends[-1] else None
        self.index = xp.empty(self.y_shape, np.int32) if method != _POOL.AVE else None
        self.rand = xp.empty(self.y_shape, layer.dtype) if method == _POOL.STOCHASTIC else None

    def _work(self, part):
        if self.work is None or len(self.ranges) == 1:
            return self.work
        return self.work[self.work_ends[part - 1] if part else 0: self.work_ends[part]]

    def forward(self, x, y, mask=None):
        if self.method == _POOL.STOCHASTIC and self.layer.phase == caffe_pb2.TRAIN:
            self.layer.backend.rng.random(dtype=self.layer.dtype, out=self.rand)
        index = self.index if mask is None else mask
        self.layer.backend.over_ranges(self.ranges, functools.partial(self.forward_part, x, y, index))

    def forward_part(self, x, y, index, part, lo, hi):
        k, geometry, work = self.k, (self.kernel, self.stride, self.pad), self._work(part)
        x, y = _images(x, lo, hi), _images(y, lo, hi)
        if self.method == _POOL.MAX:
            k.max_pool_forward(x, y, _images(index, lo, hi), *geometry, work)
        elif self.method == _POOL.AVE:
            k.ave_pool_forward(x, y, *geometry, work)
        elif self.layer.phase == caffe_pb2.TRAIN:
            k.stochastic_pool_forward_train(x, y, index, self.rand, self.kernel, self.stride, work)
        else:
            k.stochastic_pool_forward_test(x, y, self.kernel, self.stride, work)

    def backward(self, dy, dx, mask=None):
        if self.method == _POOL.STOCHASTIC and self.layer.phase != caffe_pb2.TRAIN:
            self.layer.fail("STOCHASTIC pooling has no backward in the TEST phase (Caffe's would use "
                            "indices from an earlier TRAIN pass)", NetError)
        index = self.index if mask is None else mask
        self.layer.backend.over_ranges(self.ranges, functools.partial(self.backward_part, dy, dx, index))

    def backward_part(self, dy, dx, index, part, lo, hi):
        k, geometry, work = self.k, (self.kernel, self.stride, self.pad), self._work(part)
        dy, dx = _images(dy, lo, hi), _images(dx, lo, hi)
        if self.method == _POOL.MAX:
            k.max_pool_backward(dy, _images(index, lo, hi), dx, *geometry, work)
        elif self.method == _POOL.AVE:
            k.ave_pool_backward(dy, dx, *geometry, work)
        else:
            k.stochastic_pool_backward(dy, index, dx, self.kernel, self.stride, work)


def _check_pool_method(layer, method, pad, kernel):
    if any(pad) and method == _POOL.STOCHASTIC:
        layer.fail("padding is implemented only for MAX and AVE pooling")
    if kernel is not None and any(p >= k for p, k in zip(pad, kernel)):
        layer.fail(f"pad {tuple(pad)} must be smaller than the kernel {tuple(kernel)}")


def _check_4d(layer, blob):
    if blob.num_axes != 4:
        layer.fail(f"input must have 4 axes (num, channels, height, width), got shape {blob.shape}",
                   ShapeError)


@register
class PoolingLayer(Layer):
    """MAX, AVE or STOCHASTIC pooling of (N, C, H, W).  Honors pooling_param: pool,
    kernel_size (or kernel_h/_w), stride (_h/_w), pad (_h/_w), global_pooling, round_mode,
    engine (ignored).  MAX may have a second top: the argmax as a flat h*W+w index (float).
    Differs from Caffe: a last window that would start past the input is refused (Caffe pools
    an empty window there: -FLT_MAX or NaN); STOCHASTIC, which Caffe has on the GPU only,
    draws from [0, 1) rather than (0, 1] and refuses a TEST-phase backward."""

    type = "Pooling"
    legacy = "POOLING"
    param = "pooling_param"
    exact_bottoms = 1
    min_tops, max_tops = 1, 2

    def setup(self, bottom, top):
        p = self.p
        if len(top) > 1 and p.pool != _POOL.MAX:
            self.fail("only MAX pooling has a second top (the argmax mask)", NetError)
        self.kernel, self.stride, self.pad, _ = spatial_params(self, 2)
        if p.global_pooling:
            if self.kernel is not None:
                self.fail("pooling_param: with global_pooling the kernel size cannot be given")
            if any(self.pad) or any(s != 1 for s in self.stride):
                self.fail("pooling_param: with global_pooling only pad 0 and stride 1 are allowed")
        elif self.kernel is None:
            self.fail("pooling_param: give kernel_size, or both kernel_h and kernel_w")
        _check_pool_method(self, p.pool, self.pad, self.kernel)
        self.pooler, self.shape = None, None

    def reshape(self, bottom, top):
        _check_4d(self, bottom[0])
        shape = bottom[0].shape
        if shape != self.shape:
            kernel = shape[2:] if self.p.global_pooling else self.kernel
            ceil = self.p.round_mode == _POOL.CEIL
            self.pooler = _Pooler(self, self.p.pool, shape, kernel, self.stride, self.pad, ceil)
            self.batch_parts = self.pooler.ranges if len(self.pooler.ranges) > 1 else None
            self.shape = shape
        for blob in top:
            blob.reshape(self.pooler.y_shape)

    def forward(self, bottom, top):
        self.pooler.forward(bottom[0].data, top[0].data, self._mask(top))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.pooler.backward(top[0].diff, bottom[0].diff, self._mask(top))

    def forward_part(self, bottom, top, part, lo, hi):
        self.pooler.forward_part(bottom[0].data, top[0].data, self._mask(top), part, lo, hi)

    def backward_part(self, top, propagate_down, bottom, part, lo, hi):
        if propagate_down[0]:
            self.pooler.backward_part(top[0].diff, bottom[0].diff, self._mask(top), part, lo, hi)

    def _mask(self, top):
        """Where the argmax goes: the second top, else the pooler's own index (None: AVE)."""
        return top[1].data if len(top) > 1 else self.pooler.index


@register
class SPPLayer(Layer):
    """Spatial pyramid pooling: level l pools into 2^l x 2^l bins with kernel and stride
    ceil(H / 2^l) and Caffe's SPP padding; the levels are flattened and concatenated along
    axis 1, giving (N, C * sum 4^l) ((N, C, 1, 1) for one level).  Honors spp_param:
    pyramid_height, pool, engine (ignored)."""

    type = "SPP"
    param = "spp_param"
    exact_bottoms = exact_tops = 1

    def setup(self, bottom, top):
        if self.p.pyramid_height < 1:
            self.fail(f"spp_param.pyramid_height: must be > 0, got {self.p.pyramid_height}")
        self.levels, self.shape = [], None

    def reshape(self, bottom, top):
        _check_4d(self, bottom[0])
        shape = bottom[0].shape
        if shape != self.shape:
            self.levels = [self._level(shape, level) for level in range(self.p.pyramid_height)]
            self.sizes = [math.prod(pool.y_shape[1:]) for pool in self.levels]
            self.ys = [self.xp.empty(pool.y_shape, self.dtype) for pool in self.levels]
            self.dx = self.xp.empty(shape, self.dtype)
            self.shape = shape
        single = self.p.pyramid_height == 1
        top[0].reshape(self.levels[0].y_shape if single else (shape[0], sum(self.sizes)))

    def _level(self, shape, level):
        """Caffe's SPP GetPoolingParam: kernel = stride = ceil(size / bins), pad = (kernel * bins
        - size + 1) // 2."""
        bins = 2 ** level
        kernel = tuple(-(-size // bins) for size in shape[2:])
        pad = tuple((k * bins - size + 1) // 2 for k, size in zip(kernel, shape[2:]))
        _check_pool_method(self, self.p.pool, pad, kernel)
        return _Pooler(self, self.p.pool, shape, kernel, kernel, pad)

    def forward(self, bottom, top):
        if self.p.pyramid_height == 1:
            self.levels[0].forward(bottom[0].data, top[0].data)
            return
        start = 0
        for pool, y, size in zip(self.levels, self.ys, self.sizes):
            pool.forward(bottom[0].data, y)
            top[0].data[:, start: start + size] = y.reshape(y.shape[0], size)
            start += size

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.p.pyramid_height == 1:
            self.levels[0].backward(top[0].diff, bottom[0].diff)
            return
        start, dx = 0, bottom[0].diff
        for i, (pool, dy, size) in enumerate(zip(self.levels, self.ys, self.sizes)):
            dy.reshape(dy.shape[0], size)[...] = top[0].diff[:, start: start + size]
            pool.backward(dy, dx if i == 0 else self.dx)
            if i:
                dx += self.dx
            start += size


# *** normalization and cropping ***
@register
class LRNLayer(Layer):
    """Local response normalization of (N, C, H, W).  ACROSS_CHANNELS: y = x / (k + alpha/n *
    sum of x^2 over n neighbouring channels)^beta.  WITHIN_CHANNEL: y = x / (1 + alpha * (sum
    of x^2 over an n x n zero-padded window) / n^2)^beta, as Caffe builds it from AVE pooling
    (k is not used there).  Honors lrn_param: local_size (odd), alpha, beta, norm_region, k,
    engine (ignored)."""

    type = "LRN"
    legacy = "LRN"
    param = "lrn_param"
    exact_bottoms = exact_tops = 1
    backward_reads_top = True

    def setup(self, bottom, top):
        if self.p.local_size % 2 != 1:
            self.fail(f"lrn_param.local_size: must be odd, got {self.p.local_size}")
        self.across = self.p.norm_region == _LRN.ACROSS_CHANNELS
        self.shape = None

    def reshape(self, bottom, top):
        _check_4d(self, bottom[0])
        shape = bottom[0].shape
        top[0].reshape(shape)
        if shape == self.shape:
            return
        self.shape, n = shape, self.p.local_size
        self.scale = self.xp.empty(shape, self.dtype)
        if self.across:
            self.work = self.xp.empty(self.k.lrn_workspace_size(shape, n), self.dtype)
        else:
            pad = ((n - 1) // 2,) * 2
            self.pooler = _Pooler(self, _POOL.AVE, shape, (n, n), (1, 1), pad)
            self.tmp = self.xp.empty(shape, self.dtype)

    def forward(self, bottom, top):
        p, x, y = self.p, bottom[0].data, top[0].data
        if self.across:
            self.k.lrn_across_forward(x, y, self.scale, p.local_size, p.alpha, p.beta, p.k, self.work)
            return
        xp = self.xp
        xp.multiply(x, x, out=self.tmp)
        self.pooler.forward(self.tmp, self.scale)  # mean of x^2 over the window, divisor n^2
        self.scale *= p.alpha
        self.scale += 1
        xp.power(self.scale, -p.beta, out=y)
        y *= x

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        p, x, dx, dy = self.p, bottom[0].data, bottom[0].diff, top[0].diff
        if self.across:
            self.k.lrn_across_backward(x, top[0].data, dy, self.scale, dx, p.local_size, p.alpha, p.beta,
                                       self.work)
            return
        # y = x s^-beta with s = 1 + alpha P(x^2): dx = dy s^-beta + 2x P^T(-alpha beta dy x s^(-beta-1))
        xp, tmp = self.xp, self.tmp
        xp.power(self.scale, -p.beta - 1, out=tmp)
        tmp *= dy
        tmp *= x
        tmp *= -p.alpha * p.beta
        self.pooler.backward(tmp, dx)
        dx *= x
        dx *= 2
        xp.power(self.scale, -p.beta, out=tmp)
        tmp *= dy
        dx += tmp


@register
class CropLayer(Layer):
    """Crops bottom 0 to the shape of bottom 1 on every axis from `axis` on, starting at the
    offsets.  Honors crop_param: axis, offset (none, one for all, or one per cropped axis).
    Only bottom 0 gets a gradient; bottom 1 (which only gives the shape) gets zeros."""

    type = "Crop"
    param = "crop_param"
    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom, top):
        axes = bottom[0].num_axes
        if not -axes <= self.p.axis < axes:
            self.fail(f"crop_param.axis: {self.p.axis} out of range for {axes} axes")
        self.start = self.p.axis % axes
        offsets = len(self.p.offset)
        if offsets > 1 and self.start + offsets != axes:
            self.fail(f"crop_param.offset: give one value or one per cropped axis ({axes - self.start}), "
                      f"got {offsets}")

    def reshape(self, bottom, top):
        big, small = bottom[0].shape, bottom[1].shape
        if len(small) < len(big):
            self.fail(f"bottom 1 shape {small} has fewer axes than bottom 0 shape {big}", ShapeError)
        offsets = list(self.p.offset) or [0]
        self.slices = tuple(slice(None) for _ in range(self.start))
        for i in range(self.start, len(big)):
            offset = offsets[0] if len(offsets) == 1 else offsets[i - self.start]
            if big[i] - offset < small[i]:
                self.fail(f"cannot crop axis {i} of size {big[i]} to {small[i]} at offset {offset}",
                          ShapeError)
            self.slices += (slice(offset, offset + small[i]),)
        top[0].reshape(big[: self.start] + small[self.start: len(big)])

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.slices] = top[0].diff
        if propagate_down[1]:
            bottom[1].diff[...] = 0
