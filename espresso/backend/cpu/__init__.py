"""The CPU backend: NumPy arrays, BLAS from NumPy's build, named primitives in kernels.py.
Everything the contract leaves optional keeps its default (espresso/backend/__init__.py)."""

import os
import platform
import time

import numpy as np

from espresso.backend import Backend
from espresso.backend.cpu import kernels


class CPUBackend(Backend):
    name = "cpu"
    xp = np
    k = kernels

    def __init__(self):
        self.rng = np.random.default_rng()

    def seed(self, seed):
        self.rng = np.random.default_rng(seed)

    def synchronize(self):
        pass

    def mark(self):
        """A point in time for elapsed_ms (on a GPU: an event queued on the stream)."""
        return time.perf_counter()

    def elapsed_ms(self, start, end):
        return (end - start) * 1e3

    def to_device(self, array, dtype=None):
        array = np.asarray(array, dtype=dtype)  # keeps 0-d arrays 0-d (ascontiguousarray would not)
        return array if array.flags.c_contiguous else array.copy()

    def to_host(self, array):
        return array

    def describe(self):
        blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
        return {"Device": "CPU", "Processor": platform.processor() or platform.machine(),
                "Cores": os.cpu_count(), "NumPy": np.__version__,
                "BLAS": f"{blas.get('name', '?')} {blas.get('version', '')}".strip()}


def create(index):
    return CPUBackend()
