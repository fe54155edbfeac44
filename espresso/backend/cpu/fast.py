"""Numba versions of the CPU loops NumPy cannot vectorize well (the optional `fast` extra).

NumPy runs pooling and col2im as strided passes whose inner loops are a few elements long
(an 8x8 map), so Python-level overhead and cache misses dominate.  These kernels walk each
(image, channel) plane once, as Caffe's CPU loops do.  Each runs on one thread: the layers run
them on a part of the batch per thread (backend.over_ranges), whereas a Numba parallel loop
between two GEMMs fought BLAS's spinning workers (measured on 2 cores: im2col + GEMM 14 ms
parallel, 3.8 ms serial) and, with them asleep, gained nothing on LeNet's pooling.
`kernels.py` calls them for 2-D cases when Numba is installed and falls back to NumPy
otherwise; both paths are tested against each other.

Layouts: images (P, H, W) with P = N*C planes; columns (N, C*kh*kw, OH*OW) viewed as
(N, C, kh, kw, OH, OW) (Caffe's per-image matrices, stacked); pooled maps (P, OH, OW).  The
pixel-rows pair takes images staged channels-last, (N, H', W', C), and rows (N, OH, OW, kh, kw, C).
"""

import functools

import numba
import numpy as np

_JIT = dict(nogil=True, cache=True)


def max_pool_forward_2d(x, y, mask, kh, kw, sh, sw, ph, pw, lowest):
    """y = window max, mask = h*W+w of the first maximum in scan order of the cells above
    `lowest` (-FLT_MAX in x's type); `lowest` and -1 where none is (Caffe's rule)."""
    if ph == 0 and pw == 0:
        _max_pool_unpadded(kh, kw, sh, sw)(x, y, mask, lowest)
    else:
        _max_pool_forward(kh, kw, sh, sw)(x, y, mask, ph, pw, lowest)


@functools.lru_cache(maxsize=None)
def _max_pool_forward(kh, kw, sh, sw):
    """One compiled kernel per window geometry: with the window size a constant, windows that
    lie inside the image run as unrolled, branch-free code (2.5x faster than a generic loop
    on LeNet's pool1); windows clipped by the padding or the image edge take the generic path.
    Numba caches closures on disk by their free variables' values: a later process loads the
    kernel instead of compiling it for 0.8 s."""

    @numba.njit(**_JIT)
    def pool(x, y, mask, ph, pw, lowest):
        planes, height, width = x.shape
        out_h, out_w = y.shape[1], y.shape[2]
        for p in range(planes):
            for oh in range(out_h):
                h0 = oh * sh - ph
                for ow in range(out_w):
                    w0 = ow * sw - pw
                    if h0 >= 0 and w0 >= 0 and h0 + kh <= height and w0 + kw <= width:
                        best, where = x[p, h0, w0], h0 * width + w0
                        for i in range(kh):
                            for j in range(kw):
                                v = x[p, h0 + i, w0 + j]
                                take = v > best  # strict: the first maximum wins ties
                                best = max(best, v)
                                where = (h0 + i) * width + w0 + j if take else where
                        if not best > lowest:  # (a first cell of NaN or -inf): Caffe's rule, exactly
                            best, where = _clipped_max(x[p], h0, w0, kh, kw, lowest)
                    else:
                        best, where = _clipped_max(x[p], h0, w0, kh, kw, lowest)
                    y[p, oh, ow] = best
                    mask[p, oh, ow] = where

    return pool


@functools.lru_cache(maxsize=None)
def _max_pool_unpadded(kh, kw, sh, sw):
    """The same without padding: the windows inside the image start at row and column 0, so a
    row of them runs Caffe's own scan (from `lowest`, strict >) unrolled and branch-free, its
    indices plainly non-negative, which LLVM vectorizes: LeNet's pool1 (32 images) 0.07-0.11 ms
    against 0.22 in the kernel above.  (There, with a padding offset, the same scan ran slower
    than the kernel's own.)  Windows that the ceil rounding puts past the edge are clipped."""

    @numba.njit(**_JIT)
    def pool(x, y, mask, lowest):
        planes, height, width = x.shape
        out_h, out_w = y.shape[1], y.shape[2]
        rows = max(0, min(out_h, (height - kh) // sh + 1))  # the windows inside the image
        cols = max(0, min(out_w, (width - kw) // sw + 1))
        for p in range(planes):
            for oh in range(out_h):
                inside = cols if oh < rows else 0
                for ow in range(inside):
                    best, where = lowest, -1
                    for i in range(kh):
                        for j in range(kw):
                            v = x[p, oh * sh + i, ow * sw + j]
                            take = v > best  # strict: the first maximum wins ties; NaN never
                            best = v if take else best
                            where = (oh * sh + i) * width + ow * sw + j if take else where
                    y[p, oh, ow] = best
                    mask[p, oh, ow] = where
                for ow in range(inside, out_w):
                    y[p, oh, ow], mask[p, oh, ow] = _clipped_max(x[p], oh * sh, ow * sw, kh, kw, lowest)

    return pool


@numba.njit(nogil=True)
def _clipped_max(plane, h0, w0, kh, kw, lowest):
    """Max and flat index over the window clipped to the image (Caffe's hstart/hend rule), from
    Caffe's start: `lowest` (-FLT_MAX) and -1, kept where no cell is above it."""
    height, width = plane.shape
    h1, w1 = min(h0 + kh, height), min(w0 + kw, width)
    h0, w0 = max(h0, 0), max(w0, 0)
    best, where = lowest, -1
    for h in range(h0, h1):
        for w in range(w0, w1):
            if plane[h, w] > best:
                best, where = plane[h, w], h * width + w
    return best, where


@numba.njit(**_JIT)
def max_pool_backward_2d(dy, mask, dx):
    """dx (P, H*W) = dy routed to the cells `mask` names, summed where windows overlap (mask -1:
    a window that picked none, dropped)."""
    planes, size = dy.shape
    for p in range(planes):
        dx[p, :] = 0
        for o in range(size):
            m = int(mask[p, o])
            if m >= 0:
                dx[p, m] += dy[p, o]


@numba.njit(**_JIT)
def im2col_2d(x, col, kh, kw, sh, sw, ph, pw, dh, dw):
    """col (N, C, kh, kw, OH, OW) = x (N, C, H, W) windows; padding reads zero."""
    n_img, chans, height, width = x.shape
    out_h, out_w = col.shape[4], col.shape[5]
    for nc in range(n_img * chans):
        n, c = nc // chans, nc % chans
        for i in range(kh):
            for j in range(kw):
                for oh in range(out_h):
                    h = oh * sh - ph + i * dh
                    for ow in range(out_w):
                        w = ow * sw - pw + j * dw
                        inside = 0 <= h < height and 0 <= w < width
                        col[n, c, i, j, oh, ow] = x[n, c, h, w] if inside else 0


@numba.njit(**_JIT)
def col2im_2d(col, x, kh, kw, sh, sw, ph, pw, dh, dw):
    """x (N, C, H, W) = the sum, per pixel, of the column entries that read it."""
    n_img, chans, height, width = x.shape
    out_h, out_w = col.shape[4], col.shape[5]
    for nc in range(n_img * chans):
        n, c = nc // chans, nc % chans
        x[n, c] = 0
        for i in range(kh):
            for j in range(kw):
                for oh in range(out_h):
                    h = oh * sh - ph + i * dh
                    if 0 <= h < height:
                        for ow in range(out_w):
                            w = ow * sw - pw + j * dw
                            if 0 <= w < width:
                                x[n, c, h, w] += col[n, c, i, j, oh, ow]


@numba.njit(**_JIT)
def col2im_2d_batch_last(col, staged, kh, kw, sh, sw, dh, dw):
    """col2im for batch-last columns (C, kh, kw, OH, OW, N): staged (C, H+2ph, W+2pw, N) = the
    sums of the column runs that read it (the caller moves the interior back to (N, C, H, W)).
    (im2col in this layout stays NumPy's: one strided copy already runs at memory speed.)"""
    chans, out_h, out_w, batch = col.shape[0], col.shape[3], col.shape[4], col.shape[5]
    staged[...] = 0
    for c in range(chans):
        for i in range(kh):
            for j in range(kw):
                for oh in range(out_h):
                    for ow in range(out_w):
                        h, w = oh * sh + i * dh, ow * sw + j * dw
                        for n in range(batch):  # explicit: a slice per run costs a view each
                            staged[c, h, w, n] += col[c, i, j, oh, ow, n]


@numba.njit(**_JIT)
def im2row_2d(staged, col, sh, sw, dh, dw):
    """col (N, OH, OW, kh, kw, C) = the windows of staged (N, H', W', C), its padding in place.
    A window row is one run of kw*C cells when dw = 1 (LeNet's conv2: 100), else kw runs of C:
    2.5x faster than a loop per cell."""
    _rows_and_image(staged, col, sh, sw, dh, dw, False)


@numba.njit(**_JIT)
def row2im_2d(col, staged, sh, sw, dh, dw):
    """The adjoint of im2row_2d: staged (N, H', W', C) = the sums of the row entries that read
    it (the caller moves the interior back to (N, C, H, W))."""
    staged[...] = 0
    _rows_and_image(staged, col, sh, sw, dh, dw, True)


@numba.njit(nogil=True, inline="always")
def _rows_and_image(staged, col, sh, sw, dh, dw, to_image):
    n_img, out_h, out_w, kh, kw, chans = col.shape
    run, taps = (kw * chans, 1) if dw == 1 else (chans, kw)
    image = staged.reshape(n_img, staged.shape[1], staged.shape[2] * chans)
    rows = col.reshape(n_img, out_h, out_w, kh * kw * chans)
    for n in range(n_img):
        for oh in range(out_h):
            for ow in range(out_w):
                for i in range(kh):
                    for j in range(taps):
                        at, to = (ow * sw + j * dw) * chans, (i * kw + j) * chans
                        cells, row = image[n, oh * sh + i * dh, at:at + run], rows[n, oh, ow, to:to + run]
                        if to_image:
                            for e in range(run):
                                cells[e] += row[e]
                        else:
                            for e in range(run):
                                row[e] = cells[e]


@numba.njit(**_JIT)
def softmax_loss_forward(x, labels, prob, peak, total, ignore, has_ignore, lowest):
    """SoftmaxWithLoss over x (outer, classes, inner): prob = exp(x - max) / sum over the classes
    (peak, total: (outer * inner) scratch for each position's max and sum, so that the passes
    walk x along its rows whatever `inner`), then loss = sum of -log(max(prob[label], lowest))
    one position at a time, as Caffe's loop (a running sum in x's type), over the labels
    (outer * inner, floats) that are not `ignore`.  A label that is no class counts as ignored.
    Returns (loss, labels counted, the first such label's position + 1 or 0, that label)."""
    outer, classes, inner = x.shape
    loss, counted, bad, bad_label = lowest - lowest, 0, 0, 0
    for i in range(outer):
        peak_i, total_i = peak[i * inner:(i + 1) * inner], total[i * inner:(i + 1) * inner]
        peak_i[:] = x[i, 0]
        for c in range(1, classes):
            for j in range(inner):
                peak_i[j] = max(peak_i[j], x[i, c, j])
        total_i[:] = 0
        for c in range(classes):
            for j in range(inner):
                prob[i, c, j] = np.exp(x[i, c, j] - peak_i[j])
                total_i[j] += prob[i, c, j]
        for c in range(classes):
            for j in range(inner):
                prob[i, c, j] /= total_i[j]
        for j in range(inner):
            label = int(labels[i * inner + j])  # truncated, as static_cast<int>
            if has_ignore and label == ignore:
                continue
            if label < 0 or label >= classes:
                if not bad:
                    bad, bad_label = i * inner + j + 1, label
                continue
            loss -= np.log(max(prob[i, label, j], lowest))
            counted += 1
    return loss, counted, bad, bad_label


@numba.njit(**_JIT)
def softmax_loss_backward(prob, labels, scale, dx, ignore, has_ignore):
    """dx (outer, classes, inner) = (prob - onehot(label)) * counted * scale, 0 where the label is
    ignored or no class: in prob's type, step by step as the NumPy path (a float32 constant
    keeps float32 arithmetic float32; an integer one would make it float64)."""
    outer, classes, inner = prob.shape
    one, zero = np.float32(1), np.float32(0)
    for i in range(outer):
        for j in range(inner):
            label = int(labels[i * inner + j])
            counted = not (has_ignore and label == ignore) and 0 <= label < classes
            keep = one if counted else zero
            for c in range(classes):
                hit = one if counted and c == label else zero
                dx[i, c, j] = (prob[i, c, j] - hit) * keep * scale


@numba.njit(**_JIT)
def sgd_update(w, g, h, ends, lr_mult, decay, rate, momentum, normalize, regularization):
    """Caffe's SGD step in one pass over the arena, param by param (segments end at `ends`),
    in the float32 operations and order of ArenaUpdater's NumPy steps (and the CUDA kernel):
    g *= normalize; g += decay * (w or sign w); h = momentum h + (lr_mult rate) g; g = h; w -= h.
    No FMA contraction (Numba leaves fastmath off), so the results are those steps' bit for bit.
    The branches stay outside the loops, which then vectorize."""
    start = 0
    for s in range(ends.size):  # slices indexed from 0: no negative-index fix-up, so loops vectorize
        local_rate, local_decay = lr_mult[s] * rate, decay[s]
        ws, gs, hs = w[start:ends[s]], g[start:ends[s]], h[start:ends[s]]
        for i in range(gs.size):  # LLVM moves the invariant branches out of the loop
            gi, wi = gs[i], ws[i]
            if normalize != 1:
                gi = gi * normalize
            if regularization == 1:
                gi = gi + wi * local_decay
            elif regularization == 2:
                gi = gi + np.sign(wi) * local_decay
            hi = hs[i] * momentum + gi * local_rate
            hs[i] = hi
            gs[i] = hi
            ws[i] = wi - hi
        start = ends[s]
