"""Recurrent layers: RNN, LSTM and Caffe's LSTMUnit helper.

Caffe builds RNN/LSTM as an unrolled inner net (recurrent_layer.cpp); Espresso computes the same
recurrence directly: one matmul for the inputs of all T steps, then a Python loop over the T steps
vectorized over the N streams.  The parameter blobs are those of Caffe's inner net, in its order
and shapes.  Layout is time-major: x (T, N, ...), cont (T, N), outputs (T, N, num_output).

As in Caffe: without expose_hidden each forward starts from the previous forward's final state
(cont = 0 at a step discards it); `reset()` zeroes it.  Deliberate differences: debug_info is
ignored (there is no inner net to log), and when the batch size N changes the carried state keeps
its first min(N, old N) streams and zeroes the rest (Caffe exposes whatever its reshaped buffer
held).  No gradient crosses the exposed h_0/c_0 and h_T/c_T, as in Caffe, unless `backprop_hidden`.
"""

from espresso.errors import NetError, ShapeError
from espresso.layer import Layer, register


# *** element-wise helpers, in place (no allocation in the hot path) ***
def _sigmoid_(xp, a):
    """a <- sigmoid(a), as 0.5·tanh(a/2) + 0.5: no overflow for large |a|."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5


def _one_minus_(xp, a):
    """a <- 1 - a."""
    xp.subtract(1, a, out=a)


def _split4(a):
    """The i, f, o, g quarters of the last axis (Caffe's gate order)."""
    H = a.shape[-1] // 4
    return a[..., :H], a[..., H:2 * H], a[..., 2 * H:3 * H], a[..., 3 * H:]


def _lstm_step_forward(xp, gates, c_prev, cont, c, tanh_c, h, tmp):
    """One LSTM step, Caffe's LSTMUnit.  gates (N, 4H): pre-activations in, activations out,
    with the forget gate already multiplied by cont (f = cont·σ(f'), as Caffe stores it).
    cont: (N, 1).  Writes c = f·c_prev + i·g, tanh_c = tanh(c), h = o·tanh(c)."""
    H = c.shape[-1]
    _sigmoid_(xp, gates[:, :3 * H])
    xp.tanh(gates[:, 3 * H:], out=gates[:, 3 * H:])
    i, f, o, g = _split4(gates)
    f *= cont
    xp.multiply(f, c_prev, out=c)
    xp.multiply(i, g, out=tmp)
    c += tmp
    xp.tanh(c, out=tanh_c)
    xp.multiply(o, tanh_c, out=h)


def _lstm_step_backward(xp, acts, c_prev, tanh_c, dh, dc, dgates, tmp):
    """Backward of one LSTM step.  dc holds dE/dc_t on entry (top diff plus the later steps')
    and dE/dc_{t-1} on exit; dgates (N, 4H) receives dE/d(gate pre-activations).
    NOTE: the forget-gate diff is dc·c_prev·f·(1-f) with f = cont·σ(f'), exactly as Caffe's
    LSTMUnit computes it; it equals the true derivative for binary cont."""
    i, f, o, g = _split4(acts)
    di, df, do, dg = _split4(dgates)
    xp.multiply(tanh_c, tanh_c, out=tmp)  # dc += dh·o·(1 - tanh²c)
    _one_minus_(xp, tmp)
    tmp *= o
    tmp *= dh
    dc += tmp
    xp.subtract(1, o, out=do)  # do = dh·tanh c·o(1-o)
    do *= o
    do *= tanh_c
    do *= dh
    xp.subtract(1, i, out=di)  # di = dc·g·i(1-i)
    di *= i
    di *= g
    di *= dc
    xp.subtract(1, f, out=df)  # df = dc·c_prev·f(1-f)
    df *= f
    df *= c_prev
    df *= dc
    xp.multiply(g, g, out=dg)  # dg = dc·i·(1-g²)
    _one_minus_(xp, dg)
    dg *= i
    dg *= dc
    dc *= f  # dE/dc_{t-1}


class _RecurrentLayer(Layer):
    """Caffe's RecurrentLayer: bottoms x (T, N, ...), cont (T, N), [x_static (N, ...)],
    [h_0 (and c_0) (1, N, num_output) with expose_hidden]; tops y (T, N, num_output),
    [h_T (and c_T) with expose_hidden]."""

    param = "recurrent_param"
    states = ("h",)  # the recurrent state blobs, in Caffe's bottom/top order
    gates = 1  # rows of the input/recurrent weights per hidden unit
    # Caffe 1.0 shares only the *data* of the exposed h_0/c_0 with its inner net and zeroes
    # the diffs of h_T/c_T, so no gradient crosses the exposed state: the h_0/c_0 diffs are
    # zero and the h_T/c_T top diffs are ignored.  Set True for full BPTT across them.
    backprop_hidden = False

    # *** set-up ***
    def check_blob_counts(self, bottom, top):
        extra = len(self.states) if self.p.expose_hidden else 0
        self.min_bottoms, self.max_bottoms, self.exact_tops = 2 + extra, 3 + extra, 1 + extra
        super().check_blob_counts(bottom, top)

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1  # never into the sequence indicators

    def setup(self, bottom, top):
        p = self.p
        if p.num_output <= 0:
            self.fail(f"recurrent_param.num_output: must be > 0, got {p.num_output}")
        self.expose = p.expose_hidden
        self.static = len(bottom) > 2 + (len(self.states) if self.expose else 0)
        self._check_x(bottom[0])
        self.T, self.H = bottom[0].shape[0], p.num_output
        self.D = bottom[0].count_range(2)
        self.Ds = bottom[2].count_range(1) if self.static else 0
        self._check_static(bottom)
        self.blobs = self._make_params()
        self.N = None

    def _make_params(self):
        """Caffe's inner-net params: W_x (G, D), b (G), [W_x_static (G, Ds)], W_h (G, H), G = gates·H."""
        p, G = self.p, self.gates * self.H
        w_x, b, w_static, w_h = self.param_names
        params = [self._param(w_x, (G, self.D), p.weight_filler), self._param(b, (G,), p.bias_filler)]
        if self.static:
            params.append(self._param(w_static, (G, self.Ds), p.weight_filler))
        return params + [self._param(w_h, (G, self.H), p.weight_filler)]

    def _param(self, name, shape, filler):
        blob = self.new_blob(shape, filler)
        blob.name = name
        return blob

    # *** shape checks ***
    def _check_x(self, x):
        if x.num_axes < 3:  # Caffe's inner InnerProduct uses axis 2
            self.fail(f"bottom 0 (x) must have at least 3 axes (T, N, ...), got shape {x.shape}", ShapeError)

    def _check_static(self, bottom):
        if not self.static:
            return
        xs, N = bottom[2], bottom[0].shape[1]
        if xs.num_axes < 2 or xs.shape[0] != N:
            self.fail(f"bottom 2 (x_static) must have shape ({N}, ...), got {xs.shape}", ShapeError)
        if xs.count_range(1) != self.Ds:
            self.fail(f"bottom 2 (x_static): {xs.count_range(1)} features per stream, "
                      f"the layer was set up for {self.Ds}", ShapeError)

    def _check_shapes(self, bottom):
        x, cont = bottom[0], bottom[1]
        self._check_x(x)
        if x.shape[0] != self.T:
            self.fail(f"input number of timesteps changed: {x.shape[0]}, set up with {self.T}", ShapeError)
        if x.count_range(2) != self.D:
            self.fail(f"bottom 0 (x): {x.count_range(2)} features per step, "
                      f"the layer was set up for {self.D}", ShapeError)
        if cont.shape != x.shape[:2]:
            self.fail(f"bottom 1 (cont) must have shape (T, N) = {x.shape[:2]}, got {cont.shape}", ShapeError)
        self._check_static(bottom)
        want = (1, x.shape[1], self.H)
        for k in self._hidden_bottoms(bottom):
            if bottom[k].shape != want:
                self.fail(f"bottom {k} shape must match hidden state input shape {want}, "
                          f"got {bottom[k].shape}", ShapeError)

    def _hidden_bottoms(self, bottom):
        """Indices of the exposed initial-state bottoms (h_0[, c_0])."""
        first = 2 + self.static
        return list(range(first, len(bottom))) if self.expose else []

    # *** reshape ***
    def reshape(self, bottom, top):
        self._check_shapes(bottom)
        N = bottom[0].shape[1]
        if N != self.N:
            self._allocate(N)
        top[0].reshape(self.T, N, self.H)
        for blob in top[1:]:
            blob.reshape(1, N, self.H)

    def _allocate(self, N):
        """Workspaces for N streams.  The carried state (Caffe copies h_T of the previous forward
        into h_0) keeps its first min(N, old N) streams; new streams start at zero."""
        xp, T, H, G = self.xp, self.T, self.H, self.gates * self.H
        old = [getattr(self, name + "s")[T] for name in self.states] if self.N else []
        z = lambda *shape: xp.zeros(shape, self.dtype)  # noqa: E731
        for k, name in enumerate(self.states):  # hs / cs: (T+1, N, H), step 0 is the initial state
            setattr(self, name + "s", z(T + 1, N, H))
            if old:
                n = min(N, old[k].shape[0])
                getattr(self, name + "s")[T, :n] = old[k][:n]
        self.pre, self.dpre = z(T, N, G), z(T, N, G)  # gate pre-activations and their diff
        self.hc = z(T, N, H)  # cont_t · h_{t-1}, the recurrent matmul's input
        self.pre_static, self.dstatic = z(N, G), z(N, G)
        self.dh, self.dprev, self.tmp = z(N, H), z(N, H), z(N, H)
        self.N = N
        self._allocate_more(N)

    def _allocate_more(self, N):
        pass

    # *** forward pieces ***
    def _gate_inputs(self, bottom):
        """pre (T, N, G) = W_x x_t + b [+ W_x_static x_static], for all steps in one matmul."""
        T, N, G = self.T, self.N, self.gates * self.H
        w, b = self.blobs[0].data, self.blobs[1].data
        self.k.matmul(bottom[0].data.reshape(T * N, self.D), w.T, out=self.pre.reshape(T * N, G))
        self.pre += b
        if self.static:
            self.k.matmul(bottom[2].data.reshape(N, self.Ds), self.blobs[2].data.T, out=self.pre_static)
            self.pre += self.pre_static

    def _initial_state(self, bottom):
        """Step 0: the exposed h_0 (c_0) bottoms, else the final state of the previous forward."""
        hidden = self._hidden_bottoms(bottom)
        for k, name in enumerate(self.states):
            states = getattr(self, name + "s")
            states[0] = bottom[hidden[k]].data[0] if hidden else states[self.T]

    def _expose_final(self, top):
        if self.expose:
            for k, name in enumerate(self.states):
                top[1 + k].data[0] = getattr(self, name + "s")[self.T]

    def _conted(self, cont, t):
        """hc[t] = cont_t · h_{t-1}: a zero cont starts a new sequence."""
        self.xp.multiply(self.hs[t], cont[t][:, None], out=self.hc[t])
        return self.hc[t]

    # *** backward pieces ***
    def _check_propagate(self, propagate_down):
        if propagate_down[1]:
            self.fail("Cannot backpropagate to sequence indicators.", NetError)

    def _final_state_diff(self, top, k):
        """The diff of exposed top h_T / c_T entering BPTT (ignored, as in Caffe, by default)."""
        return top[1 + k].diff[0] if self.expose and self.backprop_hidden else None

    def _initial_state_diff(self, propagate_down, bottom, k, diff):
        """Write dE/dh_0 (dE/dc_0) into an exposed bottom: zero unless backprop_hidden."""
        hidden = self._hidden_bottoms(bottom)
        if hidden and propagate_down[hidden[k]]:
            target = bottom[hidden[k]].diff[0]
            if self.backprop_hidden:
                target[...] = diff
            else:
                target[...] = 0

    def _accumulate(self, k, a, b):
        """blobs[k].diff += a @ b, in the GEMM (beta = 1)."""
        if self.param_propagate_down[k]:
            self.k.matmul(a, b, out=self.blobs[k].diff, accumulate=True)

    def _accumulate_bias(self, k, d2):
        if self.param_propagate_down[k]:
            self.add_row_sums(d2, self.blobs[k].diff)

    def _backward_inputs(self, propagate_down, bottom):
        """From dpre (T, N, G): the diffs of W_x, b, W_x_static, W_h, x and x_static."""
        xp, T, N, H, G = self.xp, self.T, self.N, self.H, self.gates * self.H
        d2, x2 = self.dpre.reshape(T * N, G), bottom[0].data.reshape(T * N, self.D)
        self._accumulate(0, d2.T, x2)
        self._accumulate_bias(1, d2)
        self._accumulate(2 + self.static, d2.T, self.hc.reshape(T * N, H))
        if propagate_down[0]:
            self.k.matmul(d2, self.blobs[0].data, out=bottom[0].diff.reshape(T * N, self.D))
        if self.static:
            xp.sum(self.dpre, axis=0, out=self.dstatic)  # x_static feeds every step
            self._accumulate(2, self.dstatic.T, bottom[2].data.reshape(N, self.Ds))
            if propagate_down[2]:
                self.k.matmul(self.dstatic, self.blobs[2].data, out=bottom[2].diff.reshape(N, self.Ds))

    def _recurrent_diff(self, cont, t, w_h):
        """dprev = cont_t · (dpre_t @ W_h): the gradient reaching h_{t-1}."""
        self.k.matmul(self.dpre[t], w_h, out=self.dprev)
        self.dprev *= cont[t][:, None]
        return self.dprev

    def reset(self):
        """Caffe's RecurrentLayer::Reset: zero the state carried between forward passes."""
        for name in self.states:
            getattr(self, name + "s")[...] = 0


@register
class RNNLayer(_RecurrentLayer):
    """Elman RNN: h_t = tanh(W_hh (cont_t·h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]),
    o_t = tanh(W_ho h_t + b_o).  Honors recurrent_param: num_output, weight_filler, bias_filler,
    expose_hidden, debug_info (ignored: there is no inner net to log).  Params, in Caffe's order:
    W_xh (H, D), b_h (H), [W_xh_static (H, Ds)], W_hh (H, H), W_ho (H, H), b_o (H)."""

    type = "RNN"
    param_names = ("W_xh", "b_h", "W_xh_static", "W_hh")

    def _make_params(self):
        p, H = self.p, self.H
        w_ho, b_o = self._param("W_ho", (H, H), p.weight_filler), self._param("b_o", (H,), p.bias_filler)
        return super()._make_params() + [w_ho, b_o]

    def _allocate_more(self, N):
        z = lambda *shape: self.xp.zeros(shape, self.dtype)  # noqa: E731
        self.o, self.dh_all = z(self.T, N, self.H), z(self.T, N, self.H)  # outputs; dE/dh_t

    def forward(self, bottom, top):
        xp, hs, cont = self.xp, self.hs, bottom[1].data
        self._gate_inputs(bottom)
        self._initial_state(bottom)
        w_hh = self.blobs[2 + self.static].data
        for t in range(self.T):
            self.k.matmul(self._conted(cont, t), w_hh.T, out=hs[t + 1])
            hs[t + 1] += self.pre[t]
            xp.tanh(hs[t + 1], out=hs[t + 1])
        w_ho, b_o = self.blobs[-2].data, self.blobs[-1].data
        self.k.matmul(hs[1:], w_ho.T, out=self.o)
        self.o += b_o
        xp.tanh(self.o, out=self.o)
        top[0].data[...] = self.o
        self._expose_final(top)

    def backward(self, top, propagate_down, bottom):
        self._check_propagate(propagate_down)
        xp, T, N, H = self.xp, self.T, self.N, self.H
        cont, hs, do = bottom[1].data, self.hs, self.dpre  # dpre doubles as dE/d(o pre-activation)
        xp.multiply(self.o, self.o, out=do)
        _one_minus_(xp, do)
        do *= top[0].diff
        n = len(self.blobs)
        self._accumulate(n - 2, do.reshape(T * N, H).T, hs[1:].reshape(T * N, H))
        self._accumulate_bias(n - 1, do.reshape(T * N, H))
        self.k.matmul(do, self.blobs[n - 2].data, out=self.dh_all)
        final = self._final_state_diff(top, 0)
        if final is not None:
            self.dh_all[T - 1] += final
        self._bptt(cont)
        self._backward_inputs(propagate_down, bottom)
        self._initial_state_diff(propagate_down, bottom, 0, self.dprev)

    def _bptt(self, cont):
        """dpre_t = dE/dh_t · (1 - h_t²), walking back from t = T-1; leaves dE/dh_0 in dprev."""
        xp, hs, w_hh = self.xp, self.hs, self.blobs[2 + self.static].data
        for t in reversed(range(self.T)):
            xp.multiply(hs[t + 1], hs[t + 1], out=self.dpre[t])
            _one_minus_(xp, self.dpre[t])
            self.dpre[t] *= self.dh_all[t]
            dprev = self._recurrent_diff(cont, t, w_hh)
            if t:
                self.dh_all[t - 1] += dprev


@register
class LSTMLayer(_RecurrentLayer):
    """LSTM, gates in Caffe's order i, f, o, g: c_t = cont_t·f·c_{t-1} + i·g, h_t = o·tanh(c_t),
    gate inputs W_hc (cont_t·h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static].  Honors
    recurrent_param: num_output, weight_filler, bias_filler, expose_hidden (bottoms h_0, c_0; tops
    h_T, c_T), debug_info (ignored).  Params, in Caffe's order: W_xc (4H, D), b_c (4H),
    [W_xc_static (4H, Ds)], W_hc (4H, H)."""

    type = "LSTM"
    states = ("h", "c")
    gates = 4
    param_names = ("W_xc", "b_c", "W_xc_static", "W_hc")

    def _allocate_more(self, N):
        z = lambda *shape: self.xp.zeros(shape, self.dtype)  # noqa: E731
        self.acts = self.pre  # the gate pre-activations become the activations step by step
        self.tanh_c = z(self.T, N, self.H)
        self.dc = z(N, self.H)

    def forward(self, bottom, top):
        xp, hs, cs, cont = self.xp, self.hs, self.cs, bottom[1].data
        self._gate_inputs(bottom)
        self._initial_state(bottom)
        w_hc = self.blobs[2 + self.static].data
        for t in range(self.T):
            gates = self.acts[t]
            self.k.matmul(self._conted(cont, t), w_hc.T, out=gates, accumulate=True)
            _lstm_step_forward(xp, gates, cs[t], cont[t][:, None], cs[t + 1], self.tanh_c[t],
                               hs[t + 1], self.tmp)
        top[0].data[...] = hs[1:]
        self._expose_final(top)

    def backward(self, top, propagate_down, bottom):
        self._check_propagate(propagate_down)
        xp, T, cont, dtop = self.xp, self.T, bottom[1].data, top[0].diff
        w_hc = self.blobs[2 + self.static].data
        self.dh[...] = dtop[T - 1]
        final_h, final_c = self._final_state_diff(top, 0), self._final_state_diff(top, 1)
        if final_h is not None:
            self.dh += final_h
        self.dc[...] = 0 if final_c is None else final_c
        for t in reversed(range(T)):
            _lstm_step_backward(xp, self.acts[t], self.cs[t], self.tanh_c[t], self.dh, self.dc,
                                self.dpre[t], self.tmp)
            dprev = self._recurrent_diff(cont, t, w_hc)
            if t:
                xp.add(dtop[t - 1], dprev, out=self.dh)
        self._backward_inputs(propagate_down, bottom)
        self._initial_state_diff(propagate_down, bottom, 0, self.dprev)
        self._initial_state_diff(propagate_down, bottom, 1, self.dc)


@register
class LSTMUnitLayer(Layer):
    """One LSTM step (Caffe's helper for LSTM): bottoms c_prev (1, N, H), gate inputs (1, N, 4H)
    in order i, f, o, g, cont (1, N); tops c (1, N, H), h (1, N, H).  No parameters."""

    type = "LSTMUnit"
    exact_bottoms = 3
    exact_tops = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2  # never into the sequence indicators

    def reshape(self, bottom, top):
        N = bottom[0].shape[1] if bottom[0].num_axes > 1 else None
        for k, blob in enumerate(bottom):
            axes = 2 if k == 2 else 3
            if blob.num_axes != axes or blob.shape[0] != 1 or blob.shape[1] != N:
                self.fail(f"bottom {k} must have {axes} axes (1, N{', ...' if axes == 3 else ''}) with "
                          f"N = {N}, got shape {blob.shape}", ShapeError)
        H = bottom[0].shape[2]
        if bottom[1].shape[2] != 4 * H:
            self.fail(f"bottom 1 (gate inputs) must have 4·H = {4 * H} channels, got {bottom[1].shape[2]}",
                      ShapeError)
        top[0].reshape(bottom[0].shape)
        top[1].reshape(bottom[0].shape)
        if getattr(self, "acts", None) is None or self.acts.shape != (N, 4 * H):
            z = lambda *shape: self.xp.zeros(shape, self.dtype)  # noqa: E731
            self.acts, self.dgates = z(N, 4 * H), z(N, 4 * H)
            self.tanh_c, self.dc, self.tmp = z(N, H), z(N, H), z(N, H)

    def forward(self, bottom, top):
        self.acts[...] = bottom[1].data[0]
        _lstm_step_forward(self.xp, self.acts, bottom[0].data[0], bottom[2].data[0][:, None],
                           top[0].data[0], self.tanh_c, top[1].data[0], self.tmp)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            self.fail("Cannot backpropagate to sequence indicators.", NetError)
        if not (propagate_down[0] or propagate_down[1]):
            return
        self.dc[...] = top[0].diff[0]
        _lstm_step_backward(self.xp, self.acts, bottom[0].data[0], self.tanh_c, top[1].diff[0],
                            self.dc, self.dgates, self.tmp)
        if propagate_down[0]:
            bottom[0].diff[0] = self.dc
        if propagate_down[1]:
            bottom[1].diff[0] = self.dgates
