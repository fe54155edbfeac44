"""Net: a DAG of layers built from a NetParameter (espresso/net/build.py), and the engine that
runs it on the net's backend.

Every learnable param of a TRAIN net is a view of one flat data buffer and one flat diff buffer,
the arena (DESIGN rule 2); a TEST net's params keep their own buffers.  Two levels of entry points run the net:
- pycaffe's (espresso/net/pycaffe.py): forward / backward by blob name, forward_all,
  forward_backward_all, with host (NumPy) values, plus Caffe's forward_backward();
- the engine's, on device values: run_forward(start, end, sums) (a CUDA graph replay where the
  backend and layers allow) and backward_range(start, end); forward_layers(start, end) is the
  eager layer loop that graphs capture.
Add-ons come in through `replace_layer` (a stand-in for a built layer, e.g. one running
compressed weights) and `release_params` (dropping params held in another form);
weight-file formats through espresso.net.files.register_format.
"""

import collections
import functools
import os

import numpy as np

from espresso import graphs
from espresso.blob import allocate_diffs
from espresso.errors import EspressoError, NetError, ShapeError, did_you_mean
from espresso.hostview import host_sync
from espresso.net.build import TEST, TRAIN, Builder, filter_layers, insert_splits, load_net_param
from espresso.net.pycaffe import CALLBACKS, PycaffeNet
from espresso.runtime import current_backend

__all__ = ["Net", "TRAIN", "TEST"]


class Net(PycaffeNet):
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
        self.backend, self.dtype = backend or current_backend(), np.dtype(dtype)
        # pycaffe's views of device blobs write back through the backend's one HostSync
        self._host_sync = None if self.backend.host_arrays else host_sync(self.backend)
        self._graphs, self._loss = graphs.GraphCache(self.backend), self.backend.xp.zeros((), dtype)
        self._callbacks = {when: [] for when in CALLBACKS}  # pycaffe's before_forward(...) etc.
        self.gradients_final = []  # f(i) after layer i's backward and its callbacks (data-parallel buckets)
        self._sums = None  # output_sums()
        builder = Builder(self.phase, param.force_backward, self.backend, self.dtype, allow_python)
        vars(self).update(builder.build(insert_splits(filter_layers(param, lines, self.source)), self.source))
        self._reshaped_for = [[b.shape for b in bottom] for bottom in self.bottom_vecs]
        self._checked_at = [None] * len(self.engine_layers)  # the graphs version when layer i's bottoms were checked
        self._find_per_call()
        self._make_arena()
        if weights:
            self.copy_from(weights)

    # *** the parameter arena ***
    def _make_arena(self):
        """A TRAIN net's learnable params become views of the arena (one data and one diff
        buffer, which the solver updates in one pass); a TEST net's keep their own buffers (no
        solver updates them: building it copies nothing, and holds no diffs until a backward
        asks, as Caffe allocates on first use).  Shared params become views of their owner."""
        self.arena_data = self.arena_diff = None
        if self.phase == TRAIN:
            self._bind_arena(self.learnable_params)
        for layer in self.engine_layers:
            for blob in layer.blobs:
                owner = self._owner(blob)
                if owner is not blob:
                    blob.bind(owner.data, owner.diff)
        users = collections.Counter(self._param_owner_of[id(b)] for layer in self.engine_layers for b in layer.blobs)
        self._shares_params = [any(users[self._param_owner_of[id(b)]] > 1 for b in layer.blobs)
                               for layer in self.engine_layers]

    def _bind_arena(self, params):
        xp, total = self.backend.xp, sum(b.count for b in params)
        data, diff = xp.zeros(total, self.dtype), xp.zeros(total, self.dtype)
        offset = 0
        for blob in params:
            n = blob.count
            data[offset:offset + n] = blob.data.ravel()
            blob.bind(data[offset:offset + n], diff[offset:offset + n])
            offset += n
        self.arena_data, self.arena_diff = data, diff

    def _owner(self, blob):
        return self.learnable_params[self._param_owner_of[id(blob)]]

    def release_params(self, blobs):
        """Drop these learnable params (and rebuild the arena without them, if the net has one),
        for an add-on that holds them in another form (compressed layers, in TEST nets): their
        blobs keep their shapes and hold no memory.  Nets sharing params keep them (False), as a
        dropped param may be another layer's too."""
        if any(self._shares_params):
            return False
        gone = {id(b) for b in blobs}
        if self.arena_data is not None:
            self._bind_arena([b for b in self.learnable_params if id(b) not in gone])
        for blob in blobs:
            blob.release()
        return True

    def replace_layer(self, index, layer):
        """Run `layer` in place of layer `index`, on the same bottoms and tops (an add-on's
        stand-in for a built layer); graphs captured before are void, a layer that read the
        replaced one's copy of its values (copy_source) copies its bottom again, and a fold it
        was part of (a leader and the layers it folds in) is undone."""
        replaced = self.engine_layers[index]
        leader = index - replaced.fold_leader if replaced.fold_leader else index
        span = (replaced if leader == index else self.engine_layers[leader]).fold_followers
        self.engine_layers[index] = layer
        for other in self.engine_layers:
            if other.copy_source is not None and other.copy_source[0] == index:
                other.copy_source = other.bottom_copy = None
        # the replaced layer too: a stand-in may run it, which must then do its own work alone
        for other in [replaced] + (self.engine_layers[leader: leader + span + 1] if span else []):
            other.fold_followers = other.fold_leader = other.fold = 0
        replaced.copy_source = replaced.bottom_copy = None
        self._find_per_call()
        graphs.invalidate(self.backend)

    # *** running ***
    def _layer_index(self, name, default):
        if name is None:
            return default
        if name not in self._layer_names:
            raise NetError(f"no layer named '{name}'{did_you_mean(name, self._layer_names)}")
        return self._layer_names.index(name)

    def run_forward(self, start=0, end=None, sums=None):
        """Run layers start..end (inclusive; end defaults to the last) forward, as one CUDA graph
        replay where it can (espresso/graphs.py).  With `sums` (output_sums()), add each output
        and the loss into them on the device: a test batch with no host round trip.  Returns the
        weighted loss (Caffe's ForwardFromTo, summed in the net's dtype) as a 0-d device array,
        valid until the next run."""
        end = len(self.engine_layers) - 1 if end is None else end

        def run():
            self._loss[...] = sum(self.forward_layers(start, end), self.dtype.type(0))
            if sums is not None:
                for total, name in zip(sums, self.outputs):
                    total += self._blobs[name].data.ravel()
                sums[-1] += self._loss

        self.sync()
        if self.eager_reason(start, end) is None:
            self._decide_per_call(start, end, False)  # (a replay runs no Python: backward reads these)
            self._graphs.run(("forward", start, end, sums is not None), run)
        else:
            run()
        return self._loss

    def output_sums(self):
        """One zeroed flat array per output, then a 0-d loss sum, for run_forward's `sums` (the
        same arrays every time, so a graph holding them stays valid)."""
        xp, counts = self.backend.xp, [self._blobs[name].count for name in self.outputs]
        if self._sums is None or [s.size for s in self._sums[:-1]] != counts:
            self._sums = [xp.zeros(c, self.dtype) for c in counts] + [xp.zeros((), self.dtype)]
        for array in self._sums:
            array.fill(0)
        return self._sums

    def _find_per_call(self):
        self._per_call = [i for i, layer in enumerate(self.engine_layers)
                          if layer.copy_source is not None or layer.fold_followers or layer.fold_leader]

    def _decide_per_call(self, start, end, hooks):
        """What a forward of layers start..end decides per call (Builder's copy_source and folds):
        a layer reads another's copy of its bottom where that layer runs in the forward, and folds
        where its leader and it both run; never with callbacks (a hook may change a blob between)."""
        for i in self._per_call:
            if not start <= i <= end:
                continue
            layer = self.engine_layers[i]
            if layer.copy_source is not None:
                writer, blob = layer.copy_source
                layer.bottom_copy = blob if start <= writer and not hooks else None
            if layer.fold_followers:  # the ones that run in this forward
                layer.fold = 0 if hooks else min(layer.fold_followers, end - i)
            elif layer.fold_leader:  # where its leader runs in it too
                layer.fold = not hooks and start <= i - layer.fold_leader

    def forward_layers(self, start, end, losses=True):
        """Run layers start..end eagerly; the weighted loss terms (device scalars), unsummed
        (not computed when not `losses`).  A chain of layers that split the batch alike runs as
        one split (Layer.batch_parts), where no callbacks run between them."""
        terms, hooks = [], any(self._callbacks.values())  # (a call per layer less at batch 1)
        self._decide_per_call(start, end, hooks)
        chain = _Chain(self, forward=True)
        for i in range(start, end + 1):
            layer, bottom, top = self.engine_layers[i], self.bottom_vecs[i], self.top_vecs[i]
            if chain.layers and layer.batch_parts is None:
                chain.run()  # before this layer's reshape, which may read its bottoms
            if hooks:
                self._call("before_forward", i)
            if self._checked_at[i] != graphs.version(self.backend):  # some blob changed shape since: look
                shapes = [b.shape for b in bottom]
                if shapes != self._reshaped_for[i]:
                    layer.reshape(bottom, top)
                    self._reshaped_for[i] = shapes
                self._checked_at[i] = graphs.version(self.backend)
            if layer.batch_parts is not None and not hooks and not any(layer.loss_weights):
                chain.add(i)
                continue
            chain.run()  # (a layer that could split but runs alone here, after its reshape)
            layer.forward(bottom, top)
            if losses and (layer.is_loss or any(layer.loss_weights)):  # before the callbacks, as Caffe
                terms += [(blob.data * blob.diff).sum() for blob, w in zip(top, layer.loss_weights) if w]
            if hooks:
                self._call("after_forward", i)
        chain.run()
        return terms

    def backward_range(self, start, end):
        """Backpropagate from layer start down to layer end (Caffe's BackwardFromTo), chains of
        layers that split the batch alike as one split (as forward_layers)."""
        self.sync()
        hooks = any(self._callbacks.values())
        chain = _Chain(self, forward=False)
        # param grads may run aside, joined at the end (not when callbacks may read them between)
        with self.backend.overlapping(not hooks):
            for i in range(start, end - 1, -1):
                self._call("before_backward", i)
                if self.engine_layers[i].batch_parts is not None and self.layer_need_backward[i] and not hooks:
                    chain.add(i)
                    continue
                chain.run()
                self._backward_layer(i)
            chain.run()

    def _backward_layer(self, i):
        """Layer i's own backward, where it needs one, then what follows each layer's."""
        if self.layer_need_backward[i]:
            # a diff that other layers accumulate into too is never written by two streams
            with self.backend.overlapping(not self._shares_params[i]):
                layer = self.engine_layers[i]
                layer.backward(self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i])
        self._layer_backward_done(i)

    def _layer_backward_done(self, i):
        self._call("after_backward", i)
        for final in self.gradients_final:
            final(i)

    def forward_backward(self):
        """One loss evaluation and gradient accumulation; returns the loss (Caffe's ForwardBackward)."""
        loss = float(self.run_forward())
        self.check_problems()
        self.backward_range(len(self.engine_layers) - 1, 0)
        return loss

    def check_problems(self):
        """Raise what the layers' device checks recorded (labels that are no class), in one read
        back; pycaffe's forward, forward_backward and the solver call it where they read values
        back anyway, so a CUDA graph never waits on the host for it."""
        found = [problem for problem in (layer.device_problem() for layer in self.engine_layers) if problem is not None]
        if not found:
            return
        values = self.backend.to_host(self.backend.xp.stack([array for array, _ in found]))
        for (array, error), row in zip(found, values):
            if row[0]:
                array.fill(0)
                raise error(*(int(v) for v in row))

    def data_cursors(self):
        """{layer name: cursor} of the layers that read datasets, for a snapshot."""
        cursors = {layer.name: layer.cursor() for layer in self.engine_layers}
        return {name: cursor for name, cursor in cursors.items() if cursor is not None}

    def eager_reason(self, start=0, end=None):
        """Why layers start..end cannot run as a CUDA graph, or None when they can."""
        if any(self._callbacks.values()):
            return "pycaffe callbacks (before_forward etc.) run between the layers"
        return graphs.eager_reason(self.backend, self.engine_layers[start:None if end is None else end + 1])

    def _call(self, when, i):
        """Run the `when` callbacks for layer i; what they wrote through the views reaches the
        device before the next layer runs."""
        for callback in self._callbacks[when]:
            callback(i)
            self.sync()

    def reshape(self):
        """Propagate input shape changes through every layer (Caffe's Net::Reshape)."""
        self.sync()
        for i, layer in enumerate(self.engine_layers):
            layer.reshape(self.bottom_vecs[i], self.top_vecs[i])
            self._reshaped_for[i] = [b.shape for b in self.bottom_vecs[i]]

    def clear_param_diffs(self):
        self.sync()
        if self.arena_diff is not None:
            self.arena_diff[...] = 0
            return
        for blob in self.learnable_params:  # a TEST net's, made on first use (blob.diff)
            blob.diff[...] = 0

    def sync(self):
        """Write host-side changes made through pycaffe's views (of this net or any other on
        the backend, such as nets sharing its weights) to the device (GPU nets only).  Every
        method that runs or changes the net calls it first."""
        if self._host_sync is not None:
            self._host_sync.flush()

    def share_with(self, other):
        """Caffe's ShareTrainedLayersWith: this net's layers use `other`'s weights (by layer name)."""
        self.sync()
        index = {name: i for i, name in enumerate(self._layer_names)}
        for source in other.engine_layers:
            target = index.get(source.name)
            if target is None:
                continue
            for mine, theirs in zip(self.engine_layers[target].blobs, source.blobs):
                if mine.shape != theirs.shape:
                    raise ShapeError(f"layer '{source.name}': cannot share {theirs.shape} with {mine.shape}")
                mine.share_data(theirs)


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


class _Chain:
    """Consecutive layers of one pass that split the batch alike (Layer.batch_parts): they run as
    one split, each part's images through all of them on one thread, so a pass forks and joins
    its threads once per chain rather than once per layer (LeNet: 5 layers a chain each way).
    A chain of one layer runs as that layer alone does."""

    def __init__(self, net, forward):
        self.net, self.forward, self.layers, self.ranges = net, forward, [], None

    def add(self, i):
        """Take layer i (its batch_parts set), running the chain so far first where its ranges
        differ or, in backward, where its parts read the whole top diff."""
        layer = self.net.engine_layers[i]
        if layer.batch_parts != self.ranges or (not self.forward and layer.parts_read_whole_top_diff):
            self.run()
        self.layers.append(i)
        self.ranges = layer.batch_parts

    def run(self):
        layers, ranges, net = self.layers, self.ranges, self.net
        if not layers:
            return
        self.layers, self.ranges = [], None
        if len(layers) == 1:  # as the layer runs alone (it may split otherwise, or not at all)
            (i,) = layers
            if self.forward:
                net.engine_layers[i].forward(net.bottom_vecs[i], net.top_vecs[i])
            else:
                net._backward_layer(i)
            return
        if self.forward:
            net.backend.over_ranges(ranges, functools.partial(self._forward_parts, layers))
            return
        allocate_diffs(b for i in layers for b in net.top_vecs[i] + net.bottom_vecs[i] + net.engine_layers[i].blobs)
        net.backend.over_ranges(ranges, functools.partial(self._backward_parts, layers))
        for i in layers:
            net.engine_layers[i].backward_parts_done(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
            net._layer_backward_done(i)

    def _forward_parts(self, layers, part, lo, hi):
        net = self.net
        for i in layers:
            net.engine_layers[i].forward_part(net.bottom_vecs[i], net.top_vecs[i], part, lo, hi)

    def _backward_parts(self, layers, part, lo, hi):
        net = self.net
        for i in layers:
            net.engine_layers[i].backward_part(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i],
                                               part, lo, hi)
