"""The vision layers against plain NumPy float64 references (explicit loops), with gradient checks."""

import itertools
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import threadpoolctl

import espresso
from espresso import backend as backends
from espresso.backend.cpu.batch_threads import BatchThreads
from espresso.errors import LayerParamError, NetError, ShapeError
from espresso.layers import vision
from espresso.testing import TEST, TRAIN, LayerRun, assert_close, check_layer

GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def distinct(*shape, seed=0):
    """Values at least 0.05 apart (no max-pooling ties), in random order."""
    n = math.prod(shape)
    return (np.random.default_rng(seed).permutation(n) * 0.05 - n * 0.025).reshape(shape)


def raises(error, snippet, bottoms, match=None, **kwargs):
    with pytest.raises(error, match=match):
        LayerRun(snippet, bottoms, **kwargs).forward()


@pytest.fixture(params=["batch_major", "batch_last", "pixel_rows"])
def layout(request, monkeypatch):
    """Run a convolution test with each column layout (the layer picks one by its shapes; pixel
    rows where it can: two or more images, 2-D, one group, not a 1x1 kernel of stride 1 without
    padding, with Numba).  Batch-last and pixel rows on one thread, so that the batch stays whole
    (the `threads` fixture, listed after, splits it again): split over 2 cores, a batch of 2 is
    two parts of 1 image, which take the batch-major layout; batch-major on the machine's threads,
    split so."""
    cpu = backends.get("cpu")
    if request.param == "pixel_rows" and cpu.k.im2row is None:
        pytest.skip("pixel rows need Numba (pip install espresso-nn[fast])")
    major = request.param == "batch_major"
    monkeypatch.setattr(vision, "BATCH_LAST_BELOW", 0 if major else 10 ** 9)
    monkeypatch.setattr(vision, "BATCH_LAST_ROWS", 10 ** 9 if major else 0)
    monkeypatch.setattr(vision, "PIXEL_ROWS", 0 if request.param == "pixel_rows" else 10 ** 9)
    before = cpu.threads
    espresso.set_num_threads(before if major else 1)
    yield request.param
    espresso.set_num_threads(before)


# *** references ***
def conv_size(spatial, kernel, stride, pad, dilation):
    return [(s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, k, st, p, d in zip(spatial, kernel, stride, pad, dilation)]


def conv_ref(x, w, b, stride, pad, dilation, group):
    """Direct convolution, N-D, one output element at a time."""
    n, c = x.shape[:2]
    m, cg, *kernel = w.shape
    spatial = x.shape[2:]
    out = conv_size(spatial, kernel, stride, pad, dilation)
    y = np.zeros((n, m, *out))
    mg = m // group
    for i, o in itertools.product(range(n), range(m)):
        g = o // mg
        for pos in itertools.product(*map(range, out)):
            total = b[o] if b is not None else 0.0
            for ci, tap in itertools.product(range(cg), itertools.product(*map(range, kernel))):
                src = [q * st - p + t * d for q, st, p, t, d in zip(pos, stride, pad, tap, dilation)]
                if all(0 <= s_ < size for s_, size in zip(src, spatial)):
                    total += w[(o, ci, *tap)] * x[(i, g * cg + ci, *src)]
            y[(i, o, *pos)] = total
    return y


def deconv_ref(x, w, b, stride, pad, dilation, group):
    """Transposed convolution as a scatter: each input pixel adds W-weighted copies to the output."""
    n, c = x.shape[:2]
    _, mg, *kernel = w.shape
    spatial = x.shape[2:]
    out = [st * (s - 1) + d * (k - 1) + 1 - 2 * p
           for s, k, st, p, d in zip(spatial, kernel, stride, pad, dilation)]
    y = np.zeros((n, mg * group, *out))
    cg = c // group
    for i, ci in itertools.product(range(n), range(c)):
        g = ci // cg
        positions, taps = itertools.product(*map(range, spatial)), itertools.product(*map(range, kernel))
        for pos, tap in itertools.product(positions, list(taps)):
            dst = [q * st - p + t * d for q, st, p, t, d in zip(pos, stride, pad, tap, dilation)]
            if all(0 <= s_ < size for s_, size in zip(dst, out)):
                for mo in range(mg):
                    y[(i, g * mg + mo, *dst)] += x[(i, ci, *pos)] * w[(ci, mo, *tap)]
    if b is not None:
        y += b.reshape(1, -1, *[1] * len(spatial))
    return y


def im2col_ref(x, kernel, stride, pad, dilation):
    n, c, *spatial = x.shape
    out = conv_size(spatial, kernel, stride, pad, dilation)
    taps = list(itertools.product(*map(range, kernel)))
    col = np.zeros((n, c * len(taps), *out))
    for i, ci, (t, tap) in itertools.product(range(n), range(c), enumerate(taps)):
        for pos in itertools.product(*map(range, out)):
            src = [q * st - p + k * d for q, st, p, k, d in zip(pos, stride, pad, tap, dilation)]
            if all(0 <= s_ < size for s_, size in zip(src, spatial)):
                col[(i, ci * len(taps) + t, *pos)] = x[(i, ci, *src)]
    return col


def pool_ref(x, kernel, stride, pad, out, method):
    """Caffe's pooling loops: MAX over the window clipped to the input (first max wins, flat
    h*W+w index), AVE dividing by the window clipped to [-pad, size + pad)."""
    n, c, h, w = x.shape
    y, mask = np.zeros((n, c, *out)), np.full((n, c, *out), -1.0)
    for i, ch, oh, ow in itertools.product(range(n), range(c), range(out[0]), range(out[1])):
        hs, ws = oh * stride[0] - pad[0], ow * stride[1] - pad[1]
        he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
        size = (he - hs) * (we - ws)
        cells = [(r, q) for r in range(max(hs, 0), min(he, h)) for q in range(max(ws, 0), min(we, w))]
        if method == "MAX":
            best = -np.inf
            for r, q in cells:
                if x[i, ch, r, q] > best:
                    best, mask[i, ch, oh, ow] = x[i, ch, r, q], r * w + q
            y[i, ch, oh, ow] = best
        elif method == "AVE":
            y[i, ch, oh, ow] = sum(x[i, ch, r, q] for r, q in cells) / size
        else:  # STOCHASTIC at TEST: sum(x^2) / sum(x), 0 where sum(x) <= 0 (Caffe's guard)
            values = [x[i, ch, r, q] for r, q in cells]
            y[i, ch, oh, ow] = sum(v * v for v in values) / sum(values) if sum(values) > 0 else 0
    return y, mask


def lrn_ref(x, size, alpha, beta, k, region):
    n, c, h, w = x.shape
    half = (size - 1) // 2
    y = np.zeros_like(x)
    for i, ch, r, q in itertools.product(range(n), range(c), range(h), range(w)):
        if region == "ACROSS_CHANNELS":
            total = sum(x[i, j, r, q] ** 2 for j in range(max(0, ch - half), min(c, ch + half + 1)))
            scale = k + alpha / size * total
        else:
            total = sum(x[i, ch, a, b] ** 2 for a in range(max(0, r - half), min(h, r + half + 1))
                        for b in range(max(0, q - half), min(w, q + half + 1)))
            scale = 1 + alpha * total / size ** 2
        y[i, ch, r, q] = x[i, ch, r, q] * scale ** -beta
    return y


# *** Convolution ***
def conv_snippet(fields, bias=True, kind="Convolution"):
    return (f'type: "{kind}" convolution_param {{ {fields} bias_term: {str(bias).lower()} {GAUSS} }}')


CONV_CASES = [  # shape, fields, stride, pad, dilation, group, bias
    ((2, 3, 5, 6), "num_output: 4 kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1), 1, True),
    ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2",
     (2, 2), (1, 1), (2, 2), 2, True),
    ((2, 2, 7, 8), "num_output: 3 kernel_size: 2 stride: 3", (3, 3), (0, 0), (1, 1), 1, False),
    ((2, 3, 4, 5), "num_output: 5 kernel_size: 1", (1, 1), (0, 0), (1, 1), 1, True),
    ((2, 4, 5, 5), "num_output: 4 kernel_size: 3 group: 4 pad: 2", (1, 1), (2, 2), (1, 1), 4, True),
    ((1, 2, 5, 7), "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     (2, 1), (1, 0), (1, 1), 1, True),
    ((2, 2, 6, 5), "num_output: 3 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 pad: 0 pad: 1",
     (1, 2), (0, 1), (1, 1), 1, False),
    ((3, 2, 7, 6), "num_output: 3 kernel_size: 3 stride: 2 pad: 1 dilation: 2", (2, 2), (1, 1), (2, 2), 1, True),
    ((2, 3, 6, 7), "num_output: 2 kernel_size: 2 dilation: 1 dilation: 2 pad: 1", (1, 1), (1, 1), (1, 2), 1, True),
    ((2, 2, 7, 5), "num_output: 2 kernel_size: 2 dilation: 3 dilation: 1", (1, 1), (0, 0), (3, 1), 1, True),
]


def assert_layout(layer, layout):
    """Pixel rows, when asked for, wherever the shapes allow them: two or more images, 2-D, one
    group, not a 1x1 kernel of stride 1 without padding."""
    if layout != "pixel_rows":
        return
    unit = set(layer.kernel + layer.stride) == {1} and not any(layer.pad)
    possible = layer.p.group == 1 and len(layer.kernel) == 2 and not unit
    assert [core.pixel_rows for core in layer.cores] == [possible and core.num > 1 for core in layer.cores]


@pytest.mark.parametrize("shape, fields, stride, pad, dilation, group, bias", CONV_CASES)
def test_convolution(layout, shape, fields, stride, pad, dilation, group, bias):
    run = check_layer(
        conv_snippet(fields, bias), [randn(*shape)],
        reference=lambda b, p: [conv_ref(b[0], p[0], p[1] if bias else None, stride, pad, dilation, group)],
        reshape_batch=3)
    assert_layout(run.layer, layout)


def test_convolution_weight_shape_and_output_shape():
    snippet = conv_snippet("num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2")
    run = LayerRun(snippet, [randn(2, 4, 9, 8)])
    assert run.layer.blobs[0].shape == (6, 2, 3, 3)
    assert run.layer.blobs[1].shape == (6,)
    assert run.forward()[0].shape == (2, 6, 5, 4)


@pytest.mark.parametrize("shape, kernel, pad", [((2, 2, 4, 5, 3), 2, 1), ((2, 3, 7), 3, 1)])
def test_convolution_nd(layout, shape, kernel, pad):
    d = len(shape) - 2
    check_layer(
        conv_snippet(f"num_output: 2 kernel_size: {kernel} pad: {pad}"), [randn(*shape)],
        reference=lambda b, p: [conv_ref(b[0], p[0], p[1], (1,) * d, (pad,) * d, (1,) * d, 1)])


def test_convolution_axis():
    """axis: 2 folds axes 0 and 1 into the batch; the spatial axes follow the channel axis."""
    x = randn(2, 3, 2, 4, 5)

    def reference(b, p):
        flat = b[0].reshape(6, 2, 4, 5)
        return [conv_ref(flat, p[0], p[1], (1, 1), (0, 0), (1, 1), 1).reshape(2, 3, 3, 3, 4)]
    check_layer(conv_snippet("num_output: 3 kernel_size: 2 axis: 2"), [x], reference=reference,
                top_shapes=[(2, 3, 3, 3, 4)])


def test_convolution_two_bottoms_share_weights(layout):
    a, b = randn(2, 2, 4, 4, seed=1), randn(2, 2, 4, 4, seed=2)

    def reference(bottoms, p):
        return [conv_ref(x, p[0], p[1], (1, 1), (1, 1), (1, 1), 1) for x in bottoms]
    check_layer(conv_snippet("num_output: 3 kernel_size: 3 pad: 1"), [a, b], reference=reference, tops=2)


def test_convolution_chunks_the_batch(layout, monkeypatch):
    """A small column budget splits the batch; results must not change."""
    monkeypatch.setattr(vision, "COLUMN_BUDGET", 1)
    run = check_layer(conv_snippet("num_output: 3 kernel_size: 3 pad: 1"), [randn(3, 2, 4, 5)],
                      reference=lambda b, p: [conv_ref(b[0], p[0], p[1], (1, 1), (1, 1), (1, 1), 1)])
    assert all(core.chunk == 1 for core in run.layer.cores)


def test_convolution_float32_engine_and_force_nd():
    x = randn(2, 3, 5, 5)
    run = LayerRun(conv_snippet("num_output: 2 kernel_size: 3 engine: CUDNN force_nd_im2col: true"), [x],
                   dtype=np.float32)
    w, b = (blob.data.astype(np.float64) for blob in run.layer.blobs)
    assert run.forward()[0].dtype == np.float32
    assert_close(run.forward()[0], conv_ref(x, w, b, (1, 1), (0, 0), (1, 1), 1), rtol=1e-5, atol=1e-5)


def test_convolution_backward_respects_flags():
    run = LayerRun(conv_snippet("num_output: 2 kernel_size: 3"), [randn(2, 2, 4, 4)])
    run.layer.param_propagate_down = [False, True]
    dy = np.ones(run.forward()[0].shape)
    run.zero_param_diffs()
    run.bottom[0].diff[...] = 7
    run.backward([dy], propagate_down=[False])
    w_diff, b_diff = run.param_diffs()
    assert not w_diff.any()
    assert_close(b_diff, [8.0, 8.0])
    assert (run.bottom[0].diff == 7).all()


@pytest.mark.parametrize("fields, shape, error, match", [
    ("num_output: 0 kernel_size: 3", (1, 2, 5, 5), LayerParamError, "num_output"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), LayerParamError, "group"),
    ("num_output: 4 kernel_size: 3 group: 3", (1, 3, 5, 5), LayerParamError, "group"),
    ("num_output: 4", (1, 3, 5, 5), LayerParamError, "kernel_size"),
    ("num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 3, 5, 5), LayerParamError, "one per"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5), LayerParamError, "not both"),
    ("num_output: 4 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5, 5), LayerParamError, "2 spatial"),
    ("num_output: 4 kernel_h: 3", (1, 3, 5, 5), LayerParamError, "must be > 0"),
    ("num_output: 4 kernel_size: 3 stride: 0", (1, 3, 5, 5), LayerParamError, "stride"),
    ("num_output: 4 kernel_size: 3 dilation: 0", (1, 3, 5, 5), LayerParamError, "dilation"),
    ("num_output: 4 kernel_size: 3 axis: 4", (1, 3, 5, 5), LayerParamError, "axis"),
    ("num_output: 4 kernel_size: 6", (1, 3, 5, 5), ShapeError, "extent"),
    ("num_output: 4 kernel_size: 3 dilation: 3", (1, 3, 6, 6), ShapeError, "extent"),
])
def test_convolution_errors(fields, shape, error, match):
    raises(error, conv_snippet(fields), [np.zeros(shape)], match=match)


def test_convolution_reshape_errors():
    run = LayerRun(conv_snippet("num_output: 2 kernel_size: 3"), [randn(1, 3, 5, 5)])
    run.set_bottoms([randn(1, 4, 5, 5)])
    with pytest.raises(ShapeError, match="channels"):
        run.forward()
    with pytest.raises(ShapeError, match="differs"):
        LayerRun(conv_snippet("num_output: 2 kernel_size: 3"), [randn(1, 3, 5, 5), randn(2, 3, 5, 5)], tops=2)


# *** Deconvolution ***
DECONV_CASES = [  # shape, fields, stride, pad, dilation, group, bias, top shape
    ((2, 3, 3, 4), "num_output: 4 kernel_size: 3 stride: 2 pad: 1", (2, 2), (1, 1), (1, 1), 1, True,
     (2, 4, 5, 7)),
    ((2, 4, 3, 3), "num_output: 2 kernel_size: 2 stride: 1 dilation: 2 group: 2", (1, 1), (0, 0), (2, 2), 2,
     True, (2, 2, 5, 5)),
    ((1, 2, 2, 3), "num_output: 3 kernel_size: 2 stride: 3", (3, 3), (0, 0), (1, 1), 1, False, (1, 3, 5, 8)),
    ((2, 3, 3, 3), "num_output: 2 kernel_size: 1", (1, 1), (0, 0), (1, 1), 1, True, (2, 2, 3, 3)),
    ((2, 2, 3, 4), "num_output: 3 kernel_size: 3 stride: 2 pad: 2 dilation: 2", (2, 2), (2, 2), (2, 2), 1, False,
     (2, 3, 5, 7)),
]


@pytest.mark.parametrize("shape, fields, stride, pad, dilation, group, bias, top", DECONV_CASES)
def test_deconvolution(layout, shape, fields, stride, pad, dilation, group, bias, top):
    run = check_layer(
        conv_snippet(fields, bias, "Deconvolution"), [randn(*shape)],
        reference=lambda b, p: [deconv_ref(b[0], p[0], p[1] if bias else None, stride, pad, dilation, group)],
        top_shapes=[top], reshape_batch=3)
    c_out = int(fields.split()[1])
    assert run.layer.blobs[0].shape[:2] == (shape[1], c_out // group)
    assert_layout(run.layer, layout)


def test_deconvolution_is_convolution_transposed():
    """<conv(x), y> == <x, deconv(y)> with the same weights and no bias."""
    fields = "num_output: 3 kernel_size: 3 stride: 2 pad: 1"
    conv = LayerRun(conv_snippet("num_output: 3 kernel_size: 3 stride: 2 pad: 1", False), [randn(2, 3, 7, 7)])
    y = randn(*conv.forward()[0].shape, seed=3)
    deconv = LayerRun(conv_snippet(fields, False, "Deconvolution"), [y])
    deconv.layer.blobs[0].data[...] = conv.layer.blobs[0].data
    assert deconv.forward()[0].shape == (2, 3, 7, 7)
    assert np.isclose((conv.forward()[0] * y).sum(), (conv.bottom[0].data * deconv.forward()[0]).sum())


def test_deconvolution_empty_output():
    raises(ShapeError, conv_snippet("num_output: 2 kernel_size: 1 pad: 1", kind="Deconvolution"),
           [np.zeros((1, 2, 1, 1))], match="empty")


@pytest.fixture(params=[1, 3])
def threads(request):
    """The CPU backend's threads: 3 split a batch of 5 into parts of 1, 2 and 2 images, run side
    by side (backend.over_ranges); 1 runs it whole."""
    before = backends.get("cpu").threads
    espresso.set_num_threads(request.param)
    yield request.param
    espresso.set_num_threads(before)


PARTS = {1: [5], 3: [1, 2, 2]}


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_convolution_runs_the_batch_in_parts(layout, threads, kind):
    """Outputs, gradients and their accumulation (the parts' weight gradients summed into the
    diff) as with the whole batch, checked against the references."""
    ref = conv_ref if kind == "Convolution" else deconv_ref
    run = check_layer(conv_snippet("num_output: 4 kernel_size: 3 stride: 2 pad: 1", kind=kind), [randn(5, 2, 5, 4)],
                      reference=lambda b, p: [ref(b[0], p[0], p[1], (2, 2), (1, 1), (1, 1), 1)])
    assert [core.num for core in run.layer.cores] == PARTS[threads]
    assert_layout(run.layer, layout)  # with 3 threads, parts of 1 and 2 images: two layouts at once


@pytest.mark.parametrize("pool, kernel", [("MAX", 3), ("AVE", 2)])
def test_pooling_runs_the_batch_in_parts(threads, pool, kernel):
    """MAX with its mask top (each part fills its rows of it) and AVE, both padded."""
    tops = 2 if pool == "MAX" else 1
    run = check_layer(pool_snippet(f"kernel_size: {kernel} stride: 2 pad: 1", pool), [distinct(5, 2, 6, 5)], tops=tops,
                      reference=lambda b, p: list(pool_ref(b[0], (kernel,) * 2, (2, 2), (1, 1), (4, 3), pool))[:tops])
    assert [hi - lo for lo, hi in run.layer.pooler.ranges] == PARTS[threads]


def test_a_failing_part_raises_in_the_caller_and_the_threads_work_on(threads):
    cpu, seen = backends.get("cpu"), []

    def run(part, lo, hi):
        seen.append((part, lo, hi, threading.get_ident()))
        if part == len(ranges) - 1:
            raise ValueError(f"part {part} failed")
    ranges = cpu.batch_ranges(5)
    with pytest.raises(ValueError, match=f"part {len(ranges) - 1} failed"):
        cpu.over_ranges(ranges, run)
    assert sorted(s[:3] for s in seen) == [(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
    assert len({s[3] for s in seen}) == threads  # each part on a thread of its own
    seen.clear()
    cpu.over_ranges(ranges, lambda part, lo, hi: seen.append(part))
    assert sorted(seen) == list(range(threads))


def test_a_second_caller_runs_its_parts_itself_while_the_threads_are_busy():
    cpu, before = backends.get("cpu"), backends.get("cpu").threads
    espresso.set_num_threads(2)
    inner = []
    try:  # a part that itself splits a batch finds the threads busy: its parts run in turn, here
        cpu.over_ranges(cpu.batch_ranges(2), lambda part, lo, hi: part or cpu.over_ranges(
            cpu.batch_ranges(4), lambda p, a, b: inner.append((p, a, b, threading.get_ident()))))
    finally:
        espresso.set_num_threads(before)
    assert [i[:3] for i in inner] == [(0, 0, 2, ), (1, 2, 4)] and len({i[3] for i in inner}) == 1


def test_the_caller_waits_for_every_part_even_when_interrupted():
    """A Ctrl-C while the caller waits is raised once the other parts are done: a part still
    running would write after the caller reads, and its late end would cut a later split short."""
    threads, finished = BatchThreads(), []
    threads.run([lambda: None, lambda: None])  # the worker exists
    wait = threads._done[0].wait

    def interrupted(*args):
        threads._done[0].wait = wait
        raise KeyboardInterrupt
    threads._done[0].wait = interrupted
    with pytest.raises(KeyboardInterrupt):
        threads.run([lambda: None, lambda: (time.sleep(0.2), finished.append(1))])
    assert finished == [1]
    threads.run([lambda: None, lambda: (time.sleep(0.1), finished.append(2))])
    assert finished == [1, 2]


def test_a_forked_child_splits_with_threads_of_its_own():
    threads = BatchThreads()
    threads.run([lambda: None, lambda: None])
    pid = os.fork()
    if pid == 0:  # the child: a deadlock ends it by the alarm
        signal.alarm(20)
        ran = []
        threads.run([lambda: ran.append(0), lambda: ran.append(1)])
        os._exit(0 if sorted(ran) == [0, 1] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_a_split_leaves_the_blas_threads_as_it_found_them():
    cpu, before = backends.get("cpu"), backends.get("cpu").threads
    espresso.set_num_threads(2)
    try:
        with threadpoolctl.threadpool_limits(1, user_api="blas"):  # a user's limit around a net
            cpu.over_ranges(cpu.batch_ranges(4), lambda part, lo, hi: None)
            assert {lib.get_num_threads() for lib in cpu._blas} == {1}
        assert {lib.get_num_threads() for lib in cpu._blas} == {2}
    finally:
        espresso.set_num_threads(before)


# *** Im2col ***
@pytest.mark.parametrize("shape, fields, kernel, stride, pad, dilation", [
    ((2, 2, 5, 6), "kernel_size: 3 pad: 1 stride: 2", (3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 3, 6, 5), "kernel_h: 2 kernel_w: 3 dilation: 2", (2, 3), (1, 1), (0, 0), (2, 2)),
])
def test_im2col_layer(shape, fields, kernel, stride, pad, dilation):
    check_layer(f'type: "Im2col" convolution_param {{ {fields} }}', [randn(*shape)],
                reference=lambda b, p: [im2col_ref(b[0], kernel, stride, pad, dilation)], reshape_batch=3)


def test_im2col_layer_rejects_convolution_only_fields():
    raises(LayerParamError, 'type: "Im2col" convolution_param { kernel_size: 2 num_output: 3 }',
           [np.zeros((1, 1, 3, 3))], match="num_output")


# *** Pooling ***
def pool_snippet(fields, pool="MAX"):
    return f'type: "Pooling" pooling_param {{ pool: {pool} {fields} }}'


POOL_CASES = [  # shape, fields, kernel, stride, pad, out
    ((2, 2, 6, 6), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (4, 4)),  # ceil, no clip
    ((2, 2, 7, 7), "kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), (4, 4)),  # last window clipped
    ((1, 2, 5, 5), "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), (3, 3)),  # starts in pad: -1
    ((2, 1, 7, 7), "kernel_size: 2 stride: 2 round_mode: FLOOR", (2, 2), (2, 2), (0, 0), (3, 3)),
    ((1, 2, 5, 7), "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 3 pad_h: 1 pad_w: 1", (3, 2), (1, 3),
     (1, 1), (5, 3)),
    ((2, 2, 6, 5), "kernel_size: 3 stride: 1", (3, 3), (1, 1), (0, 0), (4, 3)),
    ((1, 2, 3, 5), "kernel_size: 4 stride: 2", (4, 4), (2, 2), (0, 0), (1, 2)),  # kernel wider than
    ((1, 2, 3, 3), "kernel_size: 4 stride: 2 pad: 1", (4, 4), (2, 2), (1, 1), (2, 2)),  # the input: clipped
]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape, fields, kernel, stride, pad, out", POOL_CASES)
def test_pooling(pool, shape, fields, kernel, stride, pad, out):
    check_layer(pool_snippet(fields, pool), [distinct(*shape)],
                reference=lambda b, p: [pool_ref(b[0], kernel, stride, pad, out, pool)[0]],
                top_shapes=[shape[:2] + out], reshape_batch=3)


@pytest.mark.parametrize("fields, kernel, stride, pad, out", [
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (4, 4)),
    ("kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), (3, 4)),
])
def test_max_pooling_mask_top(fields, kernel, stride, pad, out):
    x = distinct(2, 3, 6, 7, seed=4)
    run = check_layer(pool_snippet(fields), [x], tops=2, top_shapes=[(2, 3) + out] * 2,
                      reference=lambda b, p: list(pool_ref(b[0], kernel, stride, pad, out, "MAX")))
    mask = run.forward()[1]
    assert mask.dtype == np.float64 and mask.min() >= 0 and mask.max() < 42


def test_max_pooling_ties_pick_the_first_and_never_padding():
    x = np.full((1, 1, 4, 4), -5.0)  # all equal and negative: padding (0 in AVE terms) must not win
    y, mask = LayerRun(pool_snippet("kernel_size: 3 stride: 2 pad: 1"), [x], tops=2).forward()
    assert (y == -5).all()
    assert_close(mask[0, 0], [[0, 1, 3], [4, 5, 7], [12, 13, 15]])


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_global_pooling(pool):
    x = distinct(2, 3, 4, 5)
    check_layer(pool_snippet("global_pooling: true", pool), [x], top_shapes=[(2, 3, 1, 1)],
                reference=lambda b, p: [pool_ref(b[0], (4, 5), (1, 1), (0, 0), (1, 1), pool)[0]],
                reshape_batch=1)


def test_stochastic_pooling_test_phase():
    x = np.abs(randn(2, 2, 5, 5)) + 0.1
    check_layer(pool_snippet("kernel_size: 3 stride: 2", "STOCHASTIC"), [x], phase=TEST, grad=False,
                reference=lambda b, p: [pool_ref(b[0], (3, 3), (2, 2), (0, 0), (2, 2), "STOCH")[0]])
    run = LayerRun(pool_snippet("kernel_size: 3 stride: 2", "STOCHASTIC"), [x], phase=TEST)
    dy = np.ones(run.forward()[0].shape)
    with pytest.raises(NetError, match="TEST"):
        run.backward([dy])
    signed = randn(2, 2, 5, 5)
    signed[0, 0, :3, :3] = 0  # a window summing to 0
    y = LayerRun(pool_snippet("kernel_size: 3 stride: 2", "STOCHASTIC"), [signed], phase=TEST).forward()[0]
    expected = pool_ref(signed, (3, 3), (2, 2), (0, 0), (2, 2), "STOCH")[0]
    assert (expected == 0).sum() >= 2 and (expected > 0).any()  # windows summing to <= 0 and > 0
    assert_close(y, expected)


def test_stochastic_pooling_train_samples_by_value():
    x = np.abs(randn(3, 2, 5, 6)) + 0.1
    run = LayerRun(pool_snippet("kernel_size: 2 stride: 2", "STOCHASTIC"), [x], phase=TRAIN)
    y = run.forward()[0]
    pooler = run.layer.pooler
    index, rand = pooler.index, pooler.rand
    for i, c, oh, ow in itertools.product(range(3), range(2), range(3), range(3)):
        cells = [(r, q) for r in range(2 * oh, min(2 * oh + 2, 5)) for q in range(2 * ow, 2 * ow + 2)]
        values = [x[i, c, r, q] for r, q in cells]
        running = np.cumsum(values)
        pick = int(np.argmax(running >= rand[i, c, oh, ow] * running[-1]))
        assert index[i, c, oh, ow] == cells[pick][0] * 6 + cells[pick][1]
        assert y[i, c, oh, ow] == values[pick]
    dy = randn(*y.shape, seed=2)
    dx = run.backward([dy])[0]
    expected = np.zeros_like(x)
    for i, c, oh, ow in itertools.product(range(3), range(2), range(3), range(3)):
        r, q = divmod(int(index[i, c, oh, ow]), 6)
        expected[i, c, r, q] += dy[i, c, oh, ow]
    assert_close(dx, expected)


def test_stochastic_pooling_overlapping_windows_gradient():
    x = np.abs(randn(1, 2, 5, 5)) + 0.1
    run = LayerRun(pool_snippet("kernel_size: 3 stride: 1", "STOCHASTIC"), [x], phase=TRAIN)
    y = run.forward()[0]
    dy = randn(*y.shape, seed=5)
    dx = run.backward([dy])[0]
    expected = np.zeros_like(x)
    for c, oh, ow in itertools.product(range(2), range(3), range(3)):
        r, q = divmod(int(run.layer.pooler.index[0, c, oh, ow]), 5)
        assert r - oh in range(3) and q - ow in range(3)
        expected[0, c, r, q] += dy[0, c, oh, ow]
    assert_close(dx, expected)


@pytest.mark.parametrize("snippet, shape, error, match", [
    (pool_snippet("kernel_size: 2 pad: 2"), (1, 1, 5, 5), LayerParamError, "smaller than the kernel"),
    (pool_snippet("kernel_size: 3 pad: 1", "STOCHASTIC"), (1, 1, 5, 5), LayerParamError, "padding"),
    (pool_snippet("global_pooling: true kernel_size: 2"), (1, 1, 5, 5), LayerParamError, "global"),
    (pool_snippet("global_pooling: true stride: 2"), (1, 1, 5, 5), LayerParamError, "global"),
    (pool_snippet(""), (1, 1, 5, 5), LayerParamError, "kernel"),
    (pool_snippet("kernel_h: 2"), (1, 1, 5, 5), LayerParamError, "both"),
    (pool_snippet("kernel_size: 2 kernel_h: 2 kernel_w: 2"), (1, 1, 5, 5), LayerParamError, "not both"),
    (pool_snippet("kernel_size: 2 pad_h: 1"), (1, 1, 5, 5), LayerParamError, "both"),
    (pool_snippet("kernel_size: 0"), (1, 1, 5, 5), LayerParamError, "> 0"),
    (pool_snippet("kernel_size: 2"), (1, 5, 5), ShapeError, "4 axes"),
    (pool_snippet("kernel_size: 6"), (1, 1, 5, 5), ShapeError, "no output"),  # Caffe's would be empty
    (pool_snippet("kernel_size: 1 stride: 2"), (1, 1, 4, 4), ShapeError, "past the input"),
])
def test_pooling_errors(snippet, shape, error, match):
    raises(error, snippet, [np.zeros(shape)], match=match)


def test_pooling_second_top_only_for_max():
    raises(NetError, pool_snippet("kernel_size: 2", "AVE"), [np.zeros((1, 1, 4, 4))], tops=2,
           match="second top")


# *** SPP ***
def spp_ref(x, height, method):
    n, c, h, w = x.shape
    parts = []
    for level in range(height):
        bins = 2 ** level
        kernel = [math.ceil(s / bins) for s in (h, w)]
        pad = [(k * bins - s + 1) // 2 for k, s in zip(kernel, (h, w))]
        out = []
        for s, k, p in zip((h, w), kernel, pad):
            o = math.ceil((s + 2 * p - k) / k) + 1
            if any(pad) and (o - 1) * k >= s + p:
                o -= 1
            out.append(o)
        parts.append(pool_ref(x, kernel, kernel, pad, out, method)[0])
    if height == 1:
        return parts[0]
    return np.concatenate([part.reshape(n, -1) for part in parts], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape, height, top", [
    ((2, 2, 8, 8), 3, (2, 42)),
    ((2, 3, 7, 6), 3, (2, 63)),
    ((2, 2, 5, 4), 1, (2, 2, 1, 1)),
    ((1, 2, 6, 5), 2, (1, 10)),
])
def test_spp(method, shape, height, top):
    check_layer(f'type: "SPP" spp_param {{ pyramid_height: {height} pool: {method} }}', [distinct(*shape)],
                reference=lambda b, p: [spp_ref(b[0], height, method)], top_shapes=[top], reshape_batch=3)


def test_spp_errors():
    raises(LayerParamError, 'type: "SPP" spp_param { pyramid_height: 0 }', [np.zeros((1, 1, 4, 4))],
           match="pyramid_height")
    # 5 rows in 4 bins: kernel 2, pad 2 -- Caffe's own pooling check refuses pad >= kernel
    raises(LayerParamError, 'type: "SPP" spp_param { pyramid_height: 3 }', [np.zeros((1, 1, 5, 8))],
           match="smaller than the kernel")


# *** LRN ***
@pytest.mark.parametrize("region, fields, shape", [
    ("ACROSS_CHANNELS", "local_size: 3 alpha: 0.5 beta: 0.75 k: 2", (2, 4, 3, 3)),
    ("ACROSS_CHANNELS", "local_size: 5 alpha: 1.5 beta: 0.6", (2, 7, 2, 3)),
    ("ACROSS_CHANNELS", "local_size: 1 alpha: 0.3 beta: 1.2 k: 1.5", (1, 3, 2, 2)),
    ("WITHIN_CHANNEL", "local_size: 3 alpha: 0.8 beta: 0.75", (2, 2, 4, 5)),
    ("WITHIN_CHANNEL", "local_size: 5 alpha: 2 beta: 0.5 k: 7", (1, 2, 3, 4)),
])
def test_lrn(region, fields, shape):
    values = dict(zip(*[iter(fields.replace(":", "").split())] * 2))
    size, alpha, beta = int(values["local_size"]), float(values["alpha"]), float(values["beta"])
    k = float(values.get("k", 1))
    check_layer(f'type: "LRN" lrn_param {{ norm_region: {region} {fields} }}', [randn(*shape)],
                reference=lambda b, p: [lrn_ref(b[0], size, alpha, beta, k, region)], reshape_batch=3)


def test_lrn_errors():
    raises(LayerParamError, 'type: "LRN" lrn_param { local_size: 4 }', [np.zeros((1, 4, 2, 2))], match="odd")
    raises(ShapeError, 'type: "LRN"', [np.zeros((1, 4, 2))], match="4 axes")


# *** Crop ***
def crop_ref(x, like, axis, offsets):
    index = [slice(None)] * x.ndim
    for i in range(axis, x.ndim):
        off = offsets[0] if len(offsets) == 1 else offsets[i - axis] if offsets else 0
        index[i] = slice(off, off + like.shape[i])
    return x[tuple(index)]


@pytest.mark.parametrize("fields, axis, offsets, like", [
    ("offset: 1 offset: 2", 2, [1, 2], (2, 3, 3, 2)),
    ("axis: 1 offset: 1", 1, [1], (2, 2, 3, 3)),
    ("", 2, [], (2, 3, 4, 1)),
    ("axis: -3 offset: 0 offset: 1 offset: 2", 1, [0, 1, 2], (2, 3, 2, 3)),
])
def test_crop(fields, axis, offsets, like):
    x = randn(2, 3, 5, 6)
    run = check_layer(f'type: "Crop" crop_param {{ {fields} }}', [x, np.zeros(like)], check_bottoms=[0],
                      reference=lambda b, p: [crop_ref(b[0], b[1], axis, offsets)], reshape_batch=3)
    run.bottom[1].diff[...] = 5
    run.backward([np.ones(run.forward()[0].shape)], propagate_down=[True, True])
    assert not run.bottom[1].diff.any()


def test_crop_errors():
    raises(LayerParamError, 'type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }',
           [np.zeros((2, 3, 5, 5)), np.zeros((2, 3, 2, 2))], match="one per cropped axis")
    big, small = np.zeros((2, 3, 5, 5)), np.zeros((2, 3, 3, 3))
    raises(ShapeError, 'type: "Crop" crop_param { offset: 3 }', [big, small], match="crop axis 2")
    raises(LayerParamError, 'type: "Crop" crop_param { axis: 4 }', [big, small], match="axis")


# *** spatial parameters and registration ***
def test_legacy_names_registered():
    from espresso.layer import legacy_types

    names = legacy_types()
    for legacy, kind in [("CONVOLUTION", "Convolution"), ("DECONVOLUTION", "Deconvolution"),
                         ("IM2COL", "Im2col"), ("POOLING", "Pooling"), ("LRN", "LRN")]:
        assert names[legacy] == kind


def test_spatial_params_spellings():
    run = LayerRun(conv_snippet("num_output: 1 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1"),
                   [np.zeros((1, 1, 6, 6))])
    layer = run.layer
    assert (layer.kernel, layer.stride, layer.pad, layer.dilation) == ((3, 2), (2, 1), (1, 0), (1, 1))
    run = LayerRun(pool_snippet("kernel_size: 3 stride_h: 2 stride_w: 1"), [np.zeros((1, 1, 6, 6))])
    assert (run.layer.kernel, run.layer.stride, run.layer.pad) == ((3, 3), (2, 1), (0, 0))
