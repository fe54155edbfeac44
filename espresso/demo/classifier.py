"""The demo's model: a deploy net that classifies one image at a time and learns new classes.

`Classifier(model, weights, labels)` loads a deploy prototxt with its weights (.caffemodel, .h5
or a Deep-Compressed .espz) or an .onnx file; with no model, the LeNet that ships in
espresso/demo/model/ (trained on Fashion-MNIST, stored Deep-Compressed).  Compressed weights are
decoded once at load, so that one dense net serves, teaches and exports every model (LeNet's
weights take 1.7 MB so); the demo shows the file's kind and size ("model": {"kind", "bytes"}).

Teaching (`teach`) adds one output to the net's last InnerProduct layer and trains that layer
alone.  Every earlier layer is frozen, so what it computes for an image (the features) never
changes: the features are computed once per image by the deploy net, and the training net is
that InnerProduct and a SoftmaxWithLoss, fed by a MemoryData layer and trained by an
espresso.SGDSolver.  That is the same training as the whole net with lr_mult 0 below the last
layer, without running the frozen layers forward at every iteration.  The old
classes keep their accuracy because every batch mixes in replayed Fashion-MNIST training images
(and the examples of classes taught before); the accuracy on the old classes is measured on the
held-out Fashion-MNIST test images before and after.  So teaching is for Fashion-MNIST models:
1x28x28 input, 10 classes.

The server calls a Classifier from several threads.  Every public method does all its work on
the device under one lock (`_device`), with the backend's CUDA stream made current in the calling
thread: on a GPU, work from another thread, or on another stream, while a net captures a CUDA
graph makes the capture fail.  So classifications wait while a class is taught (0.1 s on this
2-core CPU; the first teaching also computes the features of the replayed and held-out images,
0.4 s: benchmarks/results/demo_teach.txt), and an export copies the weights to a CPU net first.
A model is never changed once served: teaching and reset swap in another one.
"""

import contextlib
import dataclasses
import functools
import threading
import time
from pathlib import Path

import numpy as np

from espresso import backend as backends
from espresso.compress.model_file import CompressedWeights, is_compressed, read_model
from espresso.data import fmnist, idx
from espresso.demo.exports import EXPORTS
from espresso.errors import EspressoError
from espresso.interop.onnx_import import load_onnx, set_weights
from espresso.net import TEST, Net
from espresso.proto import caffe_pb2
from espresso.solver import SGDSolver

MODEL_DIR = Path(__file__).resolve().parent / "model"
SCALE = 1 / 256  # the LeNet example's input scale (transform_param scale 0.00390625): deploy nets take scaled input
TOP = 5
BATCH = 100  # images per forward when computing features or measuring accuracy
REPLAY_PER_CLASS = 50  # Fashion-MNIST training images of each old class mixed into every teaching
MIN_EXAMPLES, MAX_EXAMPLES = 5, 20
MAX_TAUGHT, MAX_NAME = 20, 40  # classes one model may learn; characters in a class name
ITERATIONS, TRAIN_BATCH, PROGRESS_EVERY = 200, 64, 10
EPOCH_BATCHES = 32  # the class-balanced rows the MemoryData layer cycles through: EPOCH_BATCHES batches
LR = 1.0  # the base learning rate times the features' mean squared norm: the same steps for any net


class DemoError(EspressoError):
    """A request the demo refuses; the message is for the user."""


class Busy(DemoError):
    """A teaching is running, and the request must wait for it."""


@dataclasses.dataclass(eq=False)
class _Model:
    """One version of the model, never changed once served (caches aside)."""

    net: Net  # the served net, batch 1
    labels: list
    kind: str  # "compressed" (loaded from .espz) or "dense"
    stored: dict  # {layer: blobs as the loaded .espz holds them} for the layers not retrained since
    nbytes: int = 0  # the model file's size: .espz when compressed, else .caffemodel
    batch_net: Net | None = None  # on the served net's weights, for batches (features, accuracy)
    replay: tuple | None = None  # (features, labels) of the old classes' examples, replayed in teaching
    held_out: tuple | None = None  # (features, labels) of the held-out Fashion-MNIST test images
    accuracy: float | None = None  # on those


class Classifier:
    """A deploy net with its labels, on the CPU or a GPU (`gpu`: its id), that classifies one
    preprocessed image ((C, H, W) float32, as espresso.demo.preprocess.to_input makes it) and
    learns new classes (teach: the solver trains on the process's backend, espresso.set_mode_*;
    the layer it trains is small)."""

    def __init__(self, model=None, weights=None, labels=None, gpu=None):
        if model is None:  # the model the demo ships
            model = MODEL_DIR / "lenet_fmnist.prototxt"
            weights = MODEL_DIR / "lenet_fmnist.espz" if weights is None else weights
            labels = MODEL_DIR / "labels.txt" if labels is None else labels
        device = backends.get("cpu" if gpu is None else f"cuda:{gpu}")  # the process's mode stays as it is
        self._lock = threading.Lock()  # the device work of every public method: see _device
        self._teaching = threading.Lock()  # one teaching (or reset) at a time
        net, kind, stored = _load(model, weights, device)
        self._base = self._model = _new_model(net, _labels(labels, _classes(net)), kind, stored)
        self._fmnist = self.input_shape == (1, 28, 28) and len(self._base.labels) == 10
        self.classify(np.zeros(self.input_shape, np.float32))  # the first forward compiles kernels: not in a request

    @contextlib.contextmanager
    def _device(self):
        """Hold the lock, with the model's device usable from the calling thread (module docstring)."""
        with self._lock:
            _use_in_this_thread(self._base.net.backend)
            yield

    # *** what the server reads ***
    @property
    def input_shape(self):
        net = self._model.net
        return net.blobs[net.inputs[0]].shape[1:]

    @property
    def labels(self):
        return list(self._model.labels)

    @property
    def backend(self):
        return self._model.net.backend.name

    @property
    def teaching(self):
        return self._teaching.locked()

    # *** classifying ***
    def classify(self, array):
        """{"top": the TOP most probable [{"label", "prob"}], "ms": forward time, "backend",
        "model": {"kind": "dense" | "compressed", "bytes"}} for one image."""
        x = self._check_input(array)
        with self._device():
            model = self._model
            start = time.perf_counter()
            scores = np.array(model.net.forward(**{model.net.inputs[0]: x[None]})[model.net.outputs[-1]]).ravel()
            ms = (time.perf_counter() - start) * 1e3
        probs = _probabilities(scores)
        top = np.argsort(-probs, kind="stable")[:TOP]
        return {"top": [{"label": model.labels[i], "prob": float(probs[i])} for i in top], "ms": ms,
                "backend": model.net.backend.name, "model": {"kind": model.kind, "bytes": model.nbytes}}

    def _check_input(self, array):
        x = np.asarray(array, np.float32)
        shape = self.input_shape
        if x.shape == shape[1:] and shape[0] == 1:
            x = x[None]
        if x.shape != shape:
            raise DemoError(f"an input of shape {x.shape}; the model takes {shape}")
        if not np.isfinite(x).all():
            raise DemoError("the input has values that are not finite")
        return x

    # *** teaching ***
    def teach(self, name, examples, iterations=ITERATIONS, progress=None):
        """Learn the class `name` from `examples` (MIN_EXAMPLES to MAX_EXAMPLES inputs as classify
        takes them), training for `iterations` and calling progress(iteration, loss) every
        PROGRESS_EVERY (with the model locked: it must not call the classifier); then serve the new
        model.  Returns {"name", "iterations", "loss", "seconds", "accuracy": {"old_before",
        "old_after", "new"}}: the accuracy on the held-out Fashion-MNIST test images before and
        after, and the share of the examples now classified as `name`."""
        if not self._fmnist:
            raise DemoError(f"teaching replays Fashion-MNIST images to keep the old classes, so it needs a "
                            f"Fashion-MNIST model (1x28x28 input, 10 classes); this one takes {self.input_shape}")
        if not MIN_EXAMPLES <= len(examples) <= MAX_EXAMPLES:
            raise DemoError(f"give {MIN_EXAMPLES} to {MAX_EXAMPLES} examples, got {len(examples)}")
        xs = np.stack([self._check_input(x) for x in examples])
        if not self._teaching.acquire(blocking=False):
            raise Busy("a class is being taught; wait until it is done")
        try:  # the name is checked against the labels that no other teaching can change now
            name = self.check_name(name)
            with self._device():
                return self._teach(name, xs, iterations, progress or (lambda iteration, loss: None))
        finally:
            self._teaching.release()

    def check_name(self, name):
        """`name` without surrounding spaces, if it can name a new class; else DemoError."""
        name = name.strip() if isinstance(name, str) else ""
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise DemoError(f"a class name must be 1 to {MAX_NAME} printable characters")
        labels = self._model.labels
        if name.casefold() in (label.casefold() for label in labels):
            raise DemoError(f"'{name}' is a class already")
        if len(labels) >= len(self._base.labels) + MAX_TAUGHT:
            raise DemoError(f"{MAX_TAUGHT} classes were taught already: reset the model first")
        return name

    def _teach(self, name, xs, iterations, progress):
        start, old = time.perf_counter(), self._model
        fc = _last_inner_product(old.net)
        self._prepare(old, fc)
        before, features = self._accuracy(old, fc), self._features(old, fc, xs)
        label = len(old.labels)
        blobs, loss = self._train(old.net.layer_dict[fc], features, old.replay, label, iterations, progress)
        new = self._rebuild(old, fc, blobs, name)
        labels = np.concatenate([old.replay[1], np.full(len(xs), label)])
        new.replay, new.held_out = (np.concatenate([old.replay[0], features]), labels), old.held_out
        learned = self._run(new, features, new.net.outputs[-1], start=fc).argmax(1) == label
        after = self._accuracy(new, fc)
        self._model = new
        return {"name": name, "iterations": iterations, "loss": loss, "seconds": time.perf_counter() - start,
                "accuracy": {"old_before": before, "old_after": after, "new": float(learned.mean())}}

    def _features(self, model, fc, images):
        """What the frozen layers give the last InnerProduct layer `fc` for `images`, (N, D)."""
        return self._run(model, images, model.net.bottom_names[fc][0])

    def accuracy_on_old_classes(self):
        """The served model's accuracy on the held-out Fashion-MNIST test images (None when it is
        not a Fashion-MNIST model)."""
        if not self._fmnist:
            return None
        with self._device():
            model = self._model
            fc = _last_inner_product(model.net)
            self._prepare(model, fc)
            return self._accuracy(model, fc)

    def _prepare(self, model, fc):
        """The features of the replayed and of the held-out Fashion-MNIST images: computed once
        for the model as loaded, as teaching changes no layer below `fc`."""
        if model.held_out is None:
            images, labels = _fmnist_replay()
            model.replay = (self._features(model, fc, images), labels)
            images, labels = fmnist_subset("test")
            model.held_out = (self._features(model, fc, as_input(images)), labels)

    def _accuracy(self, model, fc):
        """The accuracy on the held-out images: their features through the model's layers from `fc` on."""
        if model.accuracy is None:
            features, labels = model.held_out
            scores = self._run(model, features, model.net.outputs[-1], start=fc)
            model.accuracy = float(np.mean(scores.argmax(1) == labels))
        return model.accuracy

    def _run(self, model, values, blob, start=None):
        """`blob` for each of `values` ((N, ...): N inputs of the net, or with `start`, N bottoms of
        that layer), as (N, -1), forward in batches of BATCH on the model's weights."""
        if model.batch_net is None:
            model.batch_net = Net(model.net.param, TEST, backend=model.net.backend)
            model.batch_net.share_with(model.net)
        net, out = model.batch_net, []
        source = net.bottom_names[start][0] if start is not None else net.inputs[0]
        for first in range(0, len(values), BATCH):
            batch = values[first:first + BATCH]
            data = net.blobs[net.inputs[0]]
            if data.shape[0] != len(batch):
                data.reshape(len(batch), *data.shape[1:])
                net.reshape()
            net.blobs[source].data[...] = batch.reshape(net.blobs[source].shape)
            net.forward(start=start)
            out.append(np.array(net.blobs[blob].data).reshape(len(batch), -1))
        return np.concatenate(out)

    def _train(self, fc, features, replay, label, iterations, progress):
        """Train `fc` with one more output, `label`, on the examples' features and the replayed
        ones; (its new param blobs, the last loss)."""
        x = np.concatenate([replay[0], features])
        y = np.concatenate([replay[1], np.full(len(features), label)])
        solver = _solver(fc, x.shape[1], label + 1, iterations, LR / float(np.mean(np.sum(x * x, 1))))
        _use_in_this_thread(solver.net.backend)
        for blob, value in zip(solver.net.layer_dict[fc.name].blobs, _with_new_row(fc, features)):
            blob.data[...] = solver.net.backend.to_device(value, solver.net.dtype)
        rows = _balanced(y, TRAIN_BATCH * EPOCH_BATCHES)
        solver.net.set_input_arrays(x[rows].reshape(len(rows), -1, 1, 1), y[rows].astype(np.float32))
        loss = None
        for done in range(0, iterations, PROGRESS_EVERY):
            solver.step(min(PROGRESS_EVERY, iterations - done))
            loss = float(solver.smoothed_loss)
            progress(solver.iter, loss)
        return [blob.host_data() for blob in solver.net.layer_dict[fc.name].blobs], loss

    def _rebuild(self, old, fc, blobs, name):
        """The deploy net with one more class, its last InnerProduct's params `blobs`."""
        param = caffe_pb2.NetParameter()
        param.CopyFrom(old.net.param)
        next(layer for layer in param.layer if layer.name == fc).inner_product_param.num_output += 1
        net = Net(param, TEST, backend=old.net.backend)
        set_weights(net, {**_host_weights(old.net), fc: blobs})
        stored = {layer: b for layer, b in old.stored.items() if layer != fc}
        return _new_model(net, old.labels + [name], old.kind, stored)

    # *** reset and export ***
    def reset(self):
        """Serve the model as loaded again, forgetting the classes taught."""
        if not self._teaching.acquire(blocking=False):
            raise Busy("a class is being taught; reset when it is done")
        try:
            with self._device():
                self._model = self._base
        finally:
            self._teaching.release()

    def export(self, format):
        """The served model as the bytes of a file: see EXPORTS.  Made from a copy of the model on
        the CPU, so that classifications wait only while the weights are copied."""
        if format not in EXPORTS:
            raise DemoError(f"unknown format '{format}' (known: {', '.join(EXPORTS)})")
        with self._device():
            model, weights = self._model, _host_weights(self._model.net)
        net = Net(model.net.param, TEST, backend=backends.get("cpu"))
        set_weights(net, weights)
        return EXPORTS[format][0](dataclasses.replace(model, net=net, batch_net=None))


# *** loading ***
def _load(model, weights, device):
    """(net, kind, stored) of a deploy prototxt and its weights, or of an .onnx file, on `device`."""
    if str(model).endswith(".onnx"):
        if weights is not None:
            raise DemoError(f"{model}: an ONNX file holds its weights; give no weights file")
        return load_onnx(model, backend=device), "dense", {}
    if weights is None:
        raise DemoError(f"{model}: give the weights (.caffemodel, .h5 or .espz)")
    net = Net(model, TEST, backend=device)
    if not is_compressed(weights):
        net.copy_from(weights)
        return net, "dense", {}
    stored = {name: blobs for name, _, blobs in read_model(weights) if name in net.layer_dict}
    set_weights(net, {name: [_dense(b) for b in blobs] for name, blobs in stored.items()})
    return net, "compressed", stored


def _use_in_this_thread(backend):
    """CuPy's current device and stream are the calling thread's: the CUDA backend makes its own
    current in the thread that creates it, and its CUDA graphs capture that stream, so a net run
    from another thread fails to capture unless they are made current there too."""
    if backend.name.startswith("cuda"):
        backend.device.use()
        backend.stream.use()


def _host_weights(net):
    """{layer: [its params as NumPy arrays]}."""
    return {name: [blob.host_data() for blob in layer.blobs] for name, layer in net.layer_dict.items() if layer.blobs}


def _dense(blob):
    return blob.dense() if isinstance(blob, CompressedWeights) else blob


def _classes(net):
    return net.blobs[net.outputs[-1]].count // net.blobs[net.outputs[-1]].shape[0]


def _labels(labels, count):
    """The class names: a list, a file with one a line, or None ("class 0", ...)."""
    if labels is None:
        labels = [f"class {i}" for i in range(count)]
    elif not isinstance(labels, list):
        labels = [line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != count:
        raise DemoError(f"{len(labels)} labels for a model of {count} classes")
    return labels


def _new_model(net, labels, kind, stored):
    model = _Model(net, labels, kind, stored)
    model.nbytes = len(EXPORTS["espz" if kind == "compressed" else "caffemodel"][0](model))
    return model


def _probabilities(scores):
    """The scores if they are a probability distribution already, else their softmax."""
    if scores.min() >= 0 and abs(scores.sum() - 1) < 1e-3:
        return scores.astype(np.float64)
    e = np.exp(scores - scores.max(), dtype=np.float64)
    return e / e.sum()


# *** the data teaching replays ***
@functools.cache
def fmnist_subset(split):
    """(images (N, 28, 28) uint8, labels) of the "train" or "test" split of the Fashion-MNIST subset
    that espresso embeds."""
    files = fmnist.idx_files(fmnist.EMBEDDED_DIR)
    return idx.read_idx(files[f"{split}_images"]), idx.read_idx(files[f"{split}_labels"]).astype(np.int64)


def as_input(images):
    """uint8 grey images (N, H, W) as a LeNet's inputs (N, 1, H, W): float32, scaled by SCALE."""
    return images[:, None].astype(np.float32) * np.float32(SCALE)


def _fmnist_replay():
    """The first REPLAY_PER_CLASS training images of each class, as inputs."""
    images, labels = fmnist_subset("train")
    rows = np.concatenate([np.flatnonzero(labels == c)[:REPLAY_PER_CLASS] for c in range(10)])
    return as_input(images[rows]), labels[rows]


# *** the training ***
def _last_inner_product(net):
    """The name of the net's last InnerProduct layer: the one that teaching extends."""
    names = [name for name, layer in net.layer_dict.items() if layer.type == "InnerProduct"]
    if not names or net.layer_dict[names[-1]].M != 1:  # M: rows per image of batch 1
        raise DemoError("teaching needs a net whose last InnerProduct layer makes the class scores")
    return names[-1]


def _solver(fc, dim, classes, iterations, lr):
    """An SGDSolver for `fc` with `classes` outputs over features (N, dim, 1, 1) and labels,
    given by a MemoryData layer, under a SoftmaxWithLoss."""
    net = caffe_pb2.NetParameter(name="teach")
    data = net.layer.add(name="data", type="MemoryData", top=["features", "label"])
    data.memory_data_param.batch_size, data.memory_data_param.channels = TRAIN_BATCH, dim
    data.memory_data_param.height = data.memory_data_param.width = 1
    layer = net.layer.add()
    layer.CopyFrom(fc.lp)
    for field in ("bottom", "top", "param", "include", "exclude"):
        layer.ClearField(field)
    layer.bottom.append("features")
    layer.top.append("scores")
    layer.inner_product_param.num_output, layer.inner_product_param.axis = classes, 1
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["scores", "label"], top=["loss"])
    param = caffe_pb2.SolverParameter(train_net_param=net, base_lr=lr, momentum=0.9, weight_decay=5e-4,
                                      lr_policy="fixed", max_iter=iterations, display=0)
    return SGDSolver(param)


def _with_new_row(fc, features):
    """fc's params with one more class, whose weights start as the examples' mean feature with
    the norm of the other classes' weights (weight imprinting: the new class is right from the
    first iteration), and whose bias is their mean bias."""
    transpose = fc.p.transpose  # weights (K, N) instead of Caffe's (N, K)
    w = fc.blobs[0].host_data()
    rows = w.T if transpose else w
    mean = features.mean(0)
    row = mean * np.linalg.norm(rows, axis=1).mean() / max(np.linalg.norm(mean), 1e-12)
    rows = np.concatenate([rows, row[None].astype(rows.dtype)])
    blobs = [rows.T if transpose else rows]
    if len(fc.blobs) > 1:
        bias = fc.blobs[1].host_data()
        blobs.append(np.append(bias, bias.mean()).astype(bias.dtype))
    return blobs


def _balanced(labels, count):
    """`count` row indices drawn so that every class comes equally often (seeded: repeatable)."""
    weights = 1 / np.bincount(labels)[labels]
    return np.random.default_rng(0).choice(len(labels), count, p=weights / weights.sum())
