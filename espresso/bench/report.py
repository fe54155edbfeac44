"""The report of `espresso bench`: every figure as the median [min-max] of the repeats, the
ratios (a ratio whose two ranges overlap is said to be parity, not a lead), and plots: GPU/CPU
speed-up, J/image, batch-1 latency histograms, per-layer time, peak memory.  report.md (with
the PNGs beside it) and report.html (self-contained: the plots inlined) say the same."""

import base64
import html
import io
import os

import numpy as np

FRAMEWORK_ORDER = ("espresso", "torch eager", "torch graph")


def stats(values):
    values = np.asarray(values, float)
    return {"median": float(np.median(values)), "min": float(values.min()), "max": float(values.max())}


def summarize(record, idle_watts):
    """Images/s, ms per iteration, J/image (total and above idle), latency percentiles."""
    blocks = record["blocks"]
    images = [b["iterations"] * record["batch"] for b in blocks]
    out = {"images_per_s": stats([n / b["seconds"] for n, b in zip(images, blocks)]),
           "ms_per_iteration": stats([b["seconds"] / b["iterations"] * 1e3 for b in blocks])}
    if all(b["joules"] is not None for b in blocks):
        out["j_per_image"] = stats([b["joules"] / n for n, b in zip(images, blocks)])
        idle = idle_watts or 0.0
        out["j_per_image_above_idle"] = stats([(b["joules"] - idle * b["seconds"]) / n for n, b in zip(images, blocks)])
    if "latency_ms" in record:
        out["latency_ms"] = {f"p{q}": float(np.percentile(record["latency_ms"], q)) for q in (50, 90, 99)}
    return out


def ratio(a, b):
    """a's median over b's, and whether the repeats' ranges overlap (then it is no lead)."""
    overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
    return {"ratio": a["median"] / b["median"], "overlap": overlap}


def _fmt_ratio(r):
    return f"{r['ratio']:.2f}x" + (" (repeats overlap: parity)" if r["overlap"] else "")


def _range(s, digits=3):
    return f"{s['median']:.{digits}g} [{s['min']:.{digits}g}-{s['max']:.{digits}g}]"


def _summaries(results):
    """[(case record, its summary)] of the cases measured."""
    idle = {d: e.get("idle_watts") for d, e in results["energy"].items()}
    return [(r, summarize(r, idle[r["device"]])) for r in results["cases"] if "blocks" in r]


def tables(results):
    """(title, header, rows) of the report's tables."""
    done = _summaries(results)
    key = {(r["model"], r["mode"], r["batch"], r["device"], r["framework"]): s for r, s in done}
    rows = []
    for r, s in done:
        energy = s.get("j_per_image")
        rows.append([r["model"], r["mode"], r["batch"], r["device"], r["framework"], _range(s["images_per_s"]),
                     _range(s["ms_per_iteration"]), _range(energy) if energy else "-",
                     _range(s["j_per_image_above_idle"]) if energy else "-",
                     "/".join(f"{v:.3g}" for v in s["latency_ms"].values()) if "latency_ms" in s else "-",
                     f"{r['host_peak_bytes'] / 2**20:.0f}",
                     f"{r['device_peak_bytes'] / 2**20:.0f}" if r.get("device_peak_bytes") else "-",
                     f"{r['cold_start_s']:.2f}" if "cold_start_s" in r else "-"])
    out = [("Every case (median [min-max] of the repeats)",
            ["model", "mode", "batch", "device", "framework", "images/s", "ms/iteration", "J/image",
             "J/image above idle", "latency p50/p90/p99 ms", "peak host MiB", "peak device MiB", "cold start s"],
            rows)]
    gpu_cpu = []
    for (model, mode, batch, device, fw), s in key.items():
        cpu = key.get((model, mode, batch, "cpu", fw))
        if device == "gpu" and cpu is not None:
            energy = (_fmt_ratio(ratio(cpu["j_per_image"], s["j_per_image"]))
                      if "j_per_image" in s and "j_per_image" in cpu else "-")
            gpu_cpu.append([model, mode, batch, fw, _fmt_ratio(ratio(s["images_per_s"], cpu["images_per_s"])),
                            _range(cpu["j_per_image"]) if "j_per_image" in cpu else "-",
                            _range(s["j_per_image"]) if "j_per_image" in s else "-", energy])
    if gpu_cpu:
        out.append(("GPU against CPU", ["model", "mode", "batch", "framework", "speed-up (GPU/CPU)",
                                        "CPU J/image", "GPU J/image", "energy ratio (CPU/GPU)"], gpu_cpu))
    peers = []
    for (model, mode, batch, device, fw), s in key.items():
        mine = key.get((model, mode, batch, device, "espresso"))
        if fw != "espresso" and mine is not None:
            energy = (_fmt_ratio(ratio(mine["j_per_image"], s["j_per_image"]))
                      if "j_per_image" in s and "j_per_image" in mine else "-")
            peers.append([model, mode, batch, device, fw, _fmt_ratio(ratio(mine["images_per_s"], s["images_per_s"])),
                          energy])
    if peers:
        out.append(("Espresso against PyTorch (same device, same run)",
                    ["model", "mode", "batch", "device", "peer", "speed (Espresso/peer)",
                     "J/image (Espresso/peer)"], peers))
    skipped = [[r["model"], r["mode"], r["batch"], r["device"], r["framework"], r["skipped"]]
               for r in results["cases"] if "skipped" in r]
    if skipped:
        out.append(("Not measured", ["model", "mode", "batch", "device", "framework", "why"], skipped))
    return out


def plots(results):
    """{name: PNG bytes} of the report's figures."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done, figures = _summaries(results), {}

    def bars(name, title, ylabel, entries, log=True):
        if not entries:
            return
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(entries)), 4))
        ax.bar(range(len(entries)), [v for _, v in entries], color="#4477aa")
        ax.set_xticks(range(len(entries)), [label for label, _ in entries], rotation=75, fontsize=7)
        ax.set(title=title, ylabel=ylabel)
        if log:
            ax.set_yscale("log")
        figures[name] = _png(fig, plt)

    by_key = {(r["model"], r["mode"], r["batch"], r["device"], r["framework"]): s for r, s in done}
    speedups = [(f"{m} {mode} b{b}", s["images_per_s"]["median"] / cpu["images_per_s"]["median"])
                for (m, mode, b, d, fw), s in by_key.items()
                if d == "gpu" and fw == "espresso" and (cpu := by_key.get((m, mode, b, "cpu", fw)))]
    bars("speedup", "Espresso: GPU speed-up over the CPU", "x", speedups)
    bars("energy", "Energy per image (median of the repeats)", "J/image", [
        (f"{r['model']} {r['mode']} b{r['batch']} {r['device']} {r['framework']}", s["j_per_image"]["median"])
        for r, s in done if "j_per_image" in s])
    bars("memory", "Peak memory of each case", "MiB (device where measured, else host)", [
        (f"{r['model']} {r['mode']} b{r['batch']} {r['device']} {r['framework']}",
         (r.get("device_peak_bytes") or r["host_peak_bytes"]) / 2**20) for r, s in done])
    latencies = [r for r, _ in done if "latency_ms" in r]
    if latencies:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in latencies:
            ax.hist(r["latency_ms"], bins=40, histtype="step", label=f"{r['model']} {r['device']} {r['framework']}")
        ax.set(title="Batch-1 inference latency", xlabel="ms", ylabel="iterations", xscale="log")
        ax.legend(fontsize=6)
        figures["latency"] = _png(fig, plt)
    layered = [r for r, _ in done if "layers" in r]
    if layered:
        fig, axes = plt.subplots(len(layered), 1, figsize=(9, 2.8 * len(layered)), squeeze=False)
        for ax, r in zip(axes[:, 0], layered):
            names, forward, backward = r["layers"]["names"], r["layers"]["forward_ms"], r["layers"]["backward_ms"]
            ax.bar(range(len(names)), forward, color="#4477aa", label="forward")
            ax.bar(range(len(names)), backward, bottom=forward, color="#ee6677", label="backward")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5 if len(names) > 40 else 7)
            ax.set(title=f"{r['model']} training at batch {r['batch']} on the {r['device'].upper()}: per-layer time",
                   ylabel="ms")
            ax.legend(fontsize=7)
        figures["layers"] = _png(fig, plt)
    return figures


def _png(fig, plt):
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _heading(results):
    m, lines = results["machine"], []
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores; " +
                 (f"GPU {m['gpu_backend'].get('Device', '')}; " if "gpu_backend" in m else "no GPU; ") +
                 ", ".join(f"{k} {m[k]}" for k in ("python", "numpy", "espresso", "cupy", "torch") if k in m) +
                 f"; {m['date']}; {results['seconds']:.0f} s in all.  Every framework computes in strict "
                 "float32 (TF32 off, PyTorch's cuDNN default included).")
    for device, e in results["energy"].items():
        text = f"Energy on the {device.upper()}: {e['kind']}"
        if e.get("idle_watts") is not None:
            text += f", idle {e['idle_watts']:.1f} W"
        if e.get("formula"):
            text += f"; an ESTIMATE, not a measurement: {e['formula']} ({e['inputs']})"
        lines.append(text + ".")
    return lines


def write_report(results, folder):
    try:
        figures = plots(results)
    except ImportError:  # matplotlib (the `plot` extra) missing: the tables alone
        figures = {}
    for name, data in figures.items():
        with open(os.path.join(folder, f"{name}.png"), "wb") as f:
            f.write(data)
    md = ["# espresso bench", ""] + [line + "  " for line in _heading(results)] + [""]
    page = ["<!doctype html><meta charset=utf-8><title>espresso bench</title>",
            "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style><h1>espresso bench</h1>"]
    page += [f"<p>{html.escape(line)}</p>" for line in _heading(results)]
    for title, header, rows in tables(results):
        md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]
        page.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                                        for row in rows) + "</table>")
    for name, data in figures.items():
        md += [f"![{name}]({name}.png)", ""]
        page.append(f'<p><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></p>')
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(folder, "report.html"), "w") as f:
        f.write("\n".join(page))
