"""Latency of `espresso demo`'s classify API over HTTP: the server (espresso.demo.app.serve, as
`espresso demo` runs it) in a subprocess on a free loopback port, one client (httpx2, keep-alive)
posting a 28x28 PNG (a Fashion-MNIST test image) --requests times, one after the other.

Reported: percentiles of the client's round trip (request sent to JSON parsed), and of the
forward time the server reports ("ms"), which is part of it.  Target: p50 <= 5 ms on 2 cores.

    python benchmarks/demo_latency.py [--requests 2000] [--model deploy.prototxt --weights w.espz
                                       --labels labels.txt] [--out benchmarks/results]
"""

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def server_args(ap):
    ap.add_argument("--model", help="deploy prototxt or .onnx (default: the model the demo ships)")
    ap.add_argument("--weights")
    ap.add_argument("--labels")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server's own process, on this port


def serve(args):
    from espresso.demo.app import serve
    from espresso.demo.classifier import Classifier

    serve(Classifier(args.model, args.weights, args.labels), port=args.serve)


def start_server(script, args):
    """(the server's process, its URL) once it answers; the server is `script --serve PORT`."""
    with socket.socket() as s:  # a free port (the server binds it right after)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = [f"--{name}={getattr(args, name)}" for name in ("model", "weights", "labels") if getattr(args, name)]
    process = subprocess.Popen([sys.executable, str(script), "--serve", str(port), *model], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"{url}/api/classes").status_code == 200:
                return process, url
        except httpx2.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
    process.kill()
    raise SystemExit("the server did not answer within 120 s")


def stop(process):
    process.terminate()
    process.wait(10)


def fmnist_png(i=0):
    from espresso.demo.classifier import fmnist_subset

    out = io.BytesIO()
    Image.fromarray(fmnist_subset("test")[0][i]).save(out, "PNG")
    return out.getvalue()


def machine():
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")


def measure(url, requests, warmup=100):
    """(round trips ms, server forward ms) of `requests` classifications, after `warmup` more."""
    image, trips, forwards = fmnist_png(), [], []
    with httpx2.Client(base_url=url) as client:
        for i in range(warmup + requests):
            start = time.perf_counter()
            response = client.post("/api/classify", content=image, headers={"content-type": "image/png"})
            result = response.json()
            elapsed = (time.perf_counter() - start) * 1e3
            if response.status_code != 200:
                raise SystemExit(f"request {i}: {response.status_code} {result}")
            if i >= warmup:
                trips.append(elapsed)
                forwards.append(result["ms"])
    return np.array(trips), np.array(forwards)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    server_args(ap)
    args = ap.parse_args()
    if args.serve:
        return serve(args)
    before = machine()
    process, url = start_server(__file__, args)
    try:
        trips, forwards = measure(url, args.requests)
    finally:
        stop(process)
    rows = [f"{name:<22} " + "  ".join(f"p{q} {np.percentile(v, q):7.3f} ms" for q in (50, 90, 99))
            for name, v in (("round trip (client)", trips), ("forward (server 'ms')", forwards))]
    report = "\n".join([f"# python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}",
                        f"{args.requests} POST /api/classify of a 28x28 PNG, one client, keep-alive; "
                        f"model: {args.model or 'the shipped Deep-Compressed LeNet'}",
                        f"before: {before}", f"after:  {machine()}", *rows,
                        f"target p50 <= 5 ms: {'met' if np.percentile(trips, 50) <= 5 else 'NOT met'}"]) + "\n"
    print(report, end="")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_latency.txt").write_text(report)


if __name__ == "__main__":
    main()
