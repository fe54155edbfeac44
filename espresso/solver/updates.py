"""Caffe's update rules as xp code over the whole parameter arena (DESIGN rule 2).

Caffe runs Normalize -> Regularize -> ComputeUpdateValue once per learnable param, with scalar
`local_rate = rate * lr_mult` and `local_decay = weight_decay * decay_mult`.  Here each step is
one pass over the flat `net.arena_diff` / `net.arena_data`, with lr_mult and decay_mult expanded
to per-element vectors once at setup (kept scalar when every param has the same value).  The
history arrays are flat and arena-sized too; `history_views` cuts them back into Caffe's
per-param blobs for snapshots.  Every operation writes into preallocated memory and follows
Caffe's CPU arithmetic step by step (axpby = scale y, then add a*x), so float32 results match.

After `ArenaUpdater.apply` the diff holds the applied update and the data has moved by it.
"""

import logging

import numpy as np

from espresso.errors import EspressoError

log = logging.getLogger("espresso")


class UpdateRule:
    """History and workspaces of one rule; `compute` turns the gradient g into the update."""

    type = None
    history_sets = 1  # AdaDelta and Adam keep a second set after the first (Caffe's layout)
    workspaces = 0

    def __init__(self, param, xp, size, dtype):
        self.p, self.xp, self.f = param, xp, np.dtype(dtype).type
        self.history = [xp.zeros(size, dtype) for _ in range(self.history_sets)]
        self.tmp = [xp.zeros(size, dtype) for _ in range(self.workspaces)]
        self.check()

    def check(self):
        pass

    def require(self, ok, text):
        if not ok:
            raise EspressoError(f"solver type '{self.type}': {text}")

    def compute(self, g, local_rate, it):
        """Overwrite g (the regularized gradient) with the update value (ComputeUpdateValue)."""
        raise NotImplementedError


class SGD(UpdateRule):
    """h = local_rate * g + momentum * h; update = h."""

    type = "SGD"

    def compute(self, g, local_rate, it):
        xp, h = self.xp, self.history[0]
        xp.multiply(h, self.f(self.p.momentum), out=h)
        xp.multiply(g, local_rate, out=g)
        xp.add(h, g, out=h)
        g[...] = h


class Nesterov(UpdateRule):
    """h' = local_rate * g + momentum * h; update = (1 + momentum) * h' - momentum * h."""

    type = "Nesterov"
    workspaces = 1

    def compute(self, g, local_rate, it):
        xp, h, old, m = self.xp, self.history[0], self.tmp[0], self.f(self.p.momentum)
        old[...] = h
        xp.multiply(h, m, out=h)
        xp.multiply(g, local_rate, out=g)
        xp.add(h, g, out=h)
        xp.multiply(old, -m, out=old)
        xp.multiply(h, self.f(1) + m, out=g)
        xp.add(old, g, out=g)


class AdaGrad(UpdateRule):
    """h += g^2; update = local_rate * g / (sqrt(h) + delta)."""

    type = "AdaGrad"
    workspaces = 1

    def check(self):
        self.require(self.p.momentum == 0, f"momentum cannot be used with AdaGrad, got {self.p.momentum}")

    def compute(self, g, local_rate, it):
        xp, h, t = self.xp, self.history[0], self.tmp[0]
        xp.multiply(g, g, out=t)
        xp.add(t, h, out=h)
        _scaled_rms_step(xp, g, h, t, self.f(self.p.delta), local_rate)


class RMSProp(UpdateRule):
    """h = rms_decay * h + (1 - rms_decay) * g^2; update = local_rate * g / (sqrt(h) + delta)."""

    type = "RMSProp"
    workspaces = 1

    def check(self):
        self.require(self.p.momentum == 0, f"momentum cannot be used with RMSProp, got {self.p.momentum}")
        self.require(0 <= self.p.rms_decay < 1, f"rms_decay should lie in [0, 1), got {self.p.rms_decay}")

    def compute(self, g, local_rate, it):
        xp, h, t, decay = self.xp, self.history[0], self.tmp[0], self.f(self.p.rms_decay)
        xp.multiply(g, g, out=t)
        _axpby(xp, self.f(1) - decay, t, decay, h)
        _scaled_rms_step(xp, g, h, t, self.f(self.p.delta), local_rate)


class AdaDelta(UpdateRule):
    """h1 = m h1 + (1-m) g^2; d = g sqrt((h2 + delta) / (h1 + delta)); h2 = m h2 + (1-m) d^2;
    update = local_rate * d.  h1 is history[0], h2 history[1] (Caffe's second set)."""

    type = "AdaDelta"
    history_sets = workspaces = 2

    def compute(self, g, local_rate, it):
        xp, (h1, h2), (u, t) = self.xp, self.history, self.tmp
        m, delta = self.f(self.p.momentum), self.f(self.p.delta)
        xp.multiply(g, g, out=u)
        _axpby(xp, self.f(1) - m, u, m, h1)
        xp.add(h2, delta, out=u)
        xp.add(h1, delta, out=t)
        xp.divide(u, t, out=u)
        xp.sqrt(u, out=u)
        xp.multiply(g, u, out=g)
        xp.multiply(g, g, out=u)
        _axpby(xp, self.f(1) - m, u, m, h2)
        xp.multiply(g, local_rate, out=g)


class Adam(UpdateRule):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    update = local_rate * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + delta), t = iter + 1.
    m is history[0], v history[1] (Caffe's second set); b1 = momentum, b2 = momentum2."""

    type = "Adam"
    history_sets = 2
    workspaces = 1

    def compute(self, g, local_rate, it):
        xp, (m, v), t = self.xp, self.history, self.tmp[0]
        b1, b2 = self.f(self.p.momentum), self.f(self.p.momentum2)
        _axpby(xp, self.f(1) - b1, g, b1, m, t)
        xp.multiply(g, g, out=t)
        _axpby(xp, self.f(1) - b2, t, b2, v)
        xp.sqrt(v, out=t)
        xp.add(t, self.f(self.p.delta), out=t)
        xp.divide(m, t, out=t)
        scale = self._corrected(local_rate, adam_correction(b1, b2, it + 1))
        xp.multiply(t, scale, out=g)

    def _corrected(self, local_rate, correction):
        """Caffe's local_rate * correction, rounded to the net's dtype (in place for a vector:
        the updater refills it every iteration)."""
        if isinstance(local_rate, self.xp.ndarray):
            return self.xp.multiply(local_rate, correction, out=local_rate)
        return local_rate * correction


def adam_correction(beta1, beta2, t):
    """sqrt(1 - beta2^t) / (1 - beta1^t), evaluated in double as Caffe's C++ promotes it."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num = np.sqrt(np.float64(1) - np.power(np.float64(beta2), t))
        return type(beta1)(num / (np.float64(1) - np.power(np.float64(beta1), t)))


def _axpby(xp, a, x, b, y, work=None):
    """y = a*x + b*y as Caffe's fallback does it: y *= b, then y += a*x.  x is overwritten
    with a*x unless `work` is given."""
    xp.multiply(y, b, out=y)
    ax = xp.multiply(x, a, out=x if work is None else work)
    xp.add(y, ax, out=y)


def _scaled_rms_step(xp, g, h, t, delta, local_rate):
    """g = local_rate * g / (sqrt(h) + delta)  (AdaGrad's and RMSProp's tail)."""
    xp.sqrt(h, out=t)
    xp.add(t, delta, out=t)
    xp.divide(g, t, out=t)
    xp.multiply(t, local_rate, out=g)


RULES = {cls.type: cls for cls in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)}


def rule_class(type_name):
    cls = RULES.get(type_name)
    if cls is None:
        raise EspressoError(f"unknown solver type '{type_name}' (known: {', '.join(RULES)})")
    return cls


class ArenaUpdater:
    """Caffe's SGDSolver::ApplyUpdate over a net's parameter arena, for any rule."""

    def __init__(self, net, param):
        self.net, self.p = net, param
        self.xp, dtype = net.backend.xp, net.arena_data.dtype
        self.f = dtype.type
        self.counts = [blob.count for blob in net.learnable_params]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # of each param in the arena
        size = net.arena_data.size
        self.rule = rule_class(param.type)(param, self.xp, size, dtype)
        # Caffe: local_rate = rate * lr_mult in Dtype; local_decay = weight_decay * decay_mult.
        lr_mult = [self.f(v) for v in net.params_lr]
        wd = self.f(param.weight_decay)
        decay = [wd * self.f(v) for v in net.params_weight_decay]
        self.regularize = any(d != 0 for d in decay)
        if self.regularize and param.regularization_type not in ("L1", "L2"):
            raise EspressoError(f"unknown regularization_type '{param.regularization_type}' (known: L1, L2)")
        self.fused = self._fused_sgd(net, param, lr_mult, decay)
        if self.fused is None:  # the xp steps below: per-element multipliers and workspaces
            self.lr_mult, self.decay = self._per_element(lr_mult), self._per_element(decay)
            self.local_rate = self.xp.zeros(size, dtype) if _is_array(self.lr_mult) else None
            self.work = self.xp.zeros(size, dtype) if self.regularize else None

    def _per_element(self, values):
        """One value per param -> a scalar if they are all equal, else a per-element vector."""
        if not values or all(v == values[0] for v in values):
            return values[0] if values else self.f(0)
        host = np.repeat(np.array(values, self.f), self.counts)
        return self.net.backend.to_device(host, self.f)

    def _fused_sgd(self, net, param, lr_mult, decay):
        """The one-pass SGD kernel when the backend has it, else None.  It needs no arena-sized
        multipliers or workspaces (CaffeNet: 1 GB less)."""
        kernel = net.backend.k.sgd_update
        if kernel is None or param.type != "SGD" or not self.counts:
            return None
        self.multipliers, self.segments = (lr_mult, decay), {}
        self._segments(0, len(self.counts))  # (made here, not while a graph is captured)
        return kernel

    def _segments(self, first, end):
        """The kernel's per-param (ends, lr_mult, decay) device arrays for learnable params
        first..end-1, made once."""
        if (first, end) not in self.segments:
            ends = self.offsets[first + 1:end + 1] - self.offsets[first]
            lr_mult, decay = (np.array(values[first:end], self.f) for values in self.multipliers)
            self.segments[first, end] = tuple(self.net.backend.to_device(a) for a in (ends, lr_mult, decay))
        return self.segments[first, end]

    def apply(self, rate, it):
        """Clip, normalize, regularize, compute the update and apply it: w -= update."""
        g, w = self.net.arena_diff, self.net.arena_data
        if self.fused is not None:
            return self._apply_fused(g, w, rate)
        self.clip(g)
        if self.p.iter_size != 1:
            self.xp.multiply(g, self.f(1) / self.f(self.p.iter_size), out=g)
        if self.regularize:
            self.add_decay(g, w)
        self.rule.compute(g, self.rates(rate), it)
        self.xp.subtract(w, g, out=w)

    def _apply_fused(self, g, w, rate):
        """The same steps as below in one kernel (SGD on a GPU)."""
        self.clip(g)
        if not _is_device_scalar(rate) and not self.net.backend.host_arrays:  # (a host kernel takes the scalar)
            rate = self.net.backend.to_device(np.array(rate, self.f))
        self.apply_params(rate, 0, len(self.counts))

    def apply_params(self, rate, first, end):
        """The fused SGD step (without clipping) on learnable params first..end-1 alone: their
        slice of the arena.  A step split so gives the whole step's values: each element's update
        reads its own weight, gradient and history only."""
        lo, hi = self.offsets[first], self.offsets[end]
        w, g, h = (array[lo:hi] for array in (self.net.arena_data, self.net.arena_diff, self.rule.history[0]))
        regularization = {"L2": 1, "L1": 2}[self.p.regularization_type] if self.regularize else 0
        self.fused(w, g, h, self._segments(first, end), rate, self.f(self.p.momentum),
               self.f(1) / self.f(self.p.iter_size), regularization)

    def rates(self, rate):
        """rate * lr_mult (scalar or per element); `rate` may be a 0-d device array (graphs)."""
        rate = rate if _is_device_scalar(rate) else self.f(rate)
        if self.local_rate is None:
            return rate * self.lr_mult
        return self.xp.multiply(self.lr_mult, rate, out=self.local_rate)

    def clip(self, g):
        """Caffe's ClipGradients: scale g by clip/||g|| when the global L2 norm exceeds clip."""
        clip = self.f(self.p.clip_gradients)
        if clip < 0:
            return
        xp = self.xp
        norm = xp.sqrt(xp.dot(g, g))
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = xp.where(norm > clip, clip / norm, self.f(1)).astype(g.dtype)
        if log.isEnabledFor(logging.INFO) and float(norm) > clip:
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     format_g(norm), format_g(clip), format_g(scale))
        xp.multiply(g, scale, out=g)

    def add_decay(self, g, w):
        """Caffe's Regularize: g += local_decay * w (L2) or local_decay * sign(w) (L1)."""
        xp, work = self.xp, self.work
        if self.p.regularization_type == "L2":
            xp.multiply(w, self.decay, out=work)
        else:
            xp.sign(w, out=work)
            xp.multiply(work, self.decay, out=work)
        xp.add(g, work, out=g)

    def history_views(self):
        """Caffe's history_ list: per param (in learnable_params order) for each history set."""
        return [flat[lo:lo + blob.count].reshape(blob.shape) for flat in self.rule.history
                for lo, blob in zip(self.offsets, self.net.learnable_params)]


def _is_array(value):
    return not np.isscalar(value) and getattr(value, "ndim", 0) > 0


def _is_device_scalar(value):
    return getattr(value, "ndim", None) == 0 and not isinstance(value, np.generic) \
        and not isinstance(value, np.ndarray)


def format_g(value):
    """C++ ostream formatting of a number, as Caffe's logs print them (%g, 6 significant digits)."""
    return f"{float(value):g}"
