"""The compression report: per-layer rows like the paper's Tables 2 and 3, totals, accuracy
per stage; printed as a table, written as JSON, and the weight distributions as a PNG."""

import dataclasses
import json
import logging
import os

import numpy as np

from espresso.compress.model_file import CompressedWeights
from espresso.compress.pipeline import run_deployed, stream_sizes
from espresso.plot import pyplot, save
from espresso.proto.text import atomic_write

log = logging.getLogger("espresso")


def layer_row(name, type_, blobs, kept, bits):
    """One table row: sizes of the layer's blobs in the file (Huffman-coded where it is) and
    with fixed-width codes (the paper's P+Q column)."""
    w = blobs[0]
    count = int(np.prod(w.shape))
    original = 4 * sum(int(np.prod(b.shape)) for b in blobs)
    rest = 4 * sum(int(np.prod(b.shape)) for b in blobs[1:])
    kept_pct = 100.0 if kept is None else 100 * float(kept.mean())
    row = {"layer": name, "type": type_, "weights": count, "kept_pct": kept_pct, "bits": bits or 32,
           "index_bits": 0, "original_bytes": original}
    if isinstance(w, CompressedWeights):
        codebook, weights, index = stream_sizes(w)
        fixed = stream_sizes(dataclasses.replace(w, huffman=False))
        entries = max(len(w.symbols), 1)
        row.update(index_bits=w.index_bits, entries=len(w.symbols), codebook_bytes=codebook,
                   weight_bytes=weights, index_bytes=index, bias_bytes=rest,
                   weight_bits_coded=8 * weights / entries, index_bits_coded=8 * index / entries,
                   bytes_pq=sum(fixed) + rest, bytes=codebook + weights + index + rest)
    else:
        row.update(bytes_pq=original, bytes=original)
    row["ratio"] = original / max(row["bytes"], 1)
    return row


def make_report(c, records, output, model):
    rows = [layer_row(n, t, b, c.masks.kept(n), c.bits.get(n)) for n, t, b in records]
    deployed = run_deployed(model, output, c.test_iter)
    if deployed is not None:
        c.accuracy["deployed"] = deployed
    original = sum(r["original_bytes"] for r in rows)
    size = os.path.getsize(output)
    report = {"layers": rows, "original_bytes": original, "compressed_bytes": size,
              "ratio": original / size, "accuracy_before": c.accuracy.get("original"),
              "accuracy_after": c.accuracy.get("deployed", _last(c.accuracy)), "accuracy": dict(c.accuracy),
              "output": os.fspath(output)}
    for line in format_table(report).splitlines():
        log.info("%s", line)
    return report


def _last(accuracy):
    return list(accuracy.values())[-1] if accuracy else None


def format_table(report):
    head = (f"{'layer':10s} {'weights':>9s} {'kept%':>6s} {'bits':>4s} {'idx':>4s} {'w bits(H)':>9s} "
            f"{'i bits(H)':>9s} {'bytes P+Q':>10s} {'bytes P+Q+H':>11s} {'ratio':>7s}")
    lines = [head]
    for r in report["layers"]:
        lines.append(f"{r['layer']:10s} {r['weights']:9d} {r['kept_pct']:6.1f} {r['bits']:4d} {r['index_bits']:4d} "
                     f"{r.get('weight_bits_coded', 32):9.2f} {r.get('index_bits_coded', 0):9.2f} "
                     f"{r['bytes_pq']:10d} {r['bytes']:11d} {r['ratio']:6.1f}x")
    acc = report["accuracy"]
    lines.append(f"total: {report['original_bytes']} -> {report['compressed_bytes']} bytes (file), "
                 f"{report['ratio']:.1f}x; accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return "\n".join(lines)


def write_report(report, path):
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))


def plot_distributions(c, path):
    """Histograms of each compressed layer's weights before (dense) and after (non-zero)."""
    save(distributions_figure(c), path, dpi=90)


def distributions_figure(c):
    names = [n for n in c.layers if n in c.masks.layers or n in c.bits] or list(c.layers)
    fig, axes = pyplot().subplots(len(names), 2, figsize=(9, 2.4 * len(names) + 0.6), squeeze=False)
    for row, name in zip(axes, names):
        before, after = c.original[name].ravel(), c.weights(name).ravel()
        row[0].hist(before, bins=100, color="C0")
        row[0].set_title(f"{name}: before ({before.size} weights)", fontsize=9)
        nz = after[after != 0]
        row[1].hist(nz, bins=200, color="C1")
        row[1].set_title(f"{name}: after ({nz.size} non-zero, {len(np.unique(nz))} distinct)", fontsize=9)
        for axis in row:
            axis.set(xlabel="weight value", ylabel="weights")
    fig.suptitle("Weight distributions before and after compression")
    fig.tight_layout()
    return fig
