"""Net: a DAG of layers built from a NetParameter exactly as Caffe's Net::Init builds it.

Steps (Caffe's names): FilterNet (include/exclude rules by phase, level, stage) -> InsertSplits
(a blob read by several layers gets a Split, so gradients add up) -> per layer AppendBottom /
AppendTop (in place when top[i] == bottom[i]) / SetUp / AppendParam (sharing by param name,
lr_mult, decay_mult) -> backward analysis (which layers and blobs need gradients) -> one flat
parameter arena that every learnable blob is a view of (DESIGN rule 2).
"""

import collections
import os

import numpy as np

from espresso.blob import Blob
from espresso.compress.model_file import is_compressed
from espresso.errors import EspressoError, ModelFileError, NetError, ShapeError, did_you_mean
from espresso.graphs import GraphCache, eager_reason
from espresso.hostview import HostSync, HostView
from espresso.layer import layer_class
from espresso.proto import caffe_pb2
from espresso.proto.text import read_net_text
from espresso.proto.upgrade import upgrade_net
from espresso.proto.weights import read_weights, release, write_weights
from espresso.runtime import current_backend

CALLBACKS = ("before_forward", "after_forward", "before_backward", "after_backward")

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


# *** building the layer list ***
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
            raise NetError(f"{_where(source, line)}layer '{layer.name}': "
                           "specify either include rules or exclude rules, not both")
        included = not layer.include
        if any(state_meets_rule(param.state, rule) for rule in layer.exclude):
            included = False
        if any(state_meets_rule(param.state, rule) for rule in layer.include):
            included = True
        if included:
            kept.append((layer, line))
    return kept


def _where(source, line):
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


class Net:
    """A Caffe network.  pycaffe's surface: blobs, params, layers, inputs, outputs, forward, ..."""

    def __init__(self, network, *args, weights=None, phase=None, level=0, stages=(), state=None,
                 backend=None, dtype=np.float32, allow_python=False):
        phase, weights = _pycaffe_args(args, phase, weights)
        param, lines, self.source = load_net_param(network)
        if state is not None:
            param.state.CopyFrom(state)
        else:
            param.state.phase = TEST if phase is None else phase
            param.state.level = level
            param.state.stage.extend(stages)
        self.param, self.name, self.phase = param, param.name, param.state.phase
        self.backend = backend or current_backend()
        self.dtype, self.allow_python = np.dtype(dtype), allow_python
        self._host_sync = None if self.backend.name == "cpu" else HostSync()
        self._graphs, self._loss = GraphCache(self.backend), self.backend.xp.zeros((), dtype)
        self._callbacks = {when: [] for when in CALLBACKS}  # pycaffe's before_forward(...) etc.
        self._build(insert_splits(filter_layers(param, lines, self.source)))
        if weights:
            self.copy_from(weights)

    # *** Net::Init ***
    def _build(self, layers):
        self.layers, self._layer_names = [], []
        self._blobs = collections.OrderedDict()
        self._bottom_ids, self._top_ids = [], []
        self.bottom_need_backward, self.layer_need_backward = [], []
        self.blob_need_backward = {}
        self.learnable_params, self.params_lr, self.params_weight_decay = [], [], []
        self._param_owner_of, self._param_names = {}, {}
        self._lr_given, self._decay_given = [], []
        self._writers = {}  # blob id -> ids of the layers writing it (its producer, then in-place layers)
        self._input_names, available = [], []
        for layer_id, (layer_param, line) in enumerate(layers):
            self._append_layer(layer_id, layer_param, _where(self.source, line), available)
        self.outputs = sorted(set(available))  # Caffe keeps them in a std::set
        self._bottoms = [self._blobs_of(ids) for ids in self._bottom_ids]
        self._tops = [self._blobs_of(ids) for ids in self._top_ids]
        self._reshaped_for = [[b.shape for b in bottom] for bottom in self._bottoms]
        self._checked_at = [None] * len(self.layers)  # Blob.layout when layer i's bottoms were checked
        self._analyze_backward()
        self._check_inplace()
        self._make_arena()

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
        self.layers.append(layer)
        self._layer_names.append(layer_param.name)
        need_backward = self._append_bottoms(layer, layer_param, available)
        self._append_tops(layer_id, layer, layer_param, available)
        layer.setup_all(self._blobs_of(self._bottom_ids[-1]), self._blobs_of(self._top_ids[-1]))
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
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
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
        if self.param.force_backward:
            self._force_backward()

    def _force_backward(self):
        for i, layer in enumerate(self.layers):
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
        check_backward = self.phase == TRAIN or self.param.force_backward
        for i, layer in enumerate(self.layers):
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
        previous = self.layers[writers[-1]]
        if previous.backward_reads_top and self.layer_need_backward[writers[-1]]:
            raise NetError(f"{self.layers[i].where}: runs in place on '{list(self._blobs)[blob_id]}', "
                           f"which {previous.where} needs unchanged for its backward pass; "
                           "give the in-place layer its own top blob")

    def _make_arena(self):
        """Make every learnable param a view of one flat data buffer and one flat diff buffer."""
        xp, total = self.backend.xp, sum(b.count for b in self.learnable_params)
        self.arena_data = xp.zeros(total, self.dtype)
        self.arena_diff = xp.zeros(total, self.dtype)
        offset = 0
        for blob in self.learnable_params:
            n = blob.count
            self.arena_data[offset:offset + n] = blob.data.ravel()
            blob.bind(self.arena_data[offset:offset + n], self.arena_diff[offset:offset + n])
            offset += n
        for layer in self.layers:
            for blob in layer.blobs:
                owner = self.learnable_params[self._param_owner_of[id(blob)]]
                if owner is not blob:
                    blob.bind(owner.data, owner.diff)
        users = collections.Counter(self._param_owner_of[id(b)] for layer in self.layers for b in layer.blobs)
        self._shares_params = [any(users[self._param_owner_of[id(b)]] > 1 for b in layer.blobs)
                               for layer in self.layers]

    # *** running ***
    def _blobs_of(self, ids):
        blobs = list(self._blobs.values())
        return [blobs[i] for i in ids]

    def _layer_index(self, name, default):
        if name is None:
            return default
        if name not in self._layer_names:
            raise NetError(f"no layer named '{name}'{did_you_mean(name, self._layer_names)}")
        return self._layer_names.index(name)

    def forward_range(self, start, end):
        """Run layers start..end (inclusive); return the weighted loss (Caffe's ForwardFromTo)."""
        return float(self.run_forward(start, end))

    def run_forward(self, start, end):
        """forward_range without reading the loss back: a float on the CPU, a 0-d device array
        on a GPU, where the run is a CUDA graph replay whenever it can be (espresso/graphs.py)."""
        self.sync()
        if self._host_sync is None or self.eager_reason(start, end) is not None:
            return sum(float(term) for term in self.forward_layers(start, end))
        self._graphs.run(("forward", start, end), lambda: self.forward_loss(start, end, self._loss))
        return self._loss

    def zeroed_output_sums(self):
        """One zeroed flat array per output, then a 0-d loss sum, for `forward_into_sums`
        (the same arrays every time, so a graph holding them stays valid)."""
        xp, counts = self.backend.xp, [self._blobs[name].count for name in self.outputs]
        if getattr(self, "_sums", None) is None or [s.size for s in self._sums[:-1]] != counts:
            self._sums = [xp.zeros(c, self.dtype) for c in counts] + [xp.zeros((), self.dtype)]
        for array in self._sums:
            array.fill(0)
        return self._sums

    def forward_into_sums(self, sums):
        """One whole forward pass whose outputs (and weighted loss, as Caffe's Test sums it in
        Dtype) are added into `sums` on the device: a test batch without a host round trip,
        replayed as one CUDA graph where possible."""
        last = len(self.layers) - 1

        def run():
            self.forward_loss(0, last, self._loss)
            for total, name in zip(sums, self.outputs):
                total += self._blobs[name].data.ravel()
            sums[-1] += self._loss

        self.sync()
        if self.eager_reason() is None:
            self._graphs.run("forward+sums", run)
        else:
            run()

    def forward_layers(self, start, end, losses=True):
        """Run layers start..end eagerly; the weighted loss terms (device scalars), unsummed
        (not computed when not `losses`)."""
        terms = []
        for i in range(start, end + 1):
            layer, bottom, top = self.layers[i], self._bottoms[i], self._tops[i]
            self._call("before_forward", i)
            if self._checked_at[i] != Blob.layout:  # some blob changed shape since: look
                shapes = [b.shape for b in bottom]
                if shapes != self._reshaped_for[i]:
                    layer.reshape(bottom, top)
                    self._reshaped_for[i] = shapes
                self._checked_at[i] = Blob.layout
            layer.forward(bottom, top)
            if losses and (layer.is_loss or any(layer.loss_weights)):  # before the callbacks, as Caffe
                terms += [(blob.data * blob.diff).sum() for blob, w in zip(top, layer.loss_weights) if w]
            self._call("after_forward", i)
        return terms

    def forward_loss(self, start, end, out):
        """Run layers start..end eagerly, writing the weighted loss into the 0-d array `out`."""
        out[...] = sum(self.forward_layers(start, end), self.dtype.type(0))
        return out

    def backward_range(self, start, end):
        """Backpropagate from layer start down to layer end (Caffe's BackwardFromTo)."""
        self.sync()
        # param grads may run aside, joined at the end (not when callbacks may read them between)
        with self.backend.overlapping(not any(self._callbacks.values())):
            for i in range(start, end - 1, -1):
                self._call("before_backward", i)
                if self.layer_need_backward[i]:
                    # a diff that other layers accumulate into too is never written by two streams
                    with self.backend.overlapping(not self._shares_params[i]):
                        self.layers[i].backward(self._tops[i], self.bottom_need_backward[i], self._bottoms[i])
                self._call("after_backward", i)

    def eager_reason(self, start=0, end=None):
        """Why layers start..end cannot run as a CUDA graph, or None when they can."""
        if any(self._callbacks.values()):
            return "pycaffe callbacks (before_forward etc.) run between the layers"
        return eager_reason(self.backend, self.layers[start:None if end is None else end + 1])

    def _add_callback(when):
        def add(self, callback):
            self._callbacks[when].append(callback)

        add.__doc__ = f"pycaffe's: call callback(layer index) {when.replace('_', ' ')} of each layer"
        add.__name__ = when
        return add

    before_forward, after_forward, before_backward, after_backward = map(_add_callback, CALLBACKS)
    del _add_callback

    def _call(self, when, i):
        """Run the `when` callbacks for layer i; what they wrote through the views reaches the
        device before the next layer runs."""
        for callback in self._callbacks[when]:
            callback(i)
            self.sync()

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's Net.forward: set inputs from kwargs, run, return {output name: data}."""
        views = self.blobs  # pycaffe's views (host arrays on a GPU), built once per call
        for name, value in kwargs.items():
            if name not in self._input_names:
                raise NetError(f"'{name}' is not an input of the net (inputs: {self._input_names})")
            if value.shape[0] != self._blobs[name].shape[0]:
                raise ShapeError(f"input '{name}' has batch {value.shape[0]}, "
                                 f"net expects {self._blobs[name].shape[0]}")
            views[name].data[...] = value
        start_i, end_i = self._layer_index(start, 0), self._layer_index(end, len(self.layers) - 1)
        self.forward_range(start_i, end_i)
        names = self.top_names[self._layer_names[end_i]] if end is not None else self.outputs
        return {name: views[name].data for name in set(names) | set(blobs or ())}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's Net.backward: set output diffs from kwargs, run, return {input name: diff}."""
        views = self.blobs
        for name, value in kwargs.items():
            if name not in self.outputs:
                raise NetError(f"'{name}' is not an output of the net (outputs: {self.outputs})")
            views[name].diff[...] = value
        start_i = self._layer_index(start, len(self.layers) - 1)
        end_i = self._layer_index(end, 0)
        self.backward_range(start_i, end_i)
        names = self.bottom_names[self._layer_names[end_i]] if end is not None else self.inputs
        return {name: views[name].diff for name in set(names) | set(diffs or ())}

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe's: forward any number of items (kwargs: input name -> array) in batches of
        the net's batch size, the last padded with zeros; {output (and `blobs`) name: the
        outputs of every item} (the padding's dropped)."""
        return self._run_all(blobs, None, kwargs, backward=False)[0]

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """pycaffe's: forward_all plus a backward per batch, from the output diffs given in
        kwargs (output name -> array) or those the loss layers set; ({output: data}, {input
        (and `diffs`) name: diff}) of every item."""
        return self._run_all(blobs, diffs, kwargs, backward=True)

    def _run_all(self, blobs, diffs, kwargs, backward):
        if not kwargs:
            raise NetError("forward_all/forward_backward_all: give the items as input=array (and output=diffs)")
        seeds = {name: value for name, value in kwargs.items() if backward and name in self.outputs}
        feeds = {name: value for name, value in kwargs.items() if name not in seeds}  # forward checks them
        outs = {name: [] for name in set(self.outputs) | set(blobs or ())}
        grads = {name: [] for name in set(self.inputs) | set(diffs or ())} if backward else {}
        forward, back = self._batches(feeds), self._batches(seeds)
        for _ in range(max(len(forward), len(back))):
            batch_outs = self.forward(blobs, **(forward.pop(0) if forward else {}))
            batch_grads = self.backward(diffs, **(back.pop(0) if back else {})) if backward else {}
            for store, batch in ((outs, batch_outs), (grads, batch_grads)):
                for name, value in batch.items():
                    store[name].extend(np.array(value))
        count = len(next(iter(kwargs.values())))
        trim = [{name: np.asarray(values[:count]) for name, values in store.items()} for store in (outs, grads)]
        return trim[0], trim[1]

    def _batches(self, arrays):
        """arrays (name -> array of items) cut into the net's batches, the last zero-padded."""
        if not arrays:
            return []
        size, count = next(iter(self._blobs.values())).shape[0], len(next(iter(arrays.values())))
        batches = []
        for start in range(0, count, size):
            batch = {}
            for name, array in arrays.items():
                part = np.asarray(array[start:start + size])
                pad = np.zeros((size - len(part),) + part.shape[1:], part.dtype)
                batch[name] = np.concatenate([part, pad]) if len(pad) else part
            batches.append(batch)
        return batches

    def forward_backward(self):
        """One loss evaluation and gradient accumulation; returns the loss (Caffe's ForwardBackward)."""
        loss = self.forward_range(0, len(self.layers) - 1)
        self.backward_range(len(self.layers) - 1, 0)
        return loss

    def reshape(self):
        """Propagate input shape changes through every layer (Caffe's Net::Reshape)."""
        self.sync()
        for i, layer in enumerate(self.layers):
            layer.reshape(self._bottoms[i], self._tops[i])
            self._reshaped_for[i] = [b.shape for b in self._bottoms[i]]

    def set_input_arrays(self, data, labels):
        """pycaffe's: feed the first MemoryData layer."""
        from espresso.layers.datalayers import set_input_arrays

        return set_input_arrays(self, data, labels)

    def clear_param_diffs(self):
        self.sync()
        self.arena_diff[...] = 0

    def sync(self):
        """Write host-side changes made through pycaffe's views to the device (GPU nets only).
        Every method that runs or changes the net calls it first."""
        if self._host_sync is not None:
            self._host_sync.flush()

    # *** weights ***
    def copy_from(self, path):
        """Caffe's CopyTrainedLayersFrom: copy weights by layer name; unknown layers are skipped.
        A name ending in ".h5" is read as HDF5 (load_hdf5), as Caffe dispatches."""
        if os.fspath(path).endswith(".h5"):
            return self.load_hdf5(path)
        self.sync()
        if is_compressed(path):  # a Deep Compression file, known by its magic bytes (espresso/compress)
            from espresso.compress.runtime import load_compressed

            return load_compressed(self, path)
        param, layer_blobs = read_weights(path)
        upgrade_net(param, layer_blobs)  # V0/V1 files: the blob lists follow their layers
        index = {name: i for i, name in enumerate(self._layer_names)}  # the last of a name wins
        name = os.path.basename(os.fspath(path))
        for source, arrays in zip(param.layer, layer_blobs):
            target = index.get(source.name)
            if target is not None and arrays is not None:
                self._copy_layer(name, self.layers[target], arrays)
                release(arrays)  # drop the copied file pages: the peak stays near 1x the weights

    def _copy_layer(self, path, layer, arrays):
        if len(arrays) != len(layer.blobs):
            raise ModelFileError(f"{path}: layer '{layer.name}': {len(arrays)} blobs in file, "
                                 f"{len(layer.blobs)} in net")
        for k, ((array, legacy), blob) in enumerate(zip(arrays, layer.blobs)):
            if not _shape_matches(array.shape, legacy, blob.shape):
                raise ShapeError(f"{path}: layer '{layer.name}': param {k} shape {tuple(array.shape)} "
                                 f"does not match net {blob.shape}; rename the layer to learn it from scratch")
            blob.data[...] = self.backend.to_device(array.reshape(blob.shape), self.dtype)

    def save(self, path, diff=False):
        """Write the weights (and with `diff`, their gradients) as a binary .caffemodel
        (Caffe's Net::ToProto + WriteProtoToBinaryFile)."""
        self.sync()
        net = caffe_pb2.NetParameter(name=self.name)
        blobs = []
        for layer in self.layers:
            lp = net.layer.add()
            lp.CopyFrom(layer.lp)
            del lp.blobs[:]
            blobs.append([(b.host_data(), b.host_diff() if diff else None) for b in layer.blobs])
        write_weights(path, net, blobs)

    def save_hdf5(self, path, diff=False):
        """Caffe's Net::ToHDF5 (pycaffe's save_hdf5 writes the data only): group "data" holds a
        group per layer, named after it, with a dataset "0", "1", ... per param blob; `diff`
        adds a "diff" group laid out alike.  As in Caffe, every layer gets its group (empty
        without params) and a param shared from another layer has no data dataset, only a diff."""
        from espresso import hdf5

        self.sync()

        def fill(f):
            data, diffs = f.create_group("data"), f.create_group("diff") if diff else None
            for layer in self.layers:
                if layer.name in data:
                    raise ModelFileError(f"{path}: two layers named '{layer.name}'; HDF5 weights are "
                                         "keyed by layer name (Caffe fails there too)")
                group = data.create_group(layer.name)
                diff_group = diffs.create_group(layer.name) if diff else None
                for k, blob in enumerate(layer.blobs):
                    if self._owns(blob):
                        group.create_dataset(str(k), data=blob.host_data())
                    if diff:
                        diff_group.create_dataset(str(k), data=blob.host_diff())

        self.check_hdf5_names(path)
        hdf5.write_file(path, fill)

    def check_hdf5_names(self, path):
        """HDF5 weights are keyed by layer name, and h5py reads "/" as a path (Caffe's ToHDF5
        fails there): such a name would be lost without a word on loading, so it is refused."""
        for layer in self.layers:
            if not layer.name or "/" in layer.name:
                raise ModelFileError(f"{path}: layer name {layer.name!r} cannot key HDF5 weights (empty or "
                                     "holding '/'); rename the layer or use snapshot_format: BINARYPROTO")

    def load_hdf5(self, path):
        """Caffe's CopyTrainedLayersFromHDF5: copy "data/<layer>/<k>" by layer name, skipping
        layers the net lacks.  A layer may hold fewer datasets than the net's layer has blobs
        only where the missing ones are shared from another layer; shapes must match exactly."""
        from espresso import hdf5

        self.sync()
        index = {name: i for i, name in enumerate(self._layer_names)}  # the last of a name wins
        name = os.path.basename(os.fspath(path))
        with hdf5.open_file(path) as f:
            if not isinstance(f.get("data"), hdf5.h5py().Group):
                raise ModelFileError(f"{path}: no 'data' group; not a Caffe HDF5 weights file")
            for source, group in f["data"].items():
                target = index.get(source)
                if target is not None:
                    self._copy_layer_hdf5(name, self.layers[target], group)

    def _copy_layer_hdf5(self, path, layer, group):
        from espresso import hdf5

        where = f"{path}: layer '{layer.name}'"
        if len(group) > len(layer.blobs):
            raise ModelFileError(f"{where}: {len(group)} blobs in file, {len(layer.blobs)} in net")
        for k, blob in enumerate(layer.blobs):
            if str(k) not in group:
                if self._owns(blob):
                    raise ModelFileError(f"{where}: no dataset '{k}' for param {k} "
                                         f"({len(group)} blobs in file, {len(layer.blobs)} in net)")
                continue  # shared from another layer, which carries it
            array = hdf5.load_array(group, str(k), where)
            if array.shape != blob.shape:
                raise ShapeError(f"{where}: param {k} shape {tuple(array.shape)} does not match "
                                 f"net {blob.shape}; rename the layer to learn it from scratch")
            blob.data[...] = self.backend.to_device(array, self.dtype)

    def _owns(self, blob):
        """False for a param shared from an earlier layer (Caffe: param_owners_ != -1)."""
        return self.learnable_params[self._param_owner_of[id(blob)]] is blob

    def share_with(self, other):
        """Caffe's ShareTrainedLayersWith: this net's layers use `other`'s weights (by layer name)."""
        self.sync()
        index = {name: i for i, name in enumerate(self._layer_names)}
        for source in other.layers:
            target = index.get(source.name)
            if target is None:
                continue
            for mine, theirs in zip(self.layers[target].blobs, source.blobs):
                if mine.shape != theirs.shape:
                    raise ShapeError(f"layer '{source.name}': cannot share {theirs.shape} with {mine.shape}")
                mine.share_data(theirs)

    # *** pycaffe views ***
    def _view(self, blob):
        return blob if self._host_sync is None else HostView(blob, self._host_sync)

    @property
    def blobs(self):
        """pycaffe's net.blobs: on a GPU, views whose .data/.diff are host arrays."""
        if self._host_sync is None:
            return self._blobs
        return collections.OrderedDict((name, self._view(b)) for name, b in self._blobs.items())

    @property
    def params(self):
        return collections.OrderedDict((name, [self._view(b) for b in layer.blobs])
                                       for name, layer in zip(self._layer_names, self.layers) if layer.blobs)

    @property
    def inputs(self):
        return list(self._input_names)

    @property
    def top_names(self):
        names = list(self._blobs)
        return collections.OrderedDict(
            (n, [names[t] for t in ids]) for n, ids in zip(self._layer_names, self._top_ids))

    @property
    def bottom_names(self):
        names = list(self._blobs)
        return collections.OrderedDict(
            (n, [names[b] for b in ids]) for n, ids in zip(self._layer_names, self._bottom_ids))

    @property
    def _blob_names(self):
        return list(self._blobs)

    @property
    def blob_loss_weights(self):
        """pycaffe's: each blob's loss weight, that of the layer writing it (last)."""
        names, weights = list(self._blobs), dict.fromkeys(self._blobs, 0.0)
        for layer, ids in zip(self.layers, self._top_ids):
            weights.update((names[t], float(w)) for t, w in zip(ids, layer.loss_weights))
        return collections.OrderedDict(weights)

    @property
    def layer_dict(self):
        return collections.OrderedDict(zip(self._layer_names, self.layers))


def _shape_matches(file_shape, legacy, net_shape):
    """Caffe's Blob::ShapeEquals: legacy 4-D blobs match counting axes from the end."""
    if not legacy:
        return tuple(file_shape) == tuple(net_shape)
    if len(net_shape) > 4:
        return False
    return tuple(file_shape) == (1,) * (4 - len(net_shape)) + tuple(net_shape)


def _pycaffe_args(args, phase, weights):
    """Accept pycaffe's Net(file, phase) and Net(file, weights, phase) positional forms."""
    if len(args) > 2:
        raise EspressoError(f"Net takes (network, [weights,] phase), got {len(args) + 1} arguments")
    if args and isinstance(args[0], (str, os.PathLike)):
        weights, args = args[0], args[1:]
    if args:
        phase = args[0]
    if phase not in (None, TRAIN, TEST):
        raise EspressoError(f"phase must be espresso.TRAIN or espresso.TEST, got {phase!r}")
    return phase, weights
