"""Training iterations as replays of one CUDA graph (DESIGN rule 3).

The graph holds a whole iteration of Caffe's loop after the test: clear the param diffs,
forward/backward iter_size times, record the loss, and the update at this iteration's learning
rate.  The rates are computed on the host for a window of iterations and uploaded once; the graph
picks its own with a device counter, and writes its loss into a device ring that the host reads
only when it needs the losses (display, the end of `step`, a full window).  So iterations queue
back to back with no host round trip.  Graphs cannot hold clipping's logged norm, Adam's
per-iteration bias correction or the pycaffe callbacks; solvers using them run eagerly.
"""

import numpy as np

from espresso.graphs import GraphCache
from espresso.solver.lr_policy import learning_rates

WINDOW = 1000  # iterations per rate upload and, at most, between loss reads


def eager_solver_reason(solver):
    """Why `solver` cannot train with graphs, or None when it can."""
    p = solver.param
    if solver._callbacks or solver.after_update:
        return "pycaffe callbacks run between forward/backward and the update, or hooks after it"
    if p.type == "Adam":
        return "Adam's bias correction changes every iteration"
    if p.clip_gradients >= 0:
        return "gradient clipping logs the norm it reads back"
    return solver.net.eager_reason()


def _scalar_loss(net):
    """The net's loss blob when it has one, of one element (its diff holds the loss weight)."""
    blobs = [blob for layer, top in zip(net.engine_layers, net.top_vecs)
             for blob, w in zip(top, layer.loss_weights) if w]
    return blobs[0] if len(blobs) == 1 and blobs[0].count == 1 else None


def early_update(solver):
    """(layer, params) where the update may start before the backward ends: the first layer with
    params, if it shares none, owns the first `params` learnable params (the builder lists them in
    layer order), and every other param's gradient is final once the layers above it are done;
    their update then runs beside its backward (it was the step's last kernel, waiting for conv1's
    filter gradient in LeNet).  None unless the fused SGD step runs, alone (no all-reduce, which
    needs every gradient first)."""
    net = solver.net
    if solver.updater.fused is None or solver.group is not None or net.gradients_final:
        return None
    for i, layer in enumerate(net.engine_layers):
        if layer.blobs:
            owned = len(layer.blobs)
            return None if net._shares_params[i] or owned == len(net.learnable_params) else (i, owned)
    return None


class DeviceLoop:
    """Runs iterations of `solver` on the device; `run()` queues one, `losses()` reads back the
    (iteration, loss) pairs queued since the last read."""

    def __init__(self, solver):
        self.solver, net = solver, solver.net
        xp, dtype = net.backend.xp, net.dtype
        self.xp, self.graphs = xp, GraphCache(net.backend)
        self.rates, self.ring = xp.zeros(WINDOW, dtype), xp.zeros(WINDOW, dtype)
        self.rate, self.loss = xp.zeros((), dtype), xp.zeros((), dtype)
        self.slot = xp.zeros((), np.int64)
        self.first, self.queued, self.read = None, 0, 0  # the window's first iteration, counts
        self.host_rates = []

    def run(self, stop_iter):
        """Queue iteration solver.iter of a step ending before `stop_iter`; returns the (rate,
        current_step) it uses."""
        if self.first is None or self.queued == len(self.host_rates):
            self._new_window(stop_iter)
        rate, step = self.host_rates[self.queued]
        self.solver.net.sync()
        self.graphs.run("iteration", self._iteration)
        self.queued += 1
        return rate, step

    def _new_window(self, stop_iter):
        """Rates for the next iterations up to WINDOW of them, but not past the step's end
        (pycaffe's step(1) loops must not pay for a thousand); Caffe's GetLearningRate, in
        order.  The ring must have been read (callers read at the end of every step)."""
        s = self.solver
        if self.read != self.queued:
            raise RuntimeError("DeviceLoop: losses not read before a new window")
        self.host_rates = learning_rates(s.param, s.iter, min(s.iter + WINDOW, stop_iter), s.current_step,
                                         s.net.dtype)
        rates = np.zeros(WINDOW, s.net.dtype)  # the device table keeps its size: the graph holds it
        rates[:len(self.host_rates)] = [r for r, _ in self.host_rates]
        self.rates[...] = s.net.backend.to_device(rates)
        self.slot.fill(0)
        self.first, self.queued, self.read = s.iter, 0, 0

    def _iteration(self):
        """What the graph holds: Caffe's iteration from ClearParamDiffs to ApplyUpdate."""
        s, xp = self.solver, self.xp
        net, last, size = s.net, len(s.net.engine_layers) - 1, s.param.iter_size
        loss = _scalar_loss(net)
        if size == 1 and loss is not None and net.backend.k.record_iteration is not None:
            backend = net.backend
            # off the critical path, on the second stream (not where callbacks or Python layers,
            # which may read the diffs through host views, run between the layers):
            overlap = net.eager_reason() is None
            with backend.overlapping(overlap):
                with backend.aside():  # the diffs zeroed beside the forward (which never reads them)
                    net.arena_diff.fill(0)
                net.forward_layers(0, last, losses=False)
                backend.join()  # (before any gradient accumulates into them)
                with backend.aside():  # the bookkeeping (rate, loss, slot) in one kernel, beside the backward
                    backend.k.record_iteration(loss.data, loss.diff, self.rates, self.ring, self.slot, self.rate)
                split = early_update(s) if overlap else None
                net.backward_range(last, 0 if split is None else split[0] + 1)
                if split is not None:
                    with backend.aside():  # after all the work queued so far, on both streams
                        s.updater.apply_params(self.rate, split[1], len(net.learnable_params))
                    net.backward_range(split[0], 0)
            if split is not None:
                return s.updater.apply_params(self.rate, 0, split[1])
            s.share_gradients()  # (NCCL's all-reduce is captured too)
            s.updater.apply(self.rate, s.iter)
            return
        xp.take(self.rates, self.slot, out=self.rate)
        net.arena_diff.fill(0)
        total = None
        for _ in range(size):
            loss = sum(net.forward_layers(0, last), net.dtype.type(0))
            net.backward_range(last, 0)
            total = loss if total is None else total + loss
        xp.divide(total, net.dtype.type(size), out=self.loss)
        xp.put(self.ring, self.slot, self.loss)
        self.slot += 1
        s.share_gradients()
        s.updater.apply(self.rate, s.iter)

    def losses(self):
        """[(iteration, loss)] queued since the last call (waits for them); a full window is
        closed so that the next run starts a new one."""
        if self.read == self.queued:
            return []
        values = self.solver.net.backend.to_host(self.ring[self.read:self.queued])
        self.solver.net.check_problems()
        pairs = [(self.first + self.read + i, float(v)) for i, v in enumerate(values)]
        self.read = self.queued
        if self.queued == len(self.host_rates):
            self.first = None
        return pairs

    def close(self):
        """End the window (the solver's iteration may be moved, e.g. by restore)."""
        self.losses()
        self.first = None
