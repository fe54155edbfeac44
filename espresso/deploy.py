"""Deployment optimization of a TEST net (the `espresso optimize` verb).

Each step leaves the outputs unchanged up to float32 rounding, and the result is an ordinary
Caffe net of standard layers, written as a prototxt and a .caffemodel that Caffe runs:
- BatchNorm (on its global statistics) and Scale layers right after a Convolution or an
  InnerProduct whose output nothing else reads fold into its weights and bias (a bias is added
  where it had none);
- Dropout, the identity at TEST, goes;
- element-wise layers run in place where nothing else reads their bottom (in-place planning).
The net's input and output blob names stay.

The rewrite works on blob *values*: every top is a new value, and Caffe's in-place layers write
several values under one name, one after the other.  Removing a layer is then having its
readers read its bottom value; names are given back at the end (_Graph.to_param), where the
in-place planning picks them.
"""

import collections
import statistics
import time

import numpy as np

from espresso.errors import EspressoError, NetError
from espresso.net import TEST, Net
from espresso.net.build import filter_layers
from espresso.proto import caffe_pb2

FOLD_INTO = {"Convolution": "convolution_param", "InnerProduct": "inner_product_param"}

Optimized = collections.namedtuple("Optimized", "param net report")


def optimize(net):
    """Optimize a built TEST net; Optimized(param, net, report): the optimized NetParameter (its
    prototxt: espresso.proto.text.to_text), a Net built from it holding the folded weights
    (net.save writes its .caffemodel), and what changed: {"removed": [Dropout layers],
    "folded": {Convolution/InnerProduct: [the BatchNorm/Scale layers folded into it]},
    "in_place": [layers made in place], "layers": [before, after], "params": [before, after]}
    (params: the numbers the .caffemodel stores)."""
    net.sync()  # weights set through pycaffe's views reach the device first
    if net.phase != TEST:
        raise EspressoError(f"net '{net.name}': only a TEST-phase net can be optimized for deployment "
                            "(BatchNorm and Dropout fold as they run at TEST)")
    layers = [lp for lp, _ in filter_layers(net.param, [None] * len(net.param.layer), net.source)]
    _check_unique_names(layers, net.source)
    graph = _Graph(layers)
    weights = {name: [np.array(b.host_data(), np.float64) for b in layer.blobs]
               for name, layer in net.layer_dict.items() if layer.blobs}
    report = {"removed": _remove_dropout(graph, net), "folded": _fold(graph, net, weights)}
    param, report["in_place"] = graph.to_param(net.param, lambda lp: _cheap_in_place(net.layer_dict[lp.name]))
    optimized = Net(param, TEST, backend=net.backend, dtype=net.dtype)
    _set_weights(optimized, weights)
    report["layers"] = [len(layers), len(param.layer)]
    report["params"] = [_param_count(net), _param_count(optimized)]
    return Optimized(param, optimized, report)


def _check_unique_names(layers, source):
    """Weights are matched by layer name (in Caffe's files too): two layers of one name would
    swap theirs."""
    counts = collections.Counter(lp.name for lp in layers)
    twice = sorted(name for name, n in counts.items() if n > 1)
    if twice:
        raise NetError(f"{source or 'net'}: layer names {twice} are used more than once; weights are "
                       "matched by layer name, so give each layer its own name before optimizing")


def _param_count(net):
    return sum(blob.count for layer in net.engine_layers for blob in layer.blobs)


def _set_weights(net, weights):
    for name, layer in net.layer_dict.items():
        for blob, array in zip(layer.blobs, weights.get(name, ()), strict=True):
            blob.data[...] = net.backend.to_device(array, net.dtype)


# *** the steps ***
def _remove_dropout(graph, net):
    """Remove each Dropout that is the identity at TEST (scale_train, the default); the names
    of those removed."""
    removed = []
    for i, lp in enumerate(graph.layers):
        if lp is not None and lp.type == "Dropout" and net.layer_dict[lp.name].test_scale == 1 and graph.removable(i):
            graph.remove(i)
            removed.append(lp.name)
    return removed


def _fold(graph, net, weights):
    """Fold the chain of BatchNorm/Scale layers after each Convolution/InnerProduct into its
    `weights`; {its name: [the layers folded into it]}."""
    shared = _shared_param_names(lp for lp in graph.layers if lp is not None)
    folded = {}
    for i, lp in enumerate(graph.layers):
        if lp is None or not _can_fold_into(lp, net, shared):
            continue
        channels = getattr(lp, FOLD_INTO[lp.type]).num_output
        while (j := graph.sole_reader(graph.tops[i][0])) is not None and graph.removable(j):
            affine = _affine(graph.layers[j], net, weights, channels)
            if affine is None:
                break
            _scale_outputs(lp, weights[lp.name], *affine)
            folded.setdefault(lp.name, []).append(graph.layers[j].name)
            graph.remove(j)
    return folded


def _shared_param_names(layers):
    """Param names that several layers give (shared weights): folding into one would change
    the others."""
    counts = collections.Counter(spec.name for lp in layers for spec in lp.param if spec.name)
    return {name for name, n in counts.items() if n > 1}


def _can_fold_into(lp, net, shared):
    """A Convolution/InnerProduct of one top, no shared weights, its output channels on axis 1
    (where BatchNorm, and Scale on axis 1, work)."""
    if lp.type not in FOLD_INTO or len(lp.top) != 1 or any(lp.loss_weight):
        return False
    if any(spec.name in shared for spec in lp.param):
        return False
    return getattr(lp, FOLD_INTO[lp.type]).axis % len(_bottom_shape(net, lp.name)) == 1


def _bottom_shape(net, layer_name):
    return net.bottom_vecs[net._layer_names.index(layer_name)][0].shape


def _affine(lp, net, weights, channels):
    """(a, c), each (channels,), with the layer's top = a * bottom + c per channel of axis 1, or
    None for any other layer: a BatchNorm on its global statistics, or a Scale with a learned
    scale of shape (channels,) on axis 1."""
    if lp.type == "BatchNorm" and net.layer_dict[lp.name].use_global:
        mean_sum, var_sum, s = weights[lp.name]
        factor = 0.0 if s[0] == 0 else 1.0 / s[0]  # Caffe's statistics are blob / s, 0 where s == 0
        a = 1.0 / np.sqrt(var_sum * factor + lp.batch_norm_param.eps)
        return a, -mean_sum * factor * a
    if lp.type == "Scale" and len(lp.bottom) == 1:
        scale = weights[lp.name][0]
        on_axis_1 = lp.scale_param.axis % len(_bottom_shape(net, lp.name)) == 1
        if scale.shape == (channels,) and on_axis_1:
            return scale, weights[lp.name][1] if lp.scale_param.bias_term else np.zeros(channels)
    return None


def _scale_outputs(lp, arrays, a, c):
    """Make the layer compute a * (its output) + c: W scaled per output channel, b = a * b + c."""
    p = getattr(lp, FOLD_INTO[lp.type])
    weight = arrays[0]
    if lp.type == "InnerProduct" and p.transpose:
        weight = weight * a  # (K, N): outputs on axis 1
    else:
        weight = weight * a.reshape((-1,) + (1,) * (weight.ndim - 1))  # outputs on axis 0
    bias = arrays[1] if p.bias_term else 0.0
    arrays[:] = [weight, a * bias + c]
    p.ClearField("bias_term")  # true by default, for both types


def _cheap_in_place(layer):
    """Run in place where the layer is safe so (Layer.inplace) and keeps no copy of its bottom
    there: the neuron layers that save their bottom would copy it in every forward, which costs
    more than the buffer saves (Scale copies only for a backward, which a deploy net does not
    run).  A Python layer's safety is its author's call."""
    return layer.inplace and not getattr(layer, "saves_bottom", False) and layer.type != "Python"


class _Graph:
    """The layers over blob values: bottoms[i] and tops[i] are value ids, names[v] the name value
    v is written under; a removed layer is None (with no bottoms and tops)."""

    def __init__(self, layers):
        self.layers, self.bottoms, self.tops, self.names = [], [], [], []
        latest = {}  # blob name -> its current value: a bottom reads the last one written
        for lp in layers:
            lp = _deploy_copy(lp)
            self.layers.append(lp)
            self.bottoms.append([latest[name] for name in lp.bottom])
            self.tops.append(list(range(len(self.names), len(self.names) + len(lp.top))))
            self.names.extend(lp.top)
            latest.update(zip(lp.top, self.tops[-1]))
        read = {v for bottoms in self.bottoms for v in bottoms}
        self.outputs = set(range(len(self.names))) - read  # Caffe's: what no layer reads
        self.inputs = {v for bottoms, tops in zip(self.bottoms, self.tops) if not bottoms for v in tops}

    def readers(self, value):
        return [i for i, bottoms in enumerate(self.bottoms) if value in bottoms]

    def sole_reader(self, value):
        readers = self.readers(value)
        return readers[0] if len(readers) == 1 else None

    def removable(self, i):
        """Layer i, of one bottom and one top, can go, its readers reading its bottom: where its
        top is a net output, its bottom takes that name, so it must be no net input and have
        no other reader."""
        lp, bottoms, tops = self.layers[i], self.bottoms[i], self.tops[i]
        if len(bottoms) != 1 or len(tops) != 1 or any(lp.loss_weight):
            return False
        return tops[0] not in self.outputs or (bottoms[0] not in self.inputs and self.readers(bottoms[0]) == [i])

    def remove(self, i):
        (bottom,), (top,) = self.bottoms[i], self.tops[i]
        for bottoms in self.bottoms:
            bottoms[:] = [bottom if v == top else v for v in bottoms]
        if top in self.outputs:
            self.outputs = self.outputs - {top} | {bottom}
            self.names[bottom] = self.names[top]
        self.layers[i], self.bottoms[i], self.tops[i] = None, [], []

    def to_param(self, net_param, in_place):
        """The NetParameter of the layers left, each value under its name, or under its bottom's
        where `in_place(layer)` and nothing else needs the bottom; (param, the layers made in
        place)."""
        param = caffe_pb2.NetParameter()
        param.CopyFrom(net_param)
        del param.layer[:]
        param.ClearField("state")  # the layers are those of the net's state already
        made, holder = [], {}  # holder: name -> the value it holds now
        for i, lp in enumerate(self.layers):
            if lp is None:
                continue
            if self._may_run_in_place(i) and in_place(lp):
                self.names[self.tops[i][0]] = self.names[self.bottoms[i][0]]
                if lp.top[0] != lp.bottom[0]:
                    made.append(lp.name)
            assert all(holder[self.names[v]] == v for v in self.bottoms[i]), f"layer '{lp.name}' reads a lost value"
            holder.update((self.names[v], v) for v in self.tops[i])
            layer = param.layer.add()
            layer.CopyFrom(lp)
            layer.bottom[:] = [self.names[v] for v in self.bottoms[i]]
            layer.top[:] = [self.names[v] for v in self.tops[i]]
        return param, made

    def _may_run_in_place(self, i):
        """Its one top may overwrite its one bottom: nothing else reads that, it is no net input
        (the caller's data stays), and the top is no net output (whose name stays).  Layers of
        several bottoms stay as they are: real Caffe's Eltwise SUM zeroes its top before it
        reads bottom 0."""
        bottoms, tops = self.bottoms[i], self.tops[i]
        if len(tops) != 1 or len(bottoms) != 1:
            return False
        return self.readers(bottoms[0]) == [i] and bottoms[0] not in self.inputs and tops[0] not in self.outputs


def _deploy_copy(lp):
    """The layer as the net built it: its include/exclude rules applied already, no weights
    inside the prototxt."""
    copy = caffe_pb2.LayerParameter()
    copy.CopyFrom(lp)
    for field in ("include", "exclude", "blobs"):
        copy.ClearField(field)
    return copy


# *** timing ***
def measure(before, after, runs=10, warmup=2, inputs=None, seed=0):
    """Time forward() of two nets on the same inputs (`inputs`: name -> array, else random
    normal values), interleaved, after `warmup` runs of each: {"before_ms", "after_ms"} (the
    medians), "speedup" and "max_error", the largest output difference relative to the
    largest value of that output."""
    rng = np.random.default_rng(seed)
    feeds = inputs or {name: rng.standard_normal(before.blobs[name].data.shape) for name in before.inputs}
    for net in (before, after):
        for name, value in feeds.items():
            net.blobs[name].data[...] = value
        for _ in range(warmup):
            net.forward()
    times = ([], [])
    for _ in range(runs):
        for net, record in zip((before, after), times):
            start = time.perf_counter()
            net.forward()
            record.append((time.perf_counter() - start) * 1000)
    before_ms, after_ms = map(statistics.median, times)
    return {"before_ms": before_ms, "after_ms": after_ms, "speedup": before_ms / after_ms,
            "max_error": _max_error(before, after)}


def _max_error(before, after):
    errors = [0.0]
    for name in set(before.outputs) & set(after.outputs):
        expected, got = np.asarray(before.blobs[name].data), np.asarray(after.blobs[name].data)
        errors.append(float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30)))
    return max(errors)
