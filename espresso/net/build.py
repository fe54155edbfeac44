"""Building a Net from a NetParameter, as Caffe's Net::Init builds it.

Steps (Caffe's names): FilterNet (include/exclude rules by phase, level, stage) -> InsertSplits
(a blob read by several layers gets a Split, so gradients add up) -> per layer AppendBottom /
AppendTop (in place when top[i] == bottom[i]) / SetUp / AppendParam (sharing by param name,
lr_mult, decay_mult) -> the backward analysis (which layers and blobs need gradients) -> the
in-place checks.  The first two are functions of NetParameters; the rest is `Builder`, whose
results the Net keeps (BUILT).
"""

import collections
import os

from espresso.blob import Blob
from espresso.errors import MemoryLimitError, NetError, ShapeError, did_you_mean
from espresso.layer import layer_class
from espresso.proto import caffe_pb2
from espresso.proto.text import read_net_text
from espresso.proto.upgrade import upgrade_net
from espresso.runtime import format_bytes, memory_limit

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
# what a Builder hands the Net: Caffe's layers_, layer_names_, blobs_ (by name), bottom_id_vecs_,
# top_id_vecs_, bottom_vecs_, top_vecs_, the need-backward flags, learnable_params_ with their
# multipliers, param owners (by id of each layer's param blob), net inputs and outputs
BUILT = ("engine_layers", "_layer_names", "_blobs", "_bottom_ids", "_top_ids", "bottom_vecs", "top_vecs",
         "bottom_need_backward", "layer_need_backward", "blob_need_backward", "learnable_params",
         "params_lr", "params_weight_decay", "_param_owner_of", "_input_names", "outputs")


# *** the layer list ***
def load_net_param(network):
    """(NetParameter, per-layer source lines, file name) from a path or a NetParameter."""
    if isinstance(network, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(network)
        return upgrade_net(param), [None] * (len(param.layer) + len(param.layers)), ""
    path = os.fspath(network)
    param, lines = read_net_text(path)
    return upgrade_net(param, lines), lines, os.path.basename(path)


def state_meets_rule(state, rule):
    """Caffe's Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(stage not in state.stage for stage in rule.stage):
        return False
    return not any(stage in state.stage for stage in rule.not_stage)


def filter_layers(param, lines, source):
    """Caffe's FilterNet: the (layer, line) pairs whose rules the net's state meets."""
    kept = []
    for layer, line in zip(param.layer, lines):
        if layer.include and layer.exclude:
            raise NetError(f"{where(source, line)}layer '{layer.name}': "
                           "specify either include rules or exclude rules, not both")
        included = not layer.include
        if any(state_meets_rule(param.state, rule) for rule in layer.exclude):
            included = False
        if any(state_meets_rule(param.state, rule) for rule in layer.include):
            included = True
        if included:
            kept.append((layer, line))
    return kept


def where(source, line):
    if source and line:
        return f"{source}:{line}: "
    return f"{source}: " if source else ""


def split_layer_name(layer_name, blob_name, top_index):
    return f"{blob_name}_{layer_name}_{top_index}_split"


def split_blob_name(layer_name, blob_name, top_index, split_index):
    return f"{blob_name}_{layer_name}_{top_index}_split_{split_index}"


def insert_splits(layers):
    """Caffe's InsertSplits over (layer, line) pairs: a top read by several bottoms (or read once
    and also weighted as a loss) feeds a Split layer whose tops go one to each reader."""
    last_top, readers, loss_weight, producer_name = {}, collections.Counter(), {}, {}
    for i, (layer, _) in enumerate(layers):
        for blob in layer.bottom:
            if blob in last_top:
                readers[last_top[blob]] += 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
        producer_name[i] = layer.name
        for j, weight in enumerate(layer.loss_weight[: len(layer.top)]):
            if weight:
                readers[(i, j)] += 1
                loss_weight[(i, j)] = weight
    out, next_split, last_top = [], collections.Counter(), {}
    for i, (layer, line) in enumerate(layers):
        layer = _copy(layer)
        for k, blob in enumerate(layer.bottom):
            source = last_top.get(blob)
            if source is not None and readers[source] > 1:
                layer.bottom[k] = split_blob_name(producer_name[source[0]], blob, source[1], next_split[source])
                next_split[source] += 1
        out.append((layer, line))
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
            if readers[(i, j)] > 1:
                out.append((_split_layer(layer.name, blob, j, readers[(i, j)], loss_weight.get((i, j))), line))
                if (i, j) in loss_weight:
                    del layer.loss_weight[:]
                    next_split[(i, j)] += 1
    return out


def _copy(layer):
    copy = caffe_pb2.LayerParameter()
    copy.CopyFrom(layer)
    return copy


def _split_layer(layer_name, blob_name, top_index, count, loss_weight):
    split = caffe_pb2.LayerParameter(name=split_layer_name(layer_name, blob_name, top_index), type="Split")
    split.bottom.append(blob_name)
    for k in range(count):
        split.top.append(split_blob_name(layer_name, blob_name, top_index, k))
        if loss_weight:
            split.loss_weight.append(loss_weight if k == 0 else 0.0)
    return split


class Builder:
    """Net::Init's per-layer steps and the checks after them, for layers on `backend`."""

    def __init__(self, phase, force_backward, backend, dtype, allow_python):
        self.phase, self.force_backward = phase, force_backward
        self.backend, self.dtype, self.allow_python = backend, dtype, allow_python
        self.engine_layers, self._layer_names = [], []
        self._blobs = collections.OrderedDict()
        self._bottom_ids, self._top_ids = [], []
        self.bottom_need_backward, self.layer_need_backward = [], []
        self.blob_need_backward = {}
        self.learnable_params, self.params_lr, self.params_weight_decay = [], [], []
        self._param_owner_of, self._param_names = {}, {}
        self._lr_given, self._decay_given = [], []
        self._writers = {}  # blob id -> ids of the layers writing it (its producer, then in-place layers)
        self._input_names = []
        self.limit, self.nbytes, self._counted = memory_limit(backend), 0, set()

    def build(self, layers, source):
        """Set up the (layer, line) pairs; {name: value} of BUILT."""
        available = []
        for layer_id, (layer_param, line) in enumerate(layers):
            self._append_layer(layer_id, layer_param, where(source, line), available)
        self.outputs = sorted(set(available))  # Caffe keeps them in a std::set
        self.bottom_vecs = [self.blobs_of(ids) for ids in self._bottom_ids]
        self.top_vecs = [self.blobs_of(ids) for ids in self._top_ids]
        self._analyze_backward()
        for layer, runs in zip(self.engine_layers, self.layer_need_backward):
            layer.backward_runs = runs
        self._share_normalized_copies()
        self._check_inplace()
        return {name: getattr(self, name) for name in BUILT}

    def _setup(self, layer, bottom, top):
        """Caffe's SetUp, its memory counted: the net is refused, naming the layer and its largest
        blob, once its blobs need more than the memory limit (the one it had when the build began)."""
        try:
            layer.setup_all(bottom, top)
        except MemoryLimitError as e:
            raise MemoryLimitError(f"{layer.where}: {e}") from None
        except MemoryError as e:  # a buffer of its own, beyond what the machine can give
            raise MemoryLimitError(f"{layer.where}: cannot allocate its buffers ({e})") from None
        blobs = [b for b in top + layer.blobs if id(b) not in self._counted]
        self._counted.update(id(b) for b in blobs)
        self.nbytes += sum(b.count * b.dtype.itemsize for b in blobs)
        if self.nbytes > self.limit:
            largest = max(blobs, key=lambda b: b.count)
            raise MemoryLimitError(f"{layer.where}: the net's blobs need {format_bytes(self.nbytes)} with this "
                                   f"layer's (the largest of shape {largest.shape}), more than the "
                                   f"{format_bytes(self.limit)} limit (the memory available; "
                                   "espresso.set_memory_limit or ESPRESSO_MEMORY_LIMIT sets another)")

    def blobs_of(self, ids):
        blobs = list(self._blobs.values())
        return [blobs[i] for i in ids]

    def _append_layer(self, layer_id, layer_param, where, available):
        if not layer_param.HasField("phase"):
            layer_param.phase = self.phase
        if layer_param.propagate_down and len(layer_param.propagate_down) != len(layer_param.bottom):
            raise NetError(f"{where}layer '{layer_param.name}': propagate_down must be given "
                           f"0 or {len(layer_param.bottom)} times, got {len(layer_param.propagate_down)}")
        cls = layer_class(layer_param.type, where)
        if cls.type == "Python" and not self.allow_python:
            from espresso.layers.python import check_python_allowed

            check_python_allowed(layer_param, where)
        layer = cls(layer_param, self.backend, layer_param.phase, self.dtype, where)
        self.engine_layers.append(layer)
        self._layer_names.append(layer_param.name)
        need_backward = self._append_bottoms(layer, layer_param, available)
        self._append_tops(layer_id, layer, layer_param, available)
        self._setup(layer, self.blobs_of(self._bottom_ids[-1]), self.blobs_of(self._top_ids[-1]))
        need_backward |= self._append_params(layer_id, layer, layer_param)
        self.layer_need_backward.append(need_backward)
        if need_backward:
            for t in self._top_ids[-1]:
                self.blob_need_backward[t] = True

    def _append_bottoms(self, layer, layer_param, available):
        ids, needs, need_backward = [], [], False
        names = list(self._blobs)
        for k, name in enumerate(layer_param.bottom):
            if name not in self._blobs:
                raise NetError(f"{layer.where}: unknown bottom blob '{name}' (bottom {k})"
                               f"{did_you_mean(name, self._blobs)}")
            blob_id = names.index(name)
            ids.append(blob_id)
            need = self.blob_need_backward.get(blob_id, False)
            if layer_param.propagate_down:
                need = layer_param.propagate_down[k]
            needs.append(need)
            need_backward |= self.blob_need_backward.get(blob_id, False)
            if name in available:
                available.remove(name)
        self._bottom_ids.append(ids)
        self.bottom_need_backward.append(needs)
        return need_backward

    def _append_tops(self, layer_id, layer, layer_param, available):
        ids = []
        names = list(self._blobs)
        for j, name in enumerate(layer_param.top):
            inplace = j < len(layer_param.bottom) and name == layer_param.bottom[j]
            if inplace:
                blob_id = names.index(name)
            elif name in self._blobs:
                raise NetError(f"{layer.where}: top blob '{name}' produced by multiple sources")
            else:
                blob_id = len(self._blobs)
                self._blobs[name] = Blob((), self.dtype, self.backend, name)
                names.append(name)
            ids.append(blob_id)
            self._writers.setdefault(blob_id, []).append(layer_id)
            if layer.type == "Input":
                self._input_names.append(name)
            available.append(name)
        if layer.is_loss and not layer_param.top:
            ids.append(self._anonymous_top())
        self._top_ids.append(ids)

    def _anonymous_top(self):
        """Caffe's AutoTopBlobs: a loss layer given no top still gets one, which no other layer
        can read and which is not a net output."""
        name = "(automatic)" + (f"_{len(self._blobs)}" if "(automatic)" in self._blobs else "")
        self._blobs[name] = Blob((), self.dtype, self.backend, name)
        return len(self._blobs) - 1

    def _append_params(self, layer_id, layer, layer_param):
        """True if any blob has lr_mult != 0 in the net's spec (Net::Init), then Caffe's
        AppendParam per blob, which reads the layer's own copy: setup may have added specs
        (BatchNorm masks its statistics with lr_mult 0 there)."""
        specs = layer_param.param
        if len(specs) > len(layer.blobs):
            raise NetError(f"{layer.where}: {len(specs)} param specs for {len(layer.blobs)} blobs")
        layer.param_propagate_down = [k >= len(specs) or specs[k].lr_mult != 0
                                      for k in range(len(layer.blobs))]
        own = layer.lp.param
        for k, blob in enumerate(layer.blobs):
            self._append_param(layer, blob, own[k] if k < len(own) else caffe_pb2.ParamSpec())
        return any(layer.param_propagate_down)

    def _append_param(self, layer, blob, spec):
        name = spec.name
        if not name or name not in self._param_names:
            if name:
                self._param_names[name] = (len(self.learnable_params), layer)
            self._param_owner_of[id(blob)] = len(self.learnable_params)
            self.learnable_params.append(blob)
            self._lr_given.append(spec.HasField("lr_mult"))
            self._decay_given.append(spec.HasField("decay_mult"))
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            return
        owner_id, owner_layer = self._param_names[name]
        owner = self.learnable_params[owner_id]
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        if (owner.count != blob.count) if permissive else (owner.shape != blob.shape):
            raise ShapeError(f"{layer.where}: cannot share param '{name}' owned by layer "
                             f"'{owner_layer.name}': owner shape {owner.shape}, this shape {blob.shape}")
        self._param_owner_of[id(blob)] = owner_id
        self._merge_mult(spec, "lr_mult", self.params_lr, self._lr_given, owner_id, name)
        self._merge_mult(spec, "decay_mult", self.params_weight_decay, self._decay_given, owner_id, name)

    @staticmethod
    def _merge_mult(spec, field, values, given, owner_id, name):
        if not spec.HasField(field):
            return
        if given[owner_id] and values[owner_id] != getattr(spec, field):
            raise NetError(f"shared param '{name}' has mismatched {field}")
        given[owner_id], values[owner_id] = True, getattr(spec, field)

    def _analyze_backward(self):
        """Caffe's reverse pass: layers that do not reach a loss, or whose tops nobody
        backpropagates into, skip backward; then force_backward turns everything back on."""
        names = list(self._blobs)
        under_loss, skip = set(), set()
        for i in reversed(range(len(self.engine_layers))):
            layer = self.engine_layers[i]
            top_names = [names[t] for t in self._top_ids[i]]
            contributes = any(w for w in layer.loss_weights) or any(n in under_loss for n in top_names)
            skip_down = all(n in skip for n in top_names)
            if self.layer_need_backward[i] and skip_down:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self._bottom_ids[i])
            if not contributes:
                self.layer_need_backward[i] = False
            for k, b in enumerate(self._bottom_ids[i]):
                if contributes:
                    under_loss.add(names[b])
                else:
                    self.bottom_need_backward[i][k] = False
                if not self.bottom_need_backward[i][k]:
                    skip.add(names[b])
        if self.force_backward:
            self._force_backward()

    def _share_normalized_copies(self):
        """A Scale whose bottom a BatchNorm wrote last (ResNet's BatchNorm, Scale, ReLU, all in
        place) may read that BatchNorm's copy of its normalized values for its scale gradient
        instead of keeping a copy of its own of the same values: in a forward that runs the
        BatchNorm too, with no callbacks (Net._decide_per_call decides, per call)."""
        for i, layer in enumerate(self.engine_layers):
            if layer.type != "Scale" or not layer.backward_runs:
                continue
            writers = [w for w in self._writers[self._bottom_ids[i][0]] if w < i]
            last = self.engine_layers[writers[-1]] if writers else None
            if last is not None and last.type == "BatchNorm" and last.backward_runs and not last.use_global:
                layer.copy_source = (writers[-1], last.x_norm)
        self._fold_layers()

    def _fold_layers(self):
        """Where a backend's kernel for a layer can do the next ones' work too (one pass): a
        BatchNorm followed by a learned per-channel Scale, both in place on one blob, where the
        Scale's own gradient, if it runs, can read BatchNorm's copy (the blob never holds the
        values between the two); then an in-place ReLU after them, after an unweighted two-bottom
        Eltwise SUM (ResNet's shortcuts) or after an InnerProduct with a bias (LeNet's ip1)."""
        layers = self.engine_layers
        for i, layer in enumerate(layers):
            blob = self._top_ids[i][0] if len(self._top_ids[i]) == 1 else None
            if layer.type == "Eltwise" and layer.adds_two and layer.k.add_relu is not None:
                self._fold_relu(i, i + 1, blob)
            if layer.type == "InnerProduct" and layer.p.bias_term and layer.k.matmul_bias_relu is not None:
                self._fold_relu(i, i + 1, blob)
            if layer.type != "BatchNorm" or not layer.fused or i + 1 == len(layers) or self._bottom_ids[i] != [blob]:
                continue
            scale = layers[i + 1]
            if (scale.type != "Scale" or self._bottom_ids[i + 1] != [blob] or self._top_ids[i + 1] != [blob]
                    or scale.dims != layer.dims or (scale.backward_runs and scale.copy_source is None)):
                continue
            layer.fold_followers, scale.fold_leader = 1, 1
            layer.folded_params = [scale.blobs[0]]  # (blobs, not the layer: no cycle between the two layers)
            if scale.bias_index is not None:
                layer.folded_params.append(scale.blobs[scale.bias_index])
            self._fold_relu(i, i + 2, blob)

    def _fold_relu(self, leader, at, blob):
        """Layer `at`, if an in-place ReLU on `blob`, folds into layer `leader`, unless it keeps a
        copy of its bottom (a negative slope; its gradient reads its top otherwise)."""
        relu = self.engine_layers[at] if at < len(self.engine_layers) else None
        if (relu is not None and relu.type == "ReLU" and self._bottom_ids[at] == [blob] and self._top_ids[at] == [blob]
                and not relu.saves_bottom):
            self.engine_layers[leader].fold_followers = relu.fold_leader = at - leader
            self.engine_layers[leader].folded_slope = relu.slope

    def _force_backward(self):
        for i, layer in enumerate(self.engine_layers):
            self.layer_need_backward[i] = True
            for k, b in enumerate(self._bottom_ids[i]):
                need = self.bottom_need_backward[i][k] or layer.allow_force_backward(k)
                self.bottom_need_backward[i][k] = need
                self.blob_need_backward[b] = self.blob_need_backward.get(b, False) or need
            layer.param_propagate_down = [True] * len(layer.blobs)

    def _check_inplace(self):
        """Refuse in-place uses that would compute wrong values or gradients (Caffe does not).

        Gradient hazards are only checked where gradients are expected: TRAIN nets and nets
        with force_backward; a TEST net is forward-only and may keep such a layout.
        """
        check_backward = self.phase == TRAIN or self.force_backward
        for i, layer in enumerate(self.engine_layers):
            for j, t in enumerate(self._top_ids[i]):
                if j >= len(self._bottom_ids[i]) or self._bottom_ids[i][j] != t:
                    continue
                if not layer.inplace:
                    layer.fail(f"cannot run in place (top '{list(self._blobs)[t]}' == bottom)", NetError)
                if check_backward:
                    self._check_overwrite(i, t)

    def _check_overwrite(self, i, blob_id):
        """Layer i overwrites blob_id in place: its earlier writer must not need that data later."""
        writers = [w for w in self._writers[blob_id] if w < i]
        if not writers or not self.layer_need_backward[i]:
            return
        previous = self.engine_layers[writers[-1]]
        if previous.backward_reads_top and self.layer_need_backward[writers[-1]]:
            raise NetError(f"{self.engine_layers[i].where}: runs in place on '{list(self._blobs)[blob_id]}', "
                           f"which {previous.where} needs unchanged for its backward pass; "
                           "give the in-place layer its own top blob")
