"""Layer base class and the registry of layer types by Caffe name.

Life cycle, as Caffe's: `setup_all` = check blob counts -> `setup` (read params, make
`self.blobs`) -> `reshape` (size the tops) -> loss weights.  Then `forward(bottom, top)` and
`backward(top, propagate_down, bottom)`.  Gradient rules, as Caffe's: param diffs *accumulate*
(the solver clears them), bottom diffs are *overwritten*.

A layer is written once against `self.xp` (NumPy or CuPy) and the named primitives `self.k`;
it never asks which backend it runs on.  Only `setup`/`reshape` may allocate.
"""

import copy

import numpy as np

from espresso import graphs
from espresso.blob import Blob
from espresso.errors import LayerParamError, NetError, did_you_mean
from espresso.filler import fill

_REGISTRY = {}
_ONES = {}  # (backend, dtype) -> a vector of ones, grown as needed


def register(cls):
    """Class decorator: make `cls` the implementation of Caffe type `cls.type`."""
    if cls.type in _REGISTRY:
        raise RuntimeError(f"layer type '{cls.type}' registered twice")
    _REGISTRY[cls.type] = cls
    return cls


def layer_class(type_name, where=""):
    import espresso.layers  # noqa: F401  (registers every built-in layer)

    cls = _REGISTRY.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY))
        hint = did_you_mean(type_name, _REGISTRY)
        raise NetError(f"{where}unknown layer type '{type_name}'{hint} (known: {known})")
    return cls


def known_types():
    import espresso.layers  # noqa: F401

    return sorted(_REGISTRY)


def legacy_types():
    """V1 enum name -> type name, from each class's `legacy` attribute."""
    import espresso.layers  # noqa: F401

    return {cls.legacy: cls.type for cls in _REGISTRY.values() if cls.legacy}


class Layer:
    type = None  # the Caffe type string, e.g. "InnerProduct"
    param = None  # the LayerParameter field this layer reads, e.g. "inner_product_param"
    legacy = None  # the V1 LayerType enum name, e.g. "INNER_PRODUCT"
    exact_bottoms = min_bottoms = max_bottoms = None
    exact_tops = min_tops = max_tops = None
    equal_bottoms_tops = False
    inplace = False  # forward and backward stay correct with top[i] is bottom[i]
    backward_reads_top = False  # backward reads top data: a later in-place layer must not overwrite it
    is_loss = False  # Caffe's LossLayer: loss_weight defaults to 1 on top 0
    # forward/backward only queue device work into preallocated memory (no host reads, no
    # host-to-device copies, no Python state that must change per call): a CUDA graph can hold it
    capturable = True
    # the net runs this layer's backward (Caffe's layer_need_backward, set once the net is
    # built): when False, forward keeps nothing for a backward pass (a TEST net's copies)
    backward_runs = True
    # (layer index, blob): an earlier layer's blob that holds this layer's bottom values as that
    # layer wrote them, which forward may read instead of copying the bottom (see
    # Net._decide_per_call); bottom_copy is that blob in the current forward, else None
    copy_source = bottom_copy = None
    # Set by the net where a layer's forward kernel can also do the work of the layers after it
    # (a BatchNorm: its in-place Scale, then an in-place ReLU; an Eltwise SUM: its ReLU; see
    # Builder._fold_layers): on the leader, fold_followers counts them; on each of them,
    # fold_leader is how many layers back the leader is.  `fold` says what happens in the current
    # forward (Net._decide_per_call decides per call: the layers that run in it with no callbacks
    # fold): on the leader, how many it does; on a follower, whether its work was done for it
    fold_followers = fold_leader = fold = 0

    def __init__(self, layer_param, backend, phase, dtype=np.float32, source=""):
        self.lp = copy.deepcopy(layer_param)  # Caffe copies; setup may add defaults to it
        self.p = getattr(self.lp, self.param) if self.param else None
        self.backend, self.xp, self.k = backend, backend.xp, backend.k
        self.phase, self.dtype = phase, np.dtype(dtype)
        self.source = source  # "file:line: " of the layer's definition, or ""
        self.blobs = []
        self.param_propagate_down = []
        self.loss_weights = []

    @property
    def name(self):
        return self.lp.name

    @property
    def where(self):
        return f"{self.source}layer '{self.lp.name}' ({self.type})"

    def fail(self, message, error=LayerParamError):
        raise error(f"{self.where}: {message}")

    # *** the life cycle ***
    def setup_all(self, bottom, top):
        """Caffe's Layer::SetUp."""
        self.check_blob_counts(bottom, top)
        self.setup(bottom, top)
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError

    def forward(self, bottom, top):
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.fail("cannot backpropagate to its inputs", NetError)

    # A layer that splits its batch into parts run side by side (backend.batch_ranges: a CPU's
    # threads) may set batch_parts to those ranges in reshape (None: it runs whole, or not in a
    # chain).  The net runs a chain of such layers with the same ranges as one split, each
    # part's images through all of them on one thread (forward_part, backward_part), then
    # backward_parts_done gathers what the parts left aside (Net.forward_layers, backward_range)
    batch_parts = None
    # backward_part reads every image's top diff (InnerProduct's param gradients): the layer
    # starts a backward chain, since the layers above it in one would still be writing them
    parts_read_whole_top_diff = False

    def forward_part(self, bottom, top, part, lo, hi):
        raise NotImplementedError

    def backward_part(self, top, propagate_down, bottom, part, lo, hi):
        raise NotImplementedError

    def backward_parts_done(self, top, propagate_down, bottom):
        pass

    def allow_force_backward(self, bottom_index):
        return True

    def cursor(self):
        """Where this layer is in its dataset and its random generators (JSON values, saved with
        a snapshot; see espresso/cursor.py), or None for a layer that reads none."""
        return None

    def seek(self, cursor):
        """Continue from a cursor() that a snapshot saved."""

    def device_problem(self):
        """(device array, error(*values)) of a check a device recorded instead of raising (a
        row whose first value is not 0 is a problem; see Net.check_problems), or None."""
        return None

    # *** checks and helpers ***
    def check_blob_counts(self, bottom, top):
        nb, nt = len(bottom), len(top)
        rules = [
            (self.exact_bottoms, nb == self.exact_bottoms, f"takes {self.exact_bottoms} bottom blob(s)"),
            (self.min_bottoms, nb >= (self.min_bottoms or 0), f"takes at least {self.min_bottoms} bottom blob(s)"),
            (self.max_bottoms, nb <= (self.max_bottoms or 0), f"takes at most {self.max_bottoms} bottom blob(s)"),
            (self.exact_tops, nt == self.exact_tops, f"produces {self.exact_tops} top blob(s)"),
            (self.min_tops, nt >= (self.min_tops or 0), f"produces at least {self.min_tops} top blob(s)"),
            (self.max_tops, nt <= (self.max_tops or 0), f"produces at most {self.max_tops} top blob(s)"),
        ]
        for limit, ok, text in rules:
            if limit is not None and not ok:
                self.fail(f"{text}, got {nb} bottom(s) and {nt} top(s)", NetError)
        if self.equal_bottoms_tops and nb != nt:
            self.fail(f"needs as many tops as bottoms, got {nb} and {nt}", NetError)

    def set_loss_weights(self, top):
        """Caffe's SetLossWeights: a loss top's diff holds its weight, which scales the gradient."""
        if self.is_loss and not self.lp.loss_weight:
            self.lp.loss_weight.append(1.0)
        weights = list(self.lp.loss_weight)
        if weights and len(weights) != len(top):
            self.fail(f"loss_weight must be unspecified or given once per top blob "
                      f"({len(top)} tops, {len(weights)} loss_weight)", NetError)
        self.loss_weights = weights or [0.0] * len(top)
        for blob, weight in zip(top, self.loss_weights):
            if weight:
                blob.diff[...] = weight

    def reject_fields(self, message, path, names):
        """Refuse the (singular) fields `names` of `message`, found at `path`, where set: this
        layer does not implement them, and nothing is silently ignored."""
        for name in names:
            if message.HasField(name):
                self.fail(f"{path}.{name} is not supported by {self.type}")

    def canonical_axis(self, blob, axis, field):
        """Caffe's CanonicalAxisIndex (negative axes count from the end), failing with the
        layer's name and the parameter field."""
        n = blob.num_axes
        if not -n <= axis < n:
            self.fail(f"{field}: axis {axis} out of range for a bottom of shape {blob.shape}")
        return axis % n

    def ones(self, n):
        """n ones on this layer's backend and dtype, from a vector shared by all layers (sized
        in reshape).  It moves when it grows: graphs captured with the old one are void, and the
        old one goes only once no queued work (on either stream) can still read it."""
        key = (self.backend, self.dtype)
        if key not in _ONES or _ONES[key].size < n:
            if key in _ONES:
                self.backend.synchronize()
            _ONES[key] = self.xp.ones(max(n, 1024), self.dtype)
            graphs.invalidate(self.backend)
        return _ONES[key][:n]

    def add_row_sums(self, rows, out):
        """out (N,) += rows (M, N) summed over M, as a GEMV with ones (Caffe's bias_multiplier):
        several times faster than a reduction with few outputs, on the CPU and the GPU."""
        self.k.matmul(self.ones(rows.shape[0])[None, :], rows, out=out.reshape(1, -1), accumulate=True)

    def new_blob(self, shape, filler=None):
        """A parameter or workspace blob on this layer's backend and dtype."""
        blob = Blob(shape, self.dtype, self.backend)
        if filler is not None:
            fill(blob, filler)
        return blob

    def __repr__(self):
        lp = vars(self).get("lp")  # (a Python layer's user object has none)
        return f"<{type(self).__name__} '{lp.name}'>" if lp else super().__repr__()
