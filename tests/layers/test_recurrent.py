"""RNN, LSTM and LSTMUnit against plain NumPy references written with explicit loops."""

import numpy as np
import pytest

from espresso.errors import LayerParamError, NetError, ShapeError
from espresso.layers.recurrent import LSTMLayer, RNNLayer
from espresso.testing import TEST, LayerRun, assert_close, check_gradient, check_layer

T, N, D, H = 3, 2, 3, 2
FILLERS = 'weight_filler { type: "gaussian" std: 0.6 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


def snippet(kind, expose=False, num_output=H, fillers=FILLERS):
    expose_field = "expose_hidden: true" if expose else ""
    return f'type: "{kind}" recurrent_param {{ num_output: {num_output} {expose_field} {fillers} }}'


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# *** independent references: one stream and one step at a time ***
def rnn_reference(x, cont, params, x_static=None, h0=None):
    """Returns (o (T, N, H), h_T (N, H))."""
    w_xh, b_h = params[0], params[1]
    w_s = params[2] if x_static is not None else None
    w_hh, w_ho, b_o = params[-3], params[-2], params[-1]
    steps, streams, hidden = cont.shape[0], cont.shape[1], b_h.size
    h = np.zeros((streams, hidden)) if h0 is None else np.array(h0).reshape(streams, hidden)
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        new_h = np.zeros_like(h)
        for n in range(streams):
            a = w_xh @ x[t, n].ravel() + b_h + w_hh @ (cont[t, n] * h[n])
            if w_s is not None:
                a = a + w_s @ x_static[n].ravel()
            new_h[n] = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ new_h[n] + b_o)
        h = new_h
    return out, h


def lstm_cell(gates, c_prev, cont):
    """One stream, one step: gates (4H,) in order i, f, o, g."""
    hidden = c_prev.size
    i = sigmoid(gates[:hidden])
    f = sigmoid(gates[hidden:2 * hidden])
    o = sigmoid(gates[2 * hidden:3 * hidden])
    g = np.tanh(gates[3 * hidden:])
    c = cont * f * c_prev + i * g
    return c, o * np.tanh(c)


def lstm_reference(x, cont, params, x_static=None, h0=None, c0=None):
    """Returns (h (T, N, H), h_T (N, H), c_T (N, H))."""
    w_xc, b_c, w_hc = params[0], params[1], params[-1]
    w_s = params[2] if x_static is not None else None
    steps, streams, hidden = cont.shape[0], cont.shape[1], w_hc.shape[1]
    h = np.zeros((streams, hidden)) if h0 is None else np.array(h0).reshape(streams, hidden)
    c = np.zeros((streams, hidden)) if c0 is None else np.array(c0).reshape(streams, hidden)
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        new_h, new_c = np.zeros_like(h), np.zeros_like(c)
        for n in range(streams):
            gates = w_xc @ x[t, n].ravel() + b_c + w_hc @ (cont[t, n] * h[n])
            if w_s is not None:
                gates = gates + w_s @ x_static[n].ravel()
            new_c[n], new_h[n] = lstm_cell(gates, c[n], cont[t, n])
            out[t, n] = new_h[n]
        h, c = new_h, new_c
    return out, h, c


def inputs(rng, steps=T, streams=N, dim=D):
    x = rng.standard_normal((steps, streams, dim))
    cont = np.ones((steps, streams))
    cont[0] = 0  # every stream starts a sequence at step 0
    cont[1, 1] = 0  # stream 1 restarts in the middle
    return x, cont


# *** parameter blobs: Caffe's order, shapes and names ***
@pytest.mark.parametrize("kind, static, names, shapes", [
    ("RNN", False, ["W_xh", "b_h", "W_hh", "W_ho", "b_o"], [(H, D), (H,), (H, H), (H, H), (H,)]),
    ("RNN", True, ["W_xh", "b_h", "W_xh_static", "W_hh", "W_ho", "b_o"],
     [(H, D), (H,), (H, 5), (H, H), (H, H), (H,)]),
    ("LSTM", False, ["W_xc", "b_c", "W_hc"], [(4 * H, D), (4 * H,), (4 * H, H)]),
    ("LSTM", True, ["W_xc", "b_c", "W_xc_static", "W_hc"], [(4 * H, D), (4 * H,), (4 * H, 5), (4 * H, H)]),
])
def test_params_order_shapes_names(rng, kind, static, names, shapes):
    x, cont = inputs(rng)
    bottoms = [x, cont] + ([rng.standard_normal((N, 5))] if static else [])
    run = LayerRun(snippet(kind), bottoms)
    assert [b.name for b in run.layer.blobs] == names
    assert [b.shape for b in run.layer.blobs] == shapes


def test_default_fillers_are_constant_zero(rng):
    run = LayerRun(snippet("LSTM", fillers=""), list(inputs(rng)))
    assert all(not np.any(b.data) for b in run.layer.blobs)


def test_multi_axis_input_is_flattened(rng):
    x = rng.standard_normal((T, N, 2, 3))
    cont = inputs(rng)[1]
    ref = lambda b, p: [rnn_reference(b[0], b[1], p)[0]]  # noqa: E731
    run = check_layer(snippet("RNN"), [x, cont], ref, top_shapes=[(T, N, H)], check_bottoms=[0])
    assert run.layer.blobs[0].shape == (H, 6)


# *** RNN ***
def test_rnn_forward_and_gradient(rng):
    x, cont = inputs(rng)
    check_layer(snippet("RNN"), [x, cont], lambda b, p: [rnn_reference(b[0], b[1], p)[0]],
                top_shapes=[(T, N, H)], check_bottoms=[0])


def test_rnn_static_input(rng):
    x, cont = inputs(rng)
    xs = rng.standard_normal((N, 2, 2))
    ref = lambda b, p: [rnn_reference(b[0], b[1], p, x_static=b[2])[0]]  # noqa: E731
    check_layer(snippet("RNN"), [x, cont, xs], ref, top_shapes=[(T, N, H)], check_bottoms=[0, 2])


def test_rnn_expose_hidden_forward(rng):
    x, cont = inputs(rng)
    cont[0] = 1  # h_0 matters
    h0 = rng.standard_normal((1, N, H))

    def ref(b, p):
        out, h_t = rnn_reference(b[0], b[1], p, h0=b[2])
        return [out, h_t[None]]
    check_layer(snippet("RNN", expose=True), [x, cont, h0], ref, tops=2,
                top_shapes=[(T, N, H), (1, N, H)], grad=False)


def test_rnn_expose_hidden_full_bptt(rng, monkeypatch):
    monkeypatch.setattr(RNNLayer, "backprop_hidden", True)
    x, cont = inputs(rng)
    cont[0] = 1
    xs = rng.standard_normal((N, 2))
    h0 = rng.standard_normal((1, N, H))

    def ref(b, p):
        out, h_t = rnn_reference(b[0], b[1], p, x_static=b[2], h0=b[3])
        return [out, h_t[None]]
    check_layer(snippet("RNN", expose=True), [x, cont, xs, h0], ref, tops=2, check_bottoms=[0, 2, 3])


# *** LSTM ***
def test_lstm_forward_and_gradient(rng):
    x, cont = inputs(rng)
    check_layer(snippet("LSTM"), [x, cont], lambda b, p: [lstm_reference(b[0], b[1], p)[0]],
                top_shapes=[(T, N, H)], check_bottoms=[0])


def test_lstm_static_input(rng):
    x, cont = inputs(rng)
    xs = rng.standard_normal((N, 3))
    ref = lambda b, p: [lstm_reference(b[0], b[1], p, x_static=b[2])[0]]  # noqa: E731
    check_layer(snippet("LSTM"), [x, cont, xs], ref, check_bottoms=[0, 2])


def test_lstm_expose_hidden_forward(rng):
    x, cont = inputs(rng)
    cont[0] = 1
    h0, c0 = rng.standard_normal((2, 1, N, H))

    def ref(b, p):
        out, h_t, c_t = lstm_reference(b[0], b[1], p, h0=b[2], c0=b[3])
        return [out, h_t[None], c_t[None]]
    check_layer(snippet("LSTM", expose=True), [x, cont, h0, c0], ref, tops=3,
                top_shapes=[(T, N, H), (1, N, H), (1, N, H)], grad=False)


def test_lstm_expose_hidden_full_bptt(rng, monkeypatch):
    monkeypatch.setattr(LSTMLayer, "backprop_hidden", True)
    x, cont = inputs(rng)
    cont[0] = 1
    xs = rng.standard_normal((N, 2))
    h0, c0 = rng.standard_normal((2, 1, N, H))

    def ref(b, p):
        out, h_t, c_t = lstm_reference(b[0], b[1], p, x_static=b[2], h0=b[3], c0=b[4])
        return [out, h_t[None], c_t[None]]
    check_layer(snippet("LSTM", expose=True), [x, cont, xs, h0, c0], ref, tops=3, check_bottoms=[0, 2, 3, 4])


@pytest.mark.parametrize("kind, n_states", [("RNN", 1), ("LSTM", 2)])
def test_caffe_exposed_state_carries_no_gradient(rng, kind, n_states):
    """Caffe 1.0: h_0/c_0 get a zero diff and the h_T/c_T top diffs are ignored."""
    x, cont = inputs(rng)
    cont[0] = 1
    states = list(rng.standard_normal((n_states, 1, N, H)))
    run = LayerRun(snippet(kind, expose=True), [x, cont] + states, tops=1 + n_states)
    tops = run.forward()
    top_diff = rng.standard_normal(tops[0].shape)
    down = [True, False] + [True] * n_states
    for blob in run.bottom[2:]:
        blob.diff[...] = 7.0
    run.zero_param_diffs()
    with_final = run.backward([top_diff] + [rng.standard_normal((1, N, H))] * n_states, down)
    params_with = run.param_diffs()
    run.zero_param_diffs()
    without_final = run.backward([top_diff] + [np.zeros((1, N, H))] * n_states, down)
    assert_close(with_final[0], without_final[0], what="x diff")
    for a, b in zip(params_with, run.param_diffs(), strict=True):
        assert_close(a, b, what="param diff")
    for diff in with_final[2:]:
        assert not np.any(diff)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_state_carries_over_between_forwards(rng, kind):
    """Without expose_hidden, Caffe starts each forward from the previous forward's final state."""
    x, cont = inputs(rng)
    cont[0] = 1
    run = LayerRun(snippet(kind), [x, cont])
    params = [np.array(b.data) for b in run.layer.blobs]
    first = run.forward()[0]
    if kind == "RNN":
        ref1, h_t = rnn_reference(x, cont, params)
        ref2 = rnn_reference(x, cont, params, h0=h_t)[0]
    else:
        ref1, h_t, c_t = lstm_reference(x, cont, params)
        ref2 = lstm_reference(x, cont, params, h0=h_t, c0=c_t)[0]
    assert_close(first, ref1)
    assert_close(run.forward()[0], ref2)
    run.layer.reset()
    assert_close(run.forward()[0], ref1)


def test_carried_state_is_used_in_backward(rng):
    """The W_hh diff sees the carried h_0 (a continuing first step), as Caffe's inner net does."""
    x, cont = inputs(rng)
    cont[0] = 1
    run = LayerRun(snippet("RNN"), [x, cont])
    run.forward()  # now h_0 of the next forward is nonzero
    carried = np.array(run.layer.hs[T])
    exposed = LayerRun(snippet("RNN", expose=True), [x, cont, carried[None]], tops=2)
    for src, dst in zip(run.layer.blobs, exposed.layer.blobs, strict=True):
        dst.data[...] = src.data
    assert_close(run.forward()[0], exposed.forward()[0])
    diff = rng.standard_normal((T, N, H))
    run.zero_param_diffs()
    exposed.zero_param_diffs()
    assert_close(run.backward([diff], [True, False])[0],
                 exposed.backward([diff, np.zeros((1, N, H))], [True, False, False])[0])
    for a, b in zip(run.param_diffs(), exposed.param_diffs(), strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_batch_size_change_and_float32(rng, kind):
    x, cont = inputs(rng)
    run = LayerRun(snippet(kind), [x, cont], dtype=np.float32)
    params = [np.array(b.data, np.float64) for b in run.layer.blobs]
    reference = rnn_reference if kind == "RNN" else lstm_reference
    x3, cont3 = inputs(rng, streams=3)
    run.set_bottoms([x3, cont3])
    out = run.forward()[0]
    assert out.dtype == np.float32 and out.shape == (T, 3, H)
    assert_close(out, reference(x3, cont3, params)[0], rtol=1e-4, atol=1e-5)


def test_test_phase_matches_train(rng):
    x, cont = inputs(rng)
    train = LayerRun(snippet("LSTM"), [x, cont])
    test = LayerRun(snippet("LSTM"), [x, cont], phase=TEST)
    for src, dst in zip(train.layer.blobs, test.layer.blobs, strict=True):
        dst.data[...] = src.data
    assert_close(test.forward()[0], train.forward()[0])


# *** errors ***
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_no_gradient_to_cont(rng, kind):
    x, cont = inputs(rng)
    run = LayerRun(snippet(kind), [x, cont])
    run.forward()
    assert not run.layer.allow_force_backward(1) and run.layer.allow_force_backward(0)
    with pytest.raises(NetError, match="Cannot backpropagate to sequence indicators"):
        run.backward([np.ones((T, N, H))], [True, True])


def test_num_output_must_be_positive(rng):
    with pytest.raises(LayerParamError, match="num_output"):
        LayerRun(snippet("RNN", num_output=0), list(inputs(rng)))


@pytest.mark.parametrize("kind, bottoms, match", [
    ("RNN", lambda r: [r.standard_normal((T, N)), np.ones((T, N))], "at least 3 axes"),
    ("RNN", lambda r: [r.standard_normal((T, N, D)), np.ones((T, N + 1))], "cont"),
    ("LSTM", lambda r: [r.standard_normal((T, N, D)), np.ones((T, N, 1))], "cont"),
    ("LSTM", lambda r: [r.standard_normal((T, N, D)), np.ones((T, N)), r.standard_normal((N + 1, 2))],
     "x_static"),
    ("RNN", lambda r: [r.standard_normal((T, N, D)), np.ones((T, N)), r.standard_normal(N)], "x_static"),
])
def test_bad_bottom_shapes(rng, kind, bottoms, match):
    with pytest.raises(ShapeError, match=match):
        LayerRun(snippet(kind), bottoms(rng))


@pytest.mark.parametrize("kind, shapes", [
    ("RNN", [(1, N, H + 1)]),
    ("RNN", [(N, H)]),
    ("LSTM", [(1, N, H), (1, N + 1, H)]),
])
def test_bad_hidden_shapes(rng, kind, shapes):
    x, cont = inputs(rng)
    with pytest.raises(ShapeError, match="hidden state input shape"):
        LayerRun(snippet(kind, expose=True), [x, cont] + [np.zeros(s) for s in shapes], tops=1 + len(shapes))


@pytest.mark.parametrize("kind, expose, n_bottoms, n_tops", [
    ("RNN", False, 1, 1), ("RNN", False, 4, 1), ("RNN", False, 2, 2), ("RNN", True, 2, 2),
    ("LSTM", True, 3, 3), ("LSTM", True, 4, 2), ("LSTM", True, 6, 3),
])
def test_blob_counts(rng, kind, expose, n_bottoms, n_tops):
    bottoms = [rng.standard_normal((T, N, D)), np.ones((T, N))] + [np.zeros((1, N, H))] * 3
    with pytest.raises(NetError, match="bottom|top"):
        LayerRun(snippet(kind, expose=expose), bottoms[:n_bottoms], tops=n_tops)


def test_timesteps_and_features_cannot_change(rng):
    x, cont = inputs(rng)
    run = LayerRun(snippet("RNN"), [x, cont])
    run.set_bottoms(inputs(rng, steps=T + 1))
    with pytest.raises(ShapeError, match="timesteps changed"):
        run.forward()
    run.set_bottoms(inputs(rng, dim=D + 1))
    with pytest.raises(ShapeError, match="features"):
        run.forward()


# *** LSTMUnit ***
def lstm_unit_reference(bottoms, params):
    c_prev, gates, cont = bottoms
    c, h = np.zeros_like(c_prev), np.zeros_like(c_prev)
    for n in range(c_prev.shape[1]):
        c[0, n], h[0, n] = lstm_cell(gates[0, n], c_prev[0, n], cont[0, n])
    return [c, h]


def unit_inputs(rng, streams=3):
    c_prev = rng.standard_normal((1, streams, H))
    gates = rng.standard_normal((1, streams, 4 * H))
    cont = np.array([[0.0, 1.0, 1.0][:streams]])
    return [c_prev, gates, cont]


def test_lstm_unit_forward_and_gradient(rng):
    check_layer('type: "LSTMUnit"', unit_inputs(rng), lstm_unit_reference, tops=2,
                top_shapes=[(1, 3, H), (1, 3, H)], check_bottoms=[0, 1])


def test_lstm_unit_gradient_check_both_tops(rng):
    run = LayerRun('type: "LSTMUnit"', unit_inputs(rng), tops=2)
    check_gradient(run, check_bottoms=[0, 1])


def test_lstm_unit_forget_diff_uses_cont_scaled_gate(rng):
    """Caffe's LSTMUnit: with f = cont·σ(f'), the f' diff is dc·c_prev·f·(1-f) (its formula, kept)."""
    c_prev, gates, _ = unit_inputs(rng, streams=1)
    cont = np.array([[0.5]])
    run = LayerRun('type: "LSTMUnit"', [c_prev, gates, cont], tops=2)
    run.forward()
    dc = rng.standard_normal((1, 1, H))
    diffs = run.backward([dc, np.zeros((1, 1, H))], [True, True, False])
    f = 0.5 * sigmoid(gates[0, 0, H:2 * H])
    assert_close(diffs[1][0, 0, H:2 * H], dc[0, 0] * c_prev[0, 0] * f * (1 - f))
    assert_close(diffs[0][0, 0], dc[0, 0] * f)


@pytest.mark.parametrize("shapes", [
    [(3, H), (3, 4 * H), (3,)],
    [(1, 3, H), (1, 3, 4 * H + 1), (1, 3)],
    [(1, 3, H), (1, 2, 4 * H), (1, 3)],
    [(1, 3, H), (1, 3, 4 * H), (1, 3, 1)],
    [(2, 3, H), (2, 3, 4 * H), (2, 3)],
])
def test_lstm_unit_bad_shapes(shapes):
    with pytest.raises(ShapeError):
        LayerRun('type: "LSTMUnit"', [np.zeros(s) for s in shapes], tops=2)


def test_lstm_unit_no_gradient_to_cont(rng):
    run = LayerRun('type: "LSTMUnit"', unit_inputs(rng), tops=2)
    run.forward()
    assert not run.layer.allow_force_backward(2)
    with pytest.raises(NetError, match="Cannot backpropagate to sequence indicators"):
        run.backward([np.ones((1, 3, H))] * 2, [True, True, True])
