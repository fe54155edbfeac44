"""Process-wide settings, as Caffe's `Caffe` singleton holds them: mode, device, random seed.
(Whether GPU nets replay CUDA graphs is espresso.graphs.set_cuda_graphs.)"""

import numpy as np

from espresso import backend

_state = {"device": "cpu", "gpu_id": 0, "host_rng": np.random.default_rng()}


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


def set_num_threads(count):
    """The threads the CPU backend's BLAS may use (default: ESPRESSO_NUM_THREADS, else the
    physical cores this process may run on; see espresso/backend/cpu/__init__.py)."""
    from espresso.backend.cpu import set_threads

    backend.get("cpu")  # (its creation sets the default: this call comes after)
    set_threads(int(count))


def set_random_seed(seed):
    """Seed the host generator (fillers) and every device generator (dropout)."""
    _state["host_rng"] = np.random.default_rng(seed)
    backend.reseed(seed)
    backend.get("cpu").seed(seed)


def host_rng():
    return _state["host_rng"]
