"""pycaffe's Net surface over the engine (espresso/net/core.py): blobs and params as pycaffe
shows them, forward/backward with inputs and diffs by name, forward_all, the weight files, the
per-layer callbacks.  Everything here takes and gives host (NumPy) values; on a GPU the views
of espresso/hostview.py carry them to and from the device."""

import collections

import numpy as np

from espresso.errors import NetError, ShapeError
from espresso.hostview import HostView
from espresso.net import files

CALLBACKS = ("before_forward", "after_forward", "before_backward", "after_backward")


class PycaffeNet:
    """The pycaffe methods and properties of Net."""

    # *** views ***
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
                                       for name, layer in zip(self._layer_names, self.engine_layers) if layer.blobs)

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
        for layer, ids in zip(self.engine_layers, self._top_ids):
            weights.update((names[t], float(w)) for t, w in zip(ids, layer.loss_weights))
        return collections.OrderedDict(weights)

    # pycaffe's underscored names (the C++ bindings that its Python wrappers build on)
    @property
    def _inputs(self):
        return [list(self._blobs).index(name) for name in self._input_names]

    @property
    def _outputs(self):
        return [list(self._blobs).index(name) for name in self.outputs]

    @property
    def _blob_loss_weights(self):
        return list(self.blob_loss_weights.values())

    def _forward(self, start, end):
        """Layers start..end forward; the weighted loss (Caffe's ForwardFromTo)."""
        loss = self.run_forward(start, end)
        self.check_problems()
        return float(loss)

    def _backward(self, start, end):
        self.backward_range(start, end)

    def _set_input_arrays(self, data, labels):
        return self.set_input_arrays(data, labels)

    @property
    def layers(self):
        """pycaffe's net.layers: the layers, a Python layer as the user's own object."""
        return [getattr(layer, "user_object", layer) for layer in self.engine_layers]

    @property
    def layer_dict(self):
        return collections.OrderedDict(zip(self._layer_names, self.layers))

    # *** running ***
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
        start_i, end_i = self._layer_index(start, 0), self._layer_index(end, len(self.engine_layers) - 1)
        self.run_forward(start_i, end_i)
        self.check_problems()
        names = self.top_names[self._layer_names[end_i]] if end is not None else self.outputs
        return {name: views[name].data for name in set(names) | set(blobs or ())}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's Net.backward: set output diffs from kwargs, run, return {input name: diff}."""
        views = self.blobs
        for name, value in kwargs.items():
            if name not in self.outputs:
                raise NetError(f"'{name}' is not an output of the net (outputs: {self.outputs})")
            views[name].diff[...] = value
        start_i = self._layer_index(start, len(self.engine_layers) - 1)
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

    def set_input_arrays(self, data, labels):
        """pycaffe's: feed the first MemoryData layer."""
        from espresso.layers.data import set_input_arrays

        return set_input_arrays(self, data, labels)

    # *** callbacks, as Caffe's NetCallback: callback(layer index) ***
    def _add_callback(when):
        def add(self, callback):
            self._callbacks[when].append(callback)

        add.__doc__ = f"pycaffe's: call callback(layer index) {when.replace('_', ' ')} of each layer"
        add.__name__ = when
        return add

    before_forward, after_forward, before_backward, after_backward = map(_add_callback, CALLBACKS)
    del _add_callback

    # *** weight files (espresso/net/files.py) ***
    def copy_from(self, path):
        """Caffe's CopyTrainedLayersFrom: copy weights by layer name; unknown layers are skipped."""
        files.copy_from(self, path)

    def save(self, path, diff=False):
        """Write the weights (with `diff`, their gradients too) as a binary .caffemodel."""
        files.save(self, path, diff)

    def save_hdf5(self, path, diff=False):
        """Write the weights in Caffe's HDF5 layout (Net::ToHDF5)."""
        files.save_hdf5(self, path, diff)

    def load_hdf5(self, path):
        """Copy weights by layer name from Caffe's HDF5 layout (CopyTrainedLayersFromHDF5)."""
        files.load_hdf5(self, path)
