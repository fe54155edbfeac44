"""Low-rank decomposition (Kim et al., ICLR 2016, "Compression of deep convolutional neural
networks for fast and low power mobile applications"): each chosen convolution becomes three,
1x1 (C_in -> R_in), k x k (R_in -> R_out, the original stride, pad and dilation), 1x1
(R_out -> C_out, the original bias): a Tucker-2 decomposition of the kernel, computed by
HOSVD on its output-channel and input-channel unfoldings.  The ranks are given, or chosen by
empirical variational Bayesian matrix factorization (EVBMF, Nakajima et al. 2013) of those
unfoldings.  An InnerProduct becomes two thinner ones by truncated SVD (W = U S V^T: V^T S^1/2
then U S^1/2).  The result is an ordinary Caffe net, so Caffe and ONNX run it too; fine-tuning
then recovers the accuracy (espresso/compress/pipeline.py runs it with the model's solver).
"""

import numpy as np

from espresso.errors import EspressoError
from espresso.proto import caffe_pb2


def evbmf_rank(matrix):
    """The rank EVBMF estimates for `matrix` (noise variance unknown, found by minimizing the
    free energy over its analytic bounds)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(matrix, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = rows / cols
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    cut = int(min(np.ceil(rows / (1 + alpha)) - 1, len(s))) - 1
    upper = np.sum(s ** 2) / (rows * cols)
    lower = max(s[cut + 1] ** 2 / (cols * x_bar), np.mean(s[cut + 1:] ** 2) / cols) if cut + 1 < len(s) else upper / 2

    def free_energy(sigma2):
        x = s ** 2 / (cols * sigma2)
        big, small = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
        return (np.sum(small - np.log(small)) + np.sum(big - tau) + np.sum(np.log((tau + 1) / big))
                + alpha * np.sum(np.log(tau / alpha + 1)) + (rows - len(s)) * np.log(sigma2))

    sigma2 = minimize_scalar(free_energy, bounds=(min(lower, upper), upper), method="bounded").x
    return int(np.sum(s > np.sqrt(cols * sigma2 * x_bar)))


def tucker2(kernel, out_rank, in_rank):
    """(first (R_in, C_in, 1, 1), core (R_out, R_in, kh, kw), last (C_out, R_out, 1, 1)) of a
    C_out x C_in x kh x kw kernel, by HOSVD; exact when the ranks are C_out and C_in."""
    c_out, c_in = kernel.shape[:2]
    w = np.asarray(kernel, np.float64)
    u_out = np.linalg.svd(w.reshape(c_out, -1), full_matrices=False)[0][:, :out_rank]
    u_in = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(c_in, -1), full_matrices=False)[0][:, :in_rank]
    core = np.einsum("oikl,or,is->rskl", w, u_out, u_in)
    return u_in.T[:, :, None, None], core, u_out[:, :, None, None]


def svd_split(weights, rank):
    """(first (rank, in), last (out, rank)) with last @ first the best rank-`rank` fit of weights."""
    u, s, vt = np.linalg.svd(np.asarray(weights, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return root[:, None] * vt[:rank], u[:, :rank] * root


def plan(net, tucker, svd):
    """{layer: ranks} for the layers named in tucker ("auto", or {name: (R_out, R_in) or "auto"})
    and svd ({name: rank or "auto"}), checked against the built net's layers."""
    layers = net.layer_dict
    if tucker == "auto":
        tucker = {n: "auto" for n, layer in layers.items() if layer.type == "Convolution"
                  and max(layer.blobs[0].shape[2:], default=1) > 1}
    chosen = {}
    for spec, kind in ((tucker or {}, "Convolution"), (svd or {}, "InnerProduct")):
        for name, ranks in spec.items():
            layer = layers.get(name)
            if layer is None or layer.type != kind:
                raise EspressoError(f"--{'tucker' if kind == 'Convolution' else 'svd'} {name}: the net has no "
                                    f"{kind} layer of that name")
            if kind == "Convolution" and layer.p.group != 1:
                raise EspressoError(f"--tucker {name}: a grouped convolution (group {layer.p.group}) is not decomposed")
            chosen[name] = _ranks(name, kind, np.asarray(layer.blobs[0].host_data()), ranks)
    return chosen


def _auto(name, flag, matrix):
    rank = evbmf_rank(matrix)
    if rank == 0:
        raise EspressoError(f"--{flag} {name}: EVBMF finds nothing above the noise in its weights (rank 0): "
                            "a model trained further, or ranks given by hand")
    return rank


def _ranks(name, kind, w, ranks):
    if kind == "InnerProduct":
        ranks = (_auto(name, "svd", w),) if ranks == "auto" else tuple(int(r) for r in np.atleast_1d(ranks))
        if len(ranks) != 1 or not 1 <= ranks[0] <= min(w.shape):
            raise EspressoError(f"--svd {name}: rank {ranks} is impossible for a {w.shape[0]} x {w.shape[1]} "
                                f"matrix (1 to {min(w.shape)})")
        return ranks
    c_out, c_in = w.shape[:2]
    if ranks == "auto":
        ranks = (_auto(name, "tucker", w.reshape(c_out, -1)),
                 _auto(name, "tucker", w.transpose(1, 0, 2, 3).reshape(c_in, -1)))
    ranks = tuple(int(r) for r in np.atleast_1d(ranks))
    if len(ranks) != 2 or not (1 <= ranks[0] <= c_out and 1 <= ranks[1] <= c_in):
        raise EspressoError(f"--tucker {name}: ranks {ranks} are impossible for {c_out} outputs and {c_in} inputs "
                            "(R_out in 1..outputs, R_in in 1..inputs)")
    return ranks


def decompose(net_param, net, chosen):
    """(the NetParameter with each chosen layer replaced, {new layer: [arrays]}) from a net whose
    weights are `net`'s."""
    out, weights = caffe_pb2.NetParameter(), {}
    out.CopyFrom(net_param)
    del out.layer[:]
    for lp in net_param.layer:
        if lp.name not in chosen:
            out.layer.add().CopyFrom(lp)
            continue
        blobs = [np.asarray(b.host_data()) for b in net.layer_dict[lp.name].blobs]
        pieces = (_conv_pieces if lp.type == "Convolution" else _ip_pieces)(lp, blobs, chosen[lp.name])
        for piece, arrays in pieces:
            out.layer.add().CopyFrom(piece)
            weights[piece.name] = [a.astype(np.float32) for a in arrays]
    return out, weights


def _piece(lp, suffix, bottom, top, kind_param, last):
    piece = caffe_pb2.LayerParameter()
    piece.CopyFrom(lp)
    piece.name, piece.bottom[:], piece.top[:] = lp.name + suffix, [bottom], [top]
    del piece.param[:]
    if lp.param:
        piece.param.add().CopyFrom(lp.param[0])
        if last and len(lp.param) > 1:
            piece.param.add().CopyFrom(lp.param[1])
    getattr(piece, kind_param).bias_term = last and getattr(lp, kind_param).bias_term
    return piece


def _conv_pieces(lp, blobs, ranks):
    first, core, last = tucker2(blobs[0], *ranks)
    a = _piece(lp, "_in", lp.bottom[0], lp.name + "_in", "convolution_param", False)
    b = _piece(lp, "_core", a.top[0], lp.name + "_core", "convolution_param", False)
    c = _piece(lp, "_out", b.top[0], lp.top[0], "convolution_param", True)
    for piece, outputs in ((a, ranks[1]), (c, blobs[0].shape[0])):  # the 1x1 ends
        p = piece.convolution_param
        p.num_output = outputs
        del p.kernel_size[:], p.stride[:], p.pad[:], p.dilation[:]
        p.kernel_size.append(1)
        for field in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"):
            p.ClearField(field)
    b.convolution_param.num_output = ranks[0]
    return [(a, [first]), (b, [core]), (c, [last] + blobs[1:2])]


def _ip_pieces(lp, blobs, ranks):
    first, last = svd_split(blobs[0], ranks[0])
    a = _piece(lp, "_in", lp.bottom[0], lp.name + "_in", "inner_product_param", False)
    b = _piece(lp, "_out", a.top[0], lp.top[0], "inner_product_param", True)
    a.inner_product_param.num_output = ranks[0]
    b.inner_product_param.axis = lp.inner_product_param.axis  # (a keeps the flattening axis)
    return [(a, [first]), (b, [last] + blobs[1:2])]


def parse(text, kind):
    """--tucker "auto" | "conv1,conv2=8:16" (R_out:R_in; a name alone: EVBMF), --svd "ip1,ip2=50"."""
    if not text:
        return {}
    if text == "auto" and kind == "tucker":
        return "auto"
    spec = {}
    for item in text.split(","):
        name, _, ranks = item.partition("=")
        try:
            spec[name.strip()] = tuple(int(r) for r in ranks.split(":")) if ranks else "auto"
        except ValueError:
            form = "R_out:R_in" if kind == "tucker" else "RANK"
            raise EspressoError(f"--{kind} {item}: give LAYER, or LAYER={form}") from None
    return spec


def lowrank(model, weights, solver, tucker=None, svd=None, output="lowrank.caffemodel", output_model=None,
            finetune_iters=1000, timing_batch=64):
    """Decompose the chosen layers of the solver's net (Tucker-2 / SVD), fine-tune it with the
    solver, write the new prototxt and weights; the report (accuracy before, after decomposing,
    after fine-tuning; per layer: ranks, weights, multiply-adds and the measured time before and
    after on the device it runs on, cpu_ms_* or gpu_ms_*)."""
    from espresso.compress.pipeline import retrain_rewritten

    found = {}

    def rewrite(param, net):
        found["chosen"] = plan(net, tucker, svd)
        if not found["chosen"]:
            raise EspressoError("give the layers to decompose: --tucker and/or --svd")
        found["param"], found["weights"] = decompose(param, net, found["chosen"])
        return found["param"], found["weights"]

    report, original = retrain_rewritten(model, weights, solver, rewrite, "decomposed", finetune_iters, output,
                                         output_model)
    report["stages"] = [_layer_row(original.net, found["param"], found["weights"], name, ranks, timing_batch)
                        for name, ranks in found["chosen"].items()]
    return report


def _layer_row(net, new_param, new_weights, name, ranks, batch):
    """One decomposed layer: ranks, weights and multiply-adds per image, CPU ms before and after."""
    import espresso

    lp = next(lp for lp in net.param.layer if lp.name == name)
    pieces = [p for p in new_param.layer if p.name in new_weights and p.name.rsplit("_", 1)[0] == name]
    bottom = net.blobs[lp.bottom[0]].shape
    shape = (batch, *bottom[1:])
    before_net, after_net = (espresso.Net(_timing_net(shape, layers), espresso.TEST) for layers in ([lp], pieces))
    for view, array in zip(before_net.params[name], net.params[name]):
        view.data[...] = array.data
    before_ms, after_ms = (_forward_ms(n) for n in (before_net, after_net))
    macs = {"before": _macs(before_net, [lp]), "after": _macs(after_net, pieces)}
    device = "cpu" if net.backend.name == "cpu" else "gpu"  # where the compress command runs (--gpu)
    return {"stage": "tucker" if lp.type == "Convolution" else "svd", "layer": name, "ranks": list(ranks),
            "weights_before": int(net.params[name][0].count),
            "weights_after": sum(int(np.prod(new_weights[p.name][0].shape)) for p in pieces),
            "macs_before": macs["before"], "macs_after": macs["after"], f"{device}_ms_before": before_ms,
            f"{device}_ms_after": after_ms, "speedup": before_ms / after_ms, "timing_batch": batch}


def _macs(net, layers):
    """Multiply-adds per image: each weight once per output position."""
    return sum(int(np.prod(net.params[p.name][0].shape)) * int(np.prod(net.blobs[p.top[0]].shape[2:]))
               for p in layers)


def _timing_net(shape, layers):
    param = caffe_pb2.NetParameter()
    data = param.layer.add(name="input", type="Input", top=[layers[0].bottom[0]])
    data.input_param.shape.add(dim=list(shape))
    for lp in layers:
        layer = param.layer.add()
        layer.CopyFrom(lp)
        del layer.include[:], layer.exclude[:]
    return param


def _forward_ms(net, repeats=7):
    """Median ms of a forward pass (after a warm-up)."""
    import time

    net.run_forward()
    net.backend.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.run_forward()
        net.backend.synchronize()  # (a GPU's work is queued: its time is the wait's too)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
