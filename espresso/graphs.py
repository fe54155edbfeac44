"""CUDA graphs of a net's runs (DESIGN rule 3): capture once, replay while nothing moved.

A graph bakes in every kernel, shape and address it saw, so one is replayed only while no blob
of the process has changed shape or storage since the capture (Blob.layout) and only for runs
whose layers are all `capturable`.  Anything else (the CPU backend, graphs switched off with
ESPRESSO_CUDA_GRAPHS=0 / espresso.set_cuda_graphs(False), a host-fed data layer, a capture that
fails) runs eagerly, with the same results.
"""

import logging

from espresso import runtime
from espresso.blob import Blob
from espresso.errors import GraphCaptureError

log = logging.getLogger("espresso")


def graphs_available(backend):
    return hasattr(backend, "capture") and runtime.cuda_graphs()


def eager_reason(backend, layers):
    """Why these layers cannot run as a graph on `backend`, or None when they can."""
    if not graphs_available(backend):
        return "CUDA graphs are off" if hasattr(backend, "capture") else f"backend {backend.name}"
    for layer in layers:
        if not layer.capturable:
            return f"{layer.where} runs host code per call"
    return None


class GraphCache:
    """Graphs keyed by what they run, each with the layout it was captured at."""

    def __init__(self, backend):
        self.backend = backend
        self.graphs = {}  # key -> (Blob.layout at capture, graph or None when capture failed)

    def run(self, key, fn):
        """One run of `fn`: a replay of its graph when valid, else a capture (which runs fn
        once eagerly first), else eagerly when capturing failed at this layout."""
        layout, graph = self.graphs.get(key, (None, None))
        if layout == Blob.layout:
            return fn() if graph is None else self.backend.launch(graph)
        try:
            graph = self.backend.capture(fn)
        except GraphCaptureError as e:
            log.warning("running eagerly: %s", e)
            graph = None
        self.graphs[key] = (Blob.layout, graph)
