"""The training loop, as Caffe's Solver and SGDSolver run it (solver.cpp, sgd_solver.cpp).

Solver(param or path) builds the train net (phase TRAIN merged with train_state) and the test
nets (phase TEST merged with test_state), which share the train net's weights.  `step(n)` runs
Caffe's loop: test -> clear diffs -> forward/backward iter_size times -> display -> update ->
iter += 1 -> snapshot; `solve()` adds resume, the final snapshot and the final display/test.
Progress is logged in Caffe's format on the "espresso" logger.

Deliberate differences from Caffe: a NaN or infinite loss stops training with an EspressoError
before the update (Caffe trains on); `solver_mode`/`device_id` are left to the caller (as in
pycaffe: espresso.set_mode_gpu()); a `net`/`test_net` path not found from the working
directory is also looked up beside the solver file, and a restored state's learned_net beside
the state file.  Snapshots are BINARYPROTO or HDF5 (needs h5py), as snapshot_format says.
"""

import logging
import math
import os
import signal
import time

import numpy as np

from espresso.errors import EspressoError, ModelFileError
from espresso.net import TEST, TRAIN, Net, load_net_param
from espresso.net.files import check_hdf5_names
from espresso.proto import caffe_pb2
from espresso.proto.text import read_text, to_text
from espresso.proto.upgrade import upgrade_solver
from espresso.runtime import set_random_seed, solver_rank
from espresso.solver.graphed import DeviceLoop, eager_solver_reason
from espresso.solver.lr_policy import learning_rate
from espresso.solver.resume import restore_cursors, save_cursors
from espresso.solver.state import read_state, read_state_hdf5, resolve_learned_net, write_state, write_state_hdf5
from espresso.solver.updates import ArenaUpdater, format_g, rule_class

log = logging.getLogger("espresso")


class SolverAction:
    """What an action function asks of the running solver (Caffe's SolverAction::Enum)."""

    NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"


# *** reading the solver parameter ***
def read_solver_param(path):
    """A SolverParameter from a prototxt file, upgraded as Caffe's ReadSolverParamsFromTextFile."""
    param = upgrade_solver(read_text(path, caffe_pb2.SolverParameter()))
    if not param.HasField("snapshot_prefix"):  # Caffe: the solver file's path without extension
        param.snapshot_prefix = os.path.splitext(os.fspath(path))[0]
    elif os.path.isdir(param.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
    return param


def _solver_param(solver):
    if isinstance(solver, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(solver)
        return upgrade_solver(param), ""
    return read_solver_param(solver), os.path.dirname(os.fspath(solver))


class Solver:
    """A Caffe solver; pycaffe's surface: net, test_nets, iter, step, solve, snapshot, restore."""

    forced_type = None  # set by SGDSolver & co., which ignore the file's `type` as pycaffe's do

    def __init__(self, solver, dtype=np.float32, allow_python=False):
        self.param, self._dir = _solver_param(solver)
        self.allow_python = allow_python  # Python layers in its nets (they run code the file names)
        if self.forced_type:
            self.param.type = self.forced_type
        rule_class(self.param.type)  # an unknown type fails before any net is built
        self.root, self.group = solver_rank() == 0, None  # a data-parallel rank (espresso/parallel.py)
        self._check_param()
        log.info("Initializing solver from parameters:\n%s", to_text(self.param))
        if self.param.random_seed >= 0:  # (data-parallel ranks: the same nets; each its own stream after)
            set_random_seed(self.param.random_seed)
        self.net = self._train_net(dtype)
        self.test_nets = self._test_nets(dtype) if self.root else []  # rank 0 alone tests
        self.updater = ArenaUpdater(self.net, self.param)
        learning_rate(self.param, 0, 0, self.net.dtype)  # a bad lr_policy fails here, not mid-run
        if self.param.snapshot and _check_format(self.param):  # refused now, not at the first snapshot
            check_hdf5_names(self.net, f"{self.param.snapshot_prefix}_iter_N.caffemodel.h5")
        log.info("Solver scaffolding done.")
        self.iter, self.current_step = 0, 0
        self.smoothed_loss, self._losses, self._start_iter = 0.0, [], 0
        self.requested_early_exit = False
        self.test_scores = [None] * len(self.test_nets)
        self._callbacks, self._action = [], None
        self._loop, self._eager_logged = None, None
        self.observers = []  # f(event) for "display" and "test": progress bars, curves
        self.extras = {}  # what snapshots also save and restore (espresso/solver/resume.py)
        self.after_update = []  # f() after each update: add-ons keeping weights in a form (pruning, fixed point)

    @property
    def type(self):
        return self.param.type

    # *** setup ***
    def _check_param(self):
        p = self.param
        if p.average_loss < 1:
            raise EspressoError(f"solver: average_loss must be >= 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise EspressoError(f"solver: iter_size must be >= 1, got {p.iter_size}")
        if p.debug_info:
            log.warning("solver: debug_info is not supported; ignored")
        if p.snapshot and self.root:  # (rank 0 alone writes snapshots)
            self._check_snapshot_writable()

    def _check_snapshot_writable(self):
        """Caffe's CheckSnapshotWritePermissions: fail now rather than at the first snapshot."""
        p = self.param
        if not p.HasField("snapshot_prefix"):
            raise EspressoError("solver: snapshot is specified but snapshot_prefix is not")
        _check_format(p)
        probe = f"{p.snapshot_prefix}_iter_0.tempfile"
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            raise EspressoError(f"solver: cannot write to snapshot prefix '{p.snapshot_prefix}' "
                                f"({e.strerror}); make sure that the directory exists and is "
                                "writeable") from None

    def _net_source(self, value):
        """A NetParameter field as is; a path as given, else relative to the solver file."""
        if isinstance(value, caffe_pb2.NetParameter):
            return value
        if not os.path.exists(value) and self._dir and os.path.exists(os.path.join(self._dir, value)):
            return os.path.join(self._dir, value)
        return value

    def _build_net(self, source, phase, state_rule, dtype):
        """Caffe's NetState precedence: phase < the net's own state < train_state/test_state."""
        state = caffe_pb2.NetState(phase=phase)
        state.MergeFrom(load_net_param(source)[0].state)
        if state_rule is not None:
            state.MergeFrom(state_rule)
        net = Net(source, state=state, dtype=dtype, allow_python=self.allow_python)
        for entry in self.param.weights:  # Caffe's LoadNetWeights: comma-separated files
            for path in entry.split(","):
                net.copy_from(path.strip())
        return net

    def _train_net(self, dtype):
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(fields) != 1:
            got = ", ".join(fields) or "none"
            raise EspressoError("solver: specify the train net with exactly one of net, net_param, "
                                f"train_net, train_net_param (got {got})")
        source = self._net_source(getattr(p, fields[0]))
        if fields[0] in ("net", "train_net"):  # Caffe's words
            log.info("Creating training net from %s file: %s", fields[0], getattr(p, fields[0]))
        else:
            log.info("Creating training net specified in %s.", fields[0])
        return self._build_net(source, TRAIN, p.train_state, dtype)

    def _test_sources(self):
        p = self.param
        generic = [f for f in ("net", "net_param") if p.HasField(f)]
        if len(generic) > 1:
            raise EspressoError("solver: net and net_param may not both be given")
        sources = list(p.test_net_param) + [self._net_source(path) for path in p.test_net]
        if (len(p.test_iter) < len(sources)) if generic else (len(p.test_iter) != len(sources)):
            raise EspressoError(f"solver: test_iter must be given once per test net "
                                f"({len(sources)} test nets, {len(p.test_iter)} test_iter)")
        if generic:
            sources += [self._net_source(getattr(p, generic[0]))] * (len(p.test_iter) - len(sources))
        if p.test_state and len(p.test_state) != len(sources):
            raise EspressoError(f"solver: test_state must be unspecified or given once per test net "
                                f"({len(sources)} test nets, {len(p.test_state)} test_state)")
        if sources and p.test_interval <= 0:
            raise EspressoError(f"solver: {len(sources)} test net(s) need test_interval > 0, "
                                f"got {p.test_interval}")
        return sources

    def _test_nets(self, dtype):
        nets = []
        for i, source in enumerate(self._test_sources()):
            rule = self.param.test_state[i] if self.param.test_state else None
            log.info("Creating test net (#%d)", i)
            net = self._build_net(source, TEST, rule, dtype)
            net.share_with(self.net)  # Caffe's ShareTrainedLayersWith, once: the arena never moves
            nets.append(net)
        return nets

    # *** the loop ***
    def add_callback(self, on_start, on_gradients_ready):
        """pycaffe's add_callback: called before forward/backward and before the update."""
        self._callbacks.append((on_start, on_gradients_ready))

    def set_action_function(self, function):
        """`function()` -> SolverAction.NONE / STOP / SNAPSHOT, polled once per iteration."""
        self._action = function

    def _requested_action(self):
        return self._action() if self._action is not None else SolverAction.NONE

    def step(self, iters):
        """Run `iters` iterations (Caffe's Solver::Step): each a replay of one CUDA graph on a
        GPU when the net and solver allow it (espresso/solver/graphed.py), else eagerly."""
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self._start_iter, self._losses, self.smoothed_loss = start_iter, [], 0.0
        self._timer, self._iters_last = time.perf_counter(), self.iter
        loop = self._device_loop()
        try:
            while self.iter < stop_iter:
                if self._test_due():
                    self.test_all()
                    if self.group is not None:  # a stop asked of rank 0 while it tested
                        self.requested_early_exit = self.group.agree(self.requested_early_exit)
                    if self.requested_early_exit:
                        break
                if loop is None:
                    self._eager_iteration(start_iter)
                else:
                    self._device_iteration(loop, start_iter, stop_iter)
                self.iter += 1
                if self._after_iteration():
                    break
        finally:
            if loop is not None:
                self._absorb(loop.losses(), start_iter)
                loop.close()

    def _eager_iteration(self, start_iter):
        p = self.param
        self.net.clear_param_diffs()
        for on_start, _ in self._callbacks:
            on_start()
        loss = sum(self.net.forward_backward() for _ in range(p.iter_size)) / p.iter_size
        self._absorb([(self.iter, loss)], start_iter, before_update=True)
        if p.display and self.iter % p.display == 0:
            self._display()
        for _, on_gradients_ready in self._callbacks:
            on_gradients_ready()
        self.share_gradients()
        self.apply_update()

    def _device_iteration(self, loop, start_iter, stop_iter):
        """Queue one iteration; the losses are read back only when displayed (or a window fills)."""
        p = self.param
        rate, step = loop.run(stop_iter)
        self._log_rate(rate, step)
        if p.display and self.iter % p.display == 0:
            self._absorb(loop.losses(), start_iter)
            self._display()
            log.info("Iteration %d, lr = %s", self.iter, format_g(rate))
        elif loop.queued == len(loop.host_rates):
            self._absorb(loop.losses(), start_iter)

    def _device_loop(self):
        """The graph runner for this solver, or None (with the reason logged once) for eager."""
        reason = eager_solver_reason(self)
        if reason is not None:
            if self.net.backend.can_capture and reason != self._eager_logged:
                log.info("Training eagerly: %s", reason)
                self._eager_logged = reason
            return None
        if self._loop is None:
            self._loop = DeviceLoop(self)
        return self._loop

    def _absorb(self, pairs, start_iter, before_update=False):
        """Take (iteration, loss) pairs into the smoothed loss; stop on a non-finite loss."""
        for it, loss in pairs:
            if not math.isfinite(loss):
                when = "before the update" if before_update else \
                    "(the GPU reads losses back in batches and before each snapshot: the updates " \
                    "queued after it have run, no snapshot holds them)"
                raise EspressoError(f"iteration {it}: the loss is {loss}; training stopped {when} "
                                    f"(lower base_lr, or check the data)")
            self._update_smoothed_loss(loss, start_iter, it)

    def _test_due(self):
        p = self.param
        due = p.test_interval and self.iter % p.test_interval == 0
        return due and (self.iter > 0 or p.test_initialization)

    def _after_iteration(self):
        """Snapshot when due or asked for; True when this iteration's request is a stop (as in
        Caffe's Step, an earlier stop ends a later step() only where a test falls due)."""
        request = self._requested_action()
        if self.group is not None:  # rank 0's request, for every rank
            request = self.group.agree(request)
        if (self.param.snapshot and self.iter % self.param.snapshot == 0) or request == SolverAction.SNAPSHOT:
            self.snapshot()
        if request == SolverAction.STOP:
            self.requested_early_exit = True
        return request == SolverAction.STOP

    def _update_smoothed_loss(self, loss, start_iter, it=None):
        """Caffe's UpdateSmoothedLoss: a running mean over the last average_loss losses."""
        if len(self._losses) < self.param.average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = ((self.iter if it is None else it) - start_iter) % self.param.average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / self.param.average_loss
            self._losses[idx] = loss

    def _display(self):
        now = time.perf_counter()
        lapse = now - self._timer
        per_s = (self.iter - self._iters_last) / (lapse or 1)
        log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, format_g(per_s), format_g(lapse),
                 self.param.display, format_g(self.smoothed_loss))
        self._timer, self._iters_last = now, self.iter
        outputs = [(name, self.net.blobs[name].host_data().ravel()) for name in self.net.outputs]
        _log_outputs("Train", self.net, outputs)
        self._notify("display")

    def _notify(self, event):
        for observer in self.observers:
            observer(event)

    def share_gradients(self):
        """A data-parallel rank's gradients averaged over the ranks (espresso/parallel.py), as
        Caffe's NCCL callback does before the update; a lone solver's stay as they are."""
        if self.group is not None:
            self.group.average(self.net.arena_diff)

    def apply_update(self):
        """Caffe's SGDSolver::ApplyUpdate: learning rate, then the arena-wide update."""
        self.net.sync()  # weights edited through pycaffe's host views (GPU) reach the device first
        p = self.param
        rate, step = learning_rate(p, self.iter, self.current_step, self.net.dtype)
        self._log_rate(rate, step)
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, format_g(rate))
        self.updater.apply(rate, self.iter)
        for hook in self.after_update:
            hook()

    @property
    def lr(self):
        """pycaffe's SGDSolver.lr: the learning rate of the current iteration."""
        return float(learning_rate(self.param, self.iter, self.current_step, self.net.dtype)[0])

    def share_weights(self, net):
        """pycaffe's Solver.share_weights: `net` uses the training net's weights (by layer name)."""
        net.share_with(self.net)

    def _log_rate(self, rate, step):
        if self.param.lr_policy == "multistep" and step != self.current_step:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, step)
        self.current_step = step

    def solve(self, resume_file=None):
        """Train to max_iter (Caffe's Solver::Solve), resuming from a .solverstate if given."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = float(self.net.run_forward())  # forward only: already updated
            self._update_smoothed_loss(loss, start_iter)
            log.info("Iteration %d, loss = %s", self.iter, format_g(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # *** testing ***
    def test_all(self):
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)
        if self.test_nets:
            self._notify("test")

    def test(self, test_net_id=0):
        """Caffe's Solver::Test: average each output over test_iter forward passes; returns
        {output name: mean values} (also kept in self.test_scores) or None when interrupted."""
        p, net = self.param, self.test_nets[test_net_id]
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        n, sums = p.test_iter[test_net_id], net.output_sums()
        for _ in range(n):
            if self._poll_during_test():
                log.info("Test interrupted.")
                return None
            net.run_forward(sums=sums)  # on the device: no host round trip per batch
        *sums, loss = [net.backend.to_host(s) for s in sums]
        net.check_problems()
        if p.test_compute_loss:
            log.info("Test loss: %s", format_g(loss / n))
        means = {name: s / s.dtype.type(n) for name, s in zip(net.outputs, sums, strict=True)}
        _log_outputs("Test", net, means.items())
        self.test_scores[test_net_id] = means
        return means

    def _poll_during_test(self):
        """Caffe handles every pending request between test batches; True to stop testing."""
        request = self._requested_action()
        while request != SolverAction.NONE:
            if request == SolverAction.SNAPSHOT:
                self.snapshot()
            elif request == SolverAction.STOP:
                self.requested_early_exit = True
            request = self._requested_action()
        return self.requested_early_exit

    # *** snapshots ***
    def snapshot_filename(self, extension):
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Write <prefix>_iter_N.caffemodel and .solverstate (with snapshot_format HDF5,
        .caffemodel.h5 and .solverstate.h5, as Caffe); returns their paths (None on a data-parallel
        rank other than 0, which leaves snapshots to rank 0)."""
        if not self.root:
            return None
        if self._loop is not None:  # a loss the device queued may be NaN: stop before saving its weights
            self._absorb(self._loop.losses(), self._start_iter)
        hdf5 = _check_format(self.param)
        kind, suffix = ("HDF5", ".h5") if hdf5 else ("binary proto", "")
        model = self.snapshot_filename(".caffemodel" + suffix)
        log.info("Snapshotting to %s file %s", kind, model)
        (self.net.save_hdf5 if hdf5 else self.net.save)(model, diff=self.param.snapshot_diff)
        state = self.snapshot_filename(".solverstate" + suffix)
        log.info("Snapshotting solver state to %s file %s", kind, state)
        history = [self.net.backend.to_host(view) for view in self.updater.history_views()]
        (write_state_hdf5 if hdf5 else write_state)(state, self.iter, model, history, self.current_step,
                                                    save_cursors(self))
        return model, state

    def restore(self, state_file):
        """Load a .solverstate (a name ending in ".h5": HDF5, as Caffe dispatches), its
        learned_net weights and, when Espresso wrote it, the data layers' cursors; stepping on
        continues exactly (with a state of Caffe's, the data starts over as in Caffe)."""
        path = os.fspath(state_file)
        hdf5 = path.endswith(".h5")
        iteration, learned_net, history, current_step, cursors = (read_state_hdf5 if hdf5 else read_state)(path)
        views = self.updater.history_views()
        if len(history) != len(views):
            raise ModelFileError(f"{path}: {len(history)} history blobs, but a {self.type} solver on this "
                                 f"net keeps {len(views)}")
        for i, (array, view) in enumerate(zip(history, views, strict=True)):
            # Blob::FromProto reshapes, so a proto needs the count only; HDF5 loads need the shape
            if (array.shape != view.shape) if hdf5 else (array.size != view.size):
                raise ModelFileError(f"{path}: history {i} has shape {array.shape}, "
                                     f"the net's param has {view.shape}")
        if cursors:
            restore_cursors(self, cursors, path)
        if learned_net:
            self.net.copy_from(resolve_learned_net(path, learned_net))
        for array, view in zip(history, views, strict=True):
            view[...] = self.net.backend.to_device(array.reshape(view.shape), view.dtype)
        self.iter, self.current_step = iteration, current_step


def _check_format(param):
    """True for snapshot_format HDF5, which needs h5py: say so before training, not at the snapshot."""
    if param.snapshot_format != caffe_pb2.SolverParameter.HDF5:
        return False
    from espresso.hdf5 import h5py

    h5py()
    return True


def output_loss_weights(net):
    """Caffe's blob_loss_weights for each output: the weight of the last layer writing it."""
    weights = {}
    for layer in net.engine_layers:
        for name, weight in zip(layer.lp.top, layer.loss_weights, strict=False):
            weights[name] = weight
    return weights


def _log_outputs(kind, net, outputs):
    """Caffe's "    Train net output #k: name = v (* w = w*v loss)" lines, one per value."""
    weights = output_loss_weights(net)
    index = 0
    for name, values in outputs:
        weight = weights.get(name, 0)
        for value in values:
            note = f" (* {format_g(weight)} = {format_g(weight * value)} loss)" if weight else ""
            log.info("    %s net output #%d: %s = %s%s", kind, index, name, format_g(value), note)
            index += 1



# *** signals ***
class SignalHandler:
    """Caffe's SignalHandler: SIGINT and SIGHUP become solver actions, polled once per iteration.

        with SignalHandler(sigint_effect="stop", sighup_effect="snapshot") as handler:
            solver.set_action_function(handler.check)
            solver.solve()   # Ctrl-C stops cleanly (snapshot_after_train writes the snapshot)
    """

    EFFECTS = (SolverAction.STOP, SolverAction.SNAPSHOT, SolverAction.NONE)

    def __init__(self, sigint_effect=SolverAction.STOP, sighup_effect=SolverAction.SNAPSHOT):
        for name, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in self.EFFECTS:
                raise EspressoError(f"{name} must be one of {', '.join(self.EFFECTS)}, got '{effect}'")
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self._got, self._previous = {}, {}

    def __enter__(self):
        self._got = dict.fromkeys(self.effects, False)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.effects}
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        self._got[signum] = True

    def check(self):
        """The pending action (SIGHUP first, as Caffe), clearing the signal it came from."""
        for sig in sorted(self.effects, key=lambda s: s != getattr(signal, "SIGHUP", None)):
            if self._got.get(sig):
                self._got[sig] = False
                return self.effects[sig]
        return SolverAction.NONE


# *** pycaffe's solver classes ***
def _typed(name):
    return type(f"{name}Solver", (Solver,), {"forced_type": name, "__doc__": f"A Solver of type '{name}'."})


SGDSolver = _typed("SGD")
NesterovSolver = _typed("Nesterov")
AdaGradSolver = _typed("AdaGrad")
RMSPropSolver = _typed("RMSProp")
AdaDeltaSolver = _typed("AdaDelta")
AdamSolver = _typed("Adam")
SOLVER_CLASSES = {cls.forced_type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                                   AdaDeltaSolver, AdamSolver)}


def get_solver(path, **kwargs):
    """pycaffe's caffe.get_solver: the solver class named by the file's `type`."""
    param, _ = _solver_param(path)
    cls = SOLVER_CLASSES.get(param.type)
    if cls is None:
        rule_class(param.type)  # raises with the list of known types
    return cls(path, **kwargs)
