"""Fixed-point training: Gupta, Agrawal, Gopalakrishnan and Narayanan, "Deep Learning with
Limited Numerical Precision" (ICML 2015), and dynamic fixed point after Courbariaux, Bengio and
David, "Training deep neural networks with low precision multiplications" (2014).

A number in fixed point <IL, FL> is an integer of WL = IL + FL bits (sign included) times
eps = 2**-FL: the range is [-2**(IL-1), 2**(IL-1) - eps], and values outside saturate.
`FixedPoint(net, il, fl, rounding).attach(solver)` keeps a solver's training in that format
while the arithmetic itself stays float32 (as in the paper's simulation, where the GEMM
accumulates in high precision and its result is rounded):

- the weights and biases (the parameters with a non-zero lr_mult): rounded at attach and after
  every update, so the stored model is fixed point and an update smaller than eps/2 is lost
  under round-to-nearest;
- the activations: the tops of every layer with weights and of every layer fed by activations,
  but not of a loss or Accuracy (so data, labels and their splits stay as read), in the train
  and the test nets;
- the back-propagated errors (the bottom diffs each layer writes) and the weight gradients.

Rounding (Gupta's section 3): `nearest` rounds x/eps half up, floor(x/eps + 1/2); `stochastic`
rounds up with probability frac(x/eps), floor(x/eps + u) with u uniform in [0, 1), so a
rounding is exact in expectation.  With `dynamic`, each tensor (a layer's activations, its
errors, each parameter blob, each gradient) has its own FL, started at the given one and kept
by overflow rates: a rounding whose values would overflow more often than `max_overflow` first
widens the range until they fit (at once: saturation is what makes a net diverge); over every
`interval` roundings, when the values would have overflowed less than `max_overflow` with one more
fraction bit, FL grows by one (and an overflow rate still above it takes one).  A tensor whose
first values do not fit starts with the FL that fits them.  WL stays IL + FL.
"""

import math

import numpy as np

from espresso.cursor import CursorError
from espresso.errors import EspressoError

ROUNDINGS = ("nearest", "stochastic")
MAX_FL = 100  # dynamic FLs stay within +-100: 2**fl a float32 for any word
_SKIP_TOPS = ("Accuracy", "Silence")


def parse_format(text):
    """'IL,FL' (e.g. '2,14') -> (2, 14), checked."""
    try:
        il, fl = (int(v) for v in str(text).split(","))
    except ValueError:
        raise EspressoError(f"--fixed-point: give IL,FL (integer and fraction bits, e.g. 2,14), got '{text}'") from None
    check_format(il, fl)
    return il, fl


def check_format(il, fl):
    if not (il >= 1 and fl >= 0 and 2 <= il + fl <= 24):
        raise EspressoError(f"fixed point <{il},{fl}>: needs IL >= 1 (the sign bit included), FL >= 0 and a "
                            f"word IL + FL of 2..24 bits (float32 holds 24 exactly)")


class _Tensor:
    """The format of one tensor: its FL, and its overflow counts under dynamic fixed point."""

    def __init__(self, fl):
        self.fl, self.seen, self.over, self.over_finer, self.peak = fl, 0, 0, 0, 0.0


class FixedPoint:
    """Keeps a net (and the solver training it) in fixed point; see the module docstring."""

    def __init__(self, net, il, fl, rounding="stochastic", dynamic=False, max_overflow=1e-4, interval=50, seed=0):
        check_format(il, fl)
        if rounding not in ROUNDINGS:
            raise EspressoError(f"--rounding: {' or '.join(ROUNDINGS)}, got '{rounding}'")
        self.net, self.xp = net, net.backend.xp
        self.word, self.fl, self.stochastic = il + fl, fl, rounding == "stochastic"
        self.dynamic, self.max_overflow, self.interval = dynamic, max_overflow, interval
        # the test nets' activations draw from a generator of their own: a test (rank 0's alone, in
        # data-parallel training) leaves the training's rounding as every rank draws it
        self.rng, self.test_rng = self.xp.random.default_rng(seed), self.xp.random.default_rng(seed + 1)
        self.noise = None  # one scratch buffer (the uniform draws), as large as the largest tensor rounded
        self.tensors = {}
        self.limit = float(2 ** (self.word - 1))  # |value| / eps must stay below this

    def round(self, array, key, rng=None):
        """Round `array` in place to the format of tensor `key` (stochastically: with `rng`, else
        the training's generator)."""
        flat, xp = array.reshape(-1), self.xp
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = _Tensor(self._first_fl(flat))
        scale = array.dtype.type(2.0 ** t.fl)
        flat *= scale
        if self.dynamic:
            magnitude = xp.abs(flat)
            peak = float(magnitude.max()) if flat.size else 0.0
            if int((magnitude >= self.limit).sum()) > self.max_overflow * flat.size:
                scale = self._widen(t, peak, flat, magnitude)  # before rounding: this rounding fits too
            t.over += int((magnitude >= self.limit).sum())
            t.over_finer += int((magnitude >= self.limit / 2).sum())
            t.peak = max(t.peak, peak)
            t.seen += flat.size
        if self.stochastic:
            flat += self._uniform(flat.size, flat.dtype, rng or self.rng)
            xp.floor(flat, out=flat)
        else:  # floor(x) + (frac(x) >= 1/2): floor(x + 1/2) in float32 would round x + 1/2 first
            low = xp.floor(flat, out=self._scratch(flat.size, flat.dtype))
            xp.add(low, flat - low >= 0.5, out=flat)
        xp.clip(flat, -self.limit, self.limit - 1, out=flat)
        flat /= scale
        if self.dynamic and t.seen >= self.interval * flat.size:
            self._adapt(t)

    def _scratch(self, n, dtype):
        if self.noise is None or self.noise.size < n:
            self.noise = self.xp.empty(n, dtype)
        return self.noise[:n]

    def _uniform(self, n, dtype, rng):
        noise = self._scratch(n, dtype)
        rng.random(n, dtype=dtype, out=noise)  # the size given: CuPy's size None draws one number
        return noise

    def _first_fl(self, values):
        """A tensor's FL: the given one; with `dynamic`, fewer fraction bits if its first values
        would not fit (a range that starts too small saturates the first iterations, and moving
        one bit per interval came too late: LeNet diverged from <4,12> that way)."""
        peak = float(self.xp.abs(values).max()) if self.dynamic and values.size else 0.0
        return self.fl - max(0, math.ceil(math.log2(peak * 2.0 ** self.fl / self.limit))) if peak else self.fl

    def _widen(self, t, peak, flat, magnitude):
        """Give tensor t the integer bits its values (scaled by 2**t.fl, their largest `peak`)
        need, rescaling them (and their magnitudes) in place; the new scale.  Widening waits for
        no interval: a saturated activation stops responding to its weights, which then grow
        without bound (LeNet diverged from <4,12> so while the range caught up one bit at a time)."""
        bits = max(1, math.ceil(math.log2(peak / self.limit)))
        bits = t.fl + MAX_FL if t.fl - bits < -MAX_FL else bits
        t.fl -= bits
        flat *= flat.dtype.type(2.0 ** -bits)
        magnitude *= magnitude.dtype.type(2.0 ** -bits)
        return flat.dtype.type(2.0 ** t.fl)

    def _adapt(self, t):
        """Once an interval: one fraction bit more where the values would still fit (all zeros say
        nothing), one less where they overflowed more often than allowed."""
        if t.over > self.max_overflow * t.seen:
            t.fl -= 1
        elif t.over_finer <= self.max_overflow * t.seen and t.peak > 0:
            t.fl += 1
        t.fl = min(max(t.fl, -MAX_FL), MAX_FL)  # 2**fl stays a float32
        t.seen = t.over = t.over_finer = 0
        t.peak = 0.0

    # *** what is rounded ***
    def trained(self):
        """(k, blob) of the parameters the solver trains: lr_mult 0 ones, such as BatchNorm's
        running statistics, keep their float values."""
        return [(k, blob) for k, blob in enumerate(self.net.learnable_params) if self.net.params_lr[k] != 0]

    def round_weights(self):
        for k, blob in self.trained():
            self.round(blob.data, ("weights", k))

    def round_gradients(self):
        for k, blob in self.trained():
            self.round(blob.diff, ("gradients", k))

    def attach(self, solver):
        """Train with `solver` in fixed point: its weights rounded now and after each update,
        activations, errors and gradients as they are made (test nets: activations)."""
        if solver.net is not self.net:
            raise EspressoError("FixedPoint.attach: made for another net than the solver's")
        self.round_weights()
        self.watch(solver.net)
        for net in solver.test_nets:
            self.watch(net, self.test_rng)
        solver.add_callback(lambda: None, self.round_gradients)
        solver.after_update.append(self.round_weights)
        solver.extras["fixed_point"] = (self.state, self.set_state)  # snapshots keep the formats
        return self

    def state(self):
        """Each tensor's format and overflow counts, as JSON values (for snapshots)."""
        return [[list(key), t.fl, t.seen, t.over, t.over_finer, t.peak] for key, t in self.tensors.items()]

    def set_state(self, entries):
        """Take back what state() gave (a resumed run rounds as the straight run would)."""
        try:
            tensors = {}
            for key, fl, seen, over, over_finer, peak in entries:
                t = tensors[tuple(key)] = _Tensor(int(fl))
                t.seen, t.over, t.over_finer, t.peak = int(seen), int(over), int(over_finer), float(peak)
        except (TypeError, ValueError) as e:
            raise CursorError(f"fixed_point: not the formats a snapshot saves ({e})") from None
        self.tensors = tensors

    def watch(self, net, rng=None):
        """Round `net`'s activations after each forward layer and its errors after each backward
        one (stochastically: from `rng`, else the training's generator)."""
        rounded, names = activations(net), list(net.layer_dict)

        def after_forward(i):  # keyed by layer name: a test net's layers share the train net's formats
            if rounded[i]:
                for k, blob in enumerate(net.top_vecs[i]):
                    self.round(blob.data, ("activations", names[i], k), rng)

        def after_backward(i):
            if net.layer_need_backward[i]:
                for k, (blob, need) in enumerate(zip(net.bottom_vecs[i], net.bottom_need_backward[i])):
                    if need:
                        self.round(blob.diff, ("errors", names[i], k))

        net.after_forward(after_forward)
        net.after_backward(after_backward)

    def formats(self):
        """{tensor: FL} as it stands (with `dynamic`, where each one settled)."""
        return {key: t.fl for key, t in self.tensors.items()}


def activations(net):
    """Per layer, whether its tops are activations: outputs of a layer with weights, or of one
    fed by activations, and not a loss or a metric (so data, labels and their splits are not)."""
    found, rounded = set(), []
    for layer, bottom, top in zip(net.engine_layers, net.bottom_vecs, net.top_vecs):
        fed = bool(layer.blobs) or any(id(b) in found for b in bottom)
        metric = layer.is_loss or any(layer.loss_weights) or layer.type in _SKIP_TOPS
        rounded.append(fed and not metric)
        found.update(id(t) for t in top if fed)
    return rounded


def on_grid(array, fl, word):
    """Whether every value of `array` is a multiple of 2**-fl inside the <word-fl, fl> range (tests)."""
    scaled = np.asarray(array, np.float64) * 2.0 ** fl
    inside = np.all(scaled >= -2 ** (word - 1)) and np.all(scaled <= 2 ** (word - 1) - 1)
    return bool(np.all(scaled == np.round(scaled)) and inside)
