"""The CPU backend: NumPy arrays, BLAS from NumPy's build, named primitives in kernels.py.
Everything the contract leaves optional keeps its default (espresso/backend/__init__.py), but
for `batch_ranges`/`over_ranges`: layers that split their batch run a part per thread.

Threads are set deliberately (threadpoolctl), not left to the BLAS's default of one per
logical CPU: ESPRESSO_NUM_THREADS (or espresso.set_num_threads), else the physical cores this
process may run on (its CPU affinity), unless the user set the BLAS's own variable
(OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, OMP_NUM_THREADS), which is then left to work.  That many
threads run a split batch's parts (each part's GEMMs on one BLAS thread) and the other GEMMs.  On
a machine shared with other busy processes one thread can be many times faster: OpenBLAS's
threads wait for each other spinning (benchmarks/threads.py measures it).
"""

import functools
import os
import platform
import time

import numpy as np
import threadpoolctl

from espresso.backend import Backend
from espresso.backend.cpu import kernels
from espresso.backend.cpu.batch_threads import BatchThreads
from espresso.cursor import generator_state, set_generator
from espresso.errors import BackendError

BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
BLAS_SPIN_EXPONENT = 4  # OpenBLAS's least


def physical_cores():
    """Physical cores among the CPUs this process may run on (hyperthreads counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", cpu))  # no topology: count the CPU
    return max(len(cores), 1)


def default_threads():
    """ESPRESSO_NUM_THREADS, else None where a BLAS variable is set, else the physical cores."""
    value = os.environ.get("ESPRESSO_NUM_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise BackendError(f"ESPRESSO_NUM_THREADS must be a positive integer, got '{value}'")
        return int(value)
    if any(os.environ.get(name) for name in BLAS_VARIABLES):
        return None
    return physical_cores()


def shorten_blas_spin():
    """Make OpenBLAS's idle threads sleep after 2^BLAS_SPIN_EXPONENT cycles of spinning rather
    than its default 2^28 (about 0.1 s), unless the user set OPENBLAS_THREAD_TIMEOUT.  Between
    two GEMMs of a training step the single-threaded work (im2col, pooling, the SGD step) ran
    beside the spinning threads, up to 10x slower on this 2-core VM (the SGD step 2.3 against
    0.22 ms); LeNet's solver step went 14.8 -> 11.0-11.7 ms.  OpenBLAS reads the variable when its
    threads start, so they are restarted (openblas_read_env, blas_thread_shutdown_: exported by
    its builds; anything else is left alone).  Called where the backend is made: no GEMM runs
    on another thread then."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:  # (the user's, even empty: OpenBLAS's to read)
        return
    for lib in threadpoolctl.ThreadpoolController().select(internal_api="openblas").lib_controllers:
        dynlib = lib.dynlib
        if hasattr(dynlib, "openblas_read_env") and hasattr(dynlib, "blas_thread_shutdown_"):
            os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(BLAS_SPIN_EXPONENT)
            try:
                dynlib.openblas_read_env()
            finally:
                del os.environ["OPENBLAS_THREAD_TIMEOUT"]
            dynlib.blas_thread_shutdown_()  # the next threaded GEMM starts them with the new timeout


def blas_threads():
    return max((pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"),
               default=1)


class CPUBackend(Backend):
    name = "cpu"
    xp = np
    k = kernels

    def __init__(self):
        self.rng = np.random.default_rng()
        self._workers = BatchThreads()
        threads = default_threads()
        self.set_threads(blas_threads() if threads is None else threads)
        shorten_blas_spin()

    def set_threads(self, count):
        """`count` threads: the parts a batch splits into, and the BLAS's for other GEMMs."""
        if count < 1:
            raise BackendError(f"the CPU backend needs at least one thread, got {count}")
        self.threads = count
        self._blas = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        self._set_blas_threads(count)

    def _set_blas_threads(self, count):
        for lib in self._blas:  # the BLAS libraries loaded at the last set_threads (a lookup takes ms)
            lib.set_num_threads(count)

    def batch_ranges(self, count):
        parts = max(1, min(self.threads, count))
        bounds = [count * i // parts for i in range(parts + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def over_ranges(self, ranges, run):
        if len(ranges) == 1:  # (the whole batch: no calls more at batch 1)
            run(0, *ranges[0])
            return
        jobs = [functools.partial(run, part, lo, hi) for part, (lo, hi) in enumerate(ranges)]
        if self.threads < 2 or not self._workers.claim():
            for job in jobs:  # (one part, or the threads busy with another caller's batch)
                job()
            return
        before = [lib.get_num_threads() for lib in self._blas]  # (a user's threadpool_limits, say)
        try:
            self._set_blas_threads(1)  # each part's GEMMs on its own thread
            self._workers.run(jobs)
        finally:
            for lib, count in zip(self._blas, before):
                lib.set_num_threads(count)
            self._workers.release()

    def seed(self, seed):
        self.rng = np.random.default_rng(seed)

    def rng_state(self):
        return generator_state(self.rng)

    def set_rng_state(self, state):
        set_generator(self.rng, state, "the dropout generator")

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
                "Cores": f"{physical_cores()} physical, {os.cpu_count()} logical", "NumPy": np.__version__,
                "BLAS": f"{blas.get('name', '?')} {blas.get('version', '')}".strip(), "BLAS threads": blas_threads()}


def create(index):
    return CPUBackend()
