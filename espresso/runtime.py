"""Process-wide settings, as Caffe's `Caffe` singleton holds them: mode, device, random seed;
and the memory limit that blob allocations are checked against.  (Whether GPU nets replay CUDA
graphs is espresso.graphs.set_cuda_graphs.)"""

import os
import re
import time

import numpy as np

from espresso import backend
from espresso.errors import EspressoError

_state = {"device": "cpu", "gpu_id": 0, "host_rng": np.random.default_rng(), "memory_limit": None}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def set_memory_limit(nbytes):
    """Refuse blobs and nets needing more than `nbytes` (None: the device's available memory,
    the default; ESPRESSO_MEMORY_LIMIT, e.g. 8G, sets it for a process)."""
    _state["memory_limit"] = None if nbytes is None else int(nbytes)


def memory_limit(device):
    """The bytes that blobs on `device` may take: the setting, else what the device has free."""
    if _state["memory_limit"] is not None:
        return _state["memory_limit"]
    text = os.environ.get("ESPRESSO_MEMORY_LIMIT", "").strip().upper()
    if not text:
        return device.available_memory()
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)I?B?", text)
    if not match:
        raise EspressoError(f"ESPRESSO_MEMORY_LIMIT: give bytes, optionally with K, M, G or T, got '{text}'")
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_bytes(n):
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


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
    """The threads the CPU backend may use: the parts a batch splits into, and the BLAS's
    (default: ESPRESSO_NUM_THREADS, else the physical cores this process may run on; see
    espresso/backend/cpu/__init__.py)."""
    backend.get("cpu").set_threads(int(count))


def set_random_seed(seed):
    """Seed the host generator (fillers) and every device generator (dropout)."""
    _state["host_rng"] = np.random.default_rng(seed)
    backend.reseed(seed)
    backend.get("cpu").seed(seed)


def host_rng():
    return _state["host_rng"]


# *** pycaffe's process-wide names of data-parallel training (espresso/parallel.py) ***
def solver_count():
    """Caffe::solver_count: the ranks training one model together (1 unless parallel.start)."""
    return _state.get("solver_count", 1)


def set_solver_count(count):
    if int(count) < 1:
        raise EspressoError(f"set_solver_count({count}): give at least 1")
    _state["solver_count"] = int(count)


def solver_rank():
    """Caffe::solver_rank: this process's rank among solver_count(); rank 0 tests and snapshots."""
    return _state.get("solver_rank", 0)


def set_solver_rank(rank):
    if not 0 <= int(rank) < solver_count():
        raise EspressoError(f"set_solver_rank({rank}): ranks go from 0 to solver_count() - 1 = {solver_count() - 1}")
    _state["solver_rank"] = int(rank)


def set_multiprocess(multiprocess):
    """Caffe's flag for solvers in several processes (always so in Espresso: one rank a process)."""
    _state["multiprocess"] = bool(multiprocess)


def has_nccl():
    """Whether CuPy's NCCL binding is usable here (data-parallel GPU ranks all-reduce through it)."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", True))


class NCCL:
    """pycaffe's NCCL(solver, uid): Espresso's ranks are MPI processes (espresso/parallel.py), not
    pycaffe's threads sharing an NCCL id, so this is refused with the way to do it."""

    def __init__(self, solver, uid):
        raise EspressoError("caffe.NCCL: start the ranks with mpiexec and call espresso.parallel.start() and "
                            "group.attach(solver) (see espresso/parallel.py)")


class Timer:
    """pycaffe's Timer: start(), stop(), and ms, the milliseconds from start to stop (reading ms
    of a running timer stops it, as Caffe's MilliSeconds does)."""

    def __init__(self):
        self._started = self._stopped = None

    def start(self):
        self._started, self._stopped = time.perf_counter(), None

    def stop(self):
        if self._started is not None and self._stopped is None:
            self._stopped = time.perf_counter()

    @property
    def ms(self):
        if self._started is None:
            return 0.0
        self.stop()
        return (self._stopped - self._started) * 1000.0
