"""`espresso demo`'s server under load: --clients concurrent clients (httpx2.AsyncClient, one
keep-alive connection each) posting classifications for --seconds, while, a third of the way in,
one more client teaches a class (10 images) and waits for it; the server runs in a subprocess
(as in demo_latency.py) and its resident memory is sampled every 0.25 s.

Reported: requests answered, errors (any answer but 200, any request without an answer: none may
be lost), throughput and latency percentiles, the teaching's outcome, and the server's RSS over
the run: teaching makes a model (a few MB) once; after it, RSS must stay flat however many
requests come.

    python benchmarks/demo_load.py [--clients 50] [--seconds 30] [--out benchmarks/results]
"""

import argparse
import asyncio
import base64
import io
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
from demo_latency import ROOT, fmnist_png, machine, server_args, start_server, stop
from PIL import Image

MAX_GROWTH_MB = 10  # RSS growth, after the teaching, that still counts as bounded


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def sample_rss(pid, samples, stop_event):
    while not stop_event.is_set():
        samples.append((time.monotonic(), rss_mb(pid)))
        await asyncio.sleep(0.25)


async def classify_until(client, images, deadline, stats):
    while time.monotonic() < deadline:
        image = images[stats["sent"] % len(images)]
        stats["sent"] += 1
        start = time.perf_counter()
        try:
            response = await client.post("/api/classify", content=image, headers={"content-type": "image/png"})
            ok = response.status_code == 200 and len(response.json()["top"]) == 5
        except httpx2.HTTPError as e:
            ok, response = False, e
        stats["latency"].append((time.perf_counter() - start) * 1e3)
        if not ok:
            stats["errors"].append(repr(response))


def stripes_png(rng):
    """A photo-like PNG of a striped card on a light table: the class taught under load."""
    photo = np.full((64, 64), 200.0) + rng.normal(0, 4, (64, 64))
    top, left = rng.integers(4, 24, 2)
    photo[top:top + 36, left:left + 36] = np.where(np.arange(36)[:, None] // 4 % 2, 230, 30)
    out = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


async def teach(client, delay):
    """Teach "stripes" after `delay` s and wait for it: (job status, seconds, when it was done)."""
    await asyncio.sleep(delay)
    rng = np.random.default_rng(0)
    images = [base64.b64encode(stripes_png(rng)).decode() for _ in range(10)]
    start = time.monotonic()
    job = (await client.post("/api/teach", json={"name": "stripes", "images": images})).json()["id"]
    while not (status := (await client.get(f"/api/teach/{job}")).json())["done"]:
        await asyncio.sleep(0.1)
    return status, time.monotonic() - start, time.monotonic()


async def load(url, pid, clients, seconds):
    images = [fmnist_png(i) for i in range(20)]
    async with httpx2.AsyncClient(base_url=url, timeout=30) as warm:  # the first requests compile/allocate
        for image in images:
            await warm.post("/api/classify", content=image)
    stats, samples, done = {"sent": 0, "latency": [], "errors": []}, [], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, done))
    limits = httpx2.Limits(max_connections=clients + 1)
    async with httpx2.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        deadline = time.monotonic() + seconds
        taught = asyncio.create_task(teach(client, seconds / 3))
        await asyncio.gather(*(classify_until(client, images, deadline, stats) for _ in range(clients)))
        status, teach_seconds, taught_at = await taught
        classes = (await client.get("/api/classes")).json()["classes"]
        await client.post("/api/reset")
    done.set()
    await sampler
    return stats, samples, (status, teach_seconds, taught_at, classes)


def report(args, before, stats, samples, teaching):
    latency, rss = np.array(stats["latency"]), np.array([mb for _, mb in samples])
    status, teach_seconds, taught_at, classes = teaching
    after_teaching = next(i for i, (t, _) in enumerate(samples) if t > taught_at + 1)  # its buffers are made
    growth = rss[-1] - rss[after_teaching]
    trace = "  ".join(f"{rss[round(f * (len(rss) - 1))]:.1f}" for f in np.linspace(0, 1, 7))
    lines = [f"# python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}",
             f"{args.clients} concurrent clients posting a 28x28 PNG to /api/classify for {args.seconds} s",
             f"before: {before}", f"after:  {machine()}",
             f"requests: {stats['sent']} sent, {len(latency)} answered, {len(stats['errors'])} errors, "
             f"{stats['sent'] - len(latency)} lost; {len(latency) / args.seconds:.0f} requests/s",
             "latency: " + "  ".join(f"p{q} {np.percentile(latency, q):.1f} ms" for q in (50, 90, 99)),
             f"teaching under load: {status['error'] or 'done'} in {teach_seconds:.2f} s, "
             f"accuracy {status['accuracy']}, classes then {len(classes)} (last '{classes[-1]}')",
             f"server RSS (MB) over the run: {trace}; peak {rss.max():.1f}",
             f"RSS from 1 s after the teaching to the end: {rss[after_teaching]:.1f} -> {rss[-1]:.1f} MB "
             f"({growth:+.1f} MB: {'bounded' if growth < MAX_GROWTH_MB else 'GROWING'})"]
    lines += [f"first errors: {stats['errors'][:5]}"] if stats["errors"] else []
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    server_args(ap)
    args = ap.parse_args()
    if args.serve:
        from demo_latency import serve

        return serve(args)
    before = machine()
    process, url = start_server(__file__, args)
    try:
        stats, samples, teaching = asyncio.run(load(url, process.pid, args.clients, args.seconds))
    finally:
        stop(process)
    text = report(args, before, stats, samples, teaching)
    print(text, end="")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_load.txt").write_text(text)


if __name__ == "__main__":
    main()
