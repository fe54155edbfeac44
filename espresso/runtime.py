"""Process-wide settings, as Caffe's `Caffe` singleton holds them: mode, device, random seed;
and whether GPU nets and solvers replay CUDA graphs (ESPRESSO_CUDA_GRAPHS=0 or
set_cuda_graphs(False) turns them off, for debugging: every layer then runs eagerly)."""

import os

import numpy as np

from espresso import backend

_state = {"device": "cpu", "gpu_id": 0, "host_rng": np.random.default_rng(),
          "graphs": os.environ.get("ESPRESSO_CUDA_GRAPHS", "1") not in ("", "0")}


def set_cuda_graphs(enabled):
    _state["graphs"] = bool(enabled)


def cuda_graphs():
    return _state["graphs"]


def set_mode_cpu():
    _state["device"] = "cpu"


def set_mode_gpu():
    backend.get(f"cuda:{_state['gpu_id']}")  # raises BackendError when no GPU backend is usable
    _state["device"] = "cuda"


def set_device(gpu_id):
    _state["gpu_id"] = int(gpu_id)


def current_backend():
    """The backend new nets are built on (Caffe::mode())."""
    if _state["device"] == "cpu":
        return backend.get("cpu")
    return backend.get(f"cuda:{_state['gpu_id']}")


def set_random_seed(seed):
    """Seed the host generator (fillers) and every device generator (dropout)."""
    _state["host_rng"] = np.random.default_rng(seed)
    backend.reseed(seed)
    backend.get("cpu").seed(seed)


def host_rng():
    return _state["host_rng"]
