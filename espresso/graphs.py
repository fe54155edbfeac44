"""CUDA graphs of a net's runs (DESIGN rule 3): capture once, replay while nothing moved.

A graph bakes in every kernel, shape and address it saw.  Whether one may still be replayed has
one owner, this module: each backend has a `version`, the count of changes that void the graphs
captured on it, and whoever makes such a change calls `invalidate(backend)`: a blob changing shape
or storage (espresso/blob.py), a shared buffer or workspace moving, the device generators
re-seeded, the math mode switched.  A GraphCache replays a graph only at the version it was
captured at, and only for runs whose layers are all `capturable`.  Anything else (a backend
without graphs, graphs switched off with ESPRESSO_CUDA_GRAPHS=0 / espresso.set_cuda_graphs(False),
a host-fed data layer, a capture that fails) runs eagerly, with the same results.

The version also tells a net cheaply that no blob changed shape since it last looked (Net's
per-layer reshape check).
"""

import logging
import os

from espresso.errors import GraphCaptureError

log = logging.getLogger("espresso")

_settings = {"enabled": os.environ.get("ESPRESSO_CUDA_GRAPHS", "1") not in ("", "0")}
_versions = {}  # backend -> the number of invalidations so far


def invalidate(backend):
    """Every graph captured on `backend` until now is void."""
    _versions[backend] = _versions.get(backend, 0) + 1


def version(backend):
    return _versions.get(backend, 0)


def set_cuda_graphs(enabled):
    """Replay CUDA graphs (the default) or run every layer eagerly (for debugging)."""
    _settings["enabled"] = bool(enabled)


def cuda_graphs():
    return _settings["enabled"]


def eager_reason(backend, layers):
    """Why these layers cannot run as a graph on `backend`, or None when they can."""
    if not backend.can_capture:
        return f"backend {backend.name} has no graphs"
    if not cuda_graphs():
        return "CUDA graphs are off"
    for layer in layers:
        if not layer.capturable:
            return f"{layer.where} runs host code per call"
    return None


class GraphCache:
    """Graphs keyed by what they run, each with the backend's version at its capture."""

    def __init__(self, backend):
        self.backend = backend
        self.graphs = {}  # key -> (version at capture, graph or None when capture failed)

    def run(self, key, fn):
        """One run of `fn`: a replay of its graph when valid, else a capture (which runs fn
        once eagerly first), else eagerly when capturing failed at this version."""
        captured_at, graph = self.graphs.get(key, (None, None))
        if captured_at == version(self.backend):
            return fn() if graph is None else self.backend.launch(graph)
        try:
            graph = self.backend.capture(fn)
        except GraphCaptureError as e:
            log.warning("running eagerly: %s", e)
            graph = None
        # the version after the capture: its eager first run may have sized blobs or buffers
        self.graphs[key] = (version(self.backend), graph)
