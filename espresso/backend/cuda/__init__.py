"""The CUDA backend: CuPy arrays on one NVIDIA GPU, GEMMs through the backend's own cuBLAS handle
(blas.py), the named primitives as CUDA kernels (kernels.py and the .cu files beside it).

CuPy is imported by `create`, not by this module, so `import espresso` never needs it and a
missing CuPy or GPU is reported as a BackendError that says what to install.  All work is queued
on one stream the backend owns (made CuPy's current stream in the creating thread), so a whole
iteration can be captured as a CUDA graph (`capture`).  ESPRESSO_TF32=1 (or `set_tf32(True)`)
lets float32 GEMMs use TF32 tensor cores; the default keeps float32 semantics.
ESPRESSO_DETERMINISTIC=1 (or `backend.deterministic = True` before building nets) gives the same
results run after run; the default picks each convolution's fastest kernels by timing them.

Inside Net's backward pass (`overlapping`), layers put their parameter gradients `aside`: onto a
second stream with its own cuBLAS and cuDNN handles and workspaces, concurrent with the bottom
gradients that the rest of the pass waits for; the pass ends by joining the two streams.  A
graph captures the fork and join as branches, so small nets' kernels run two at a time.
"""

import contextlib
import math
import os

import numpy as np

from espresso import graphs
from espresso.backend import Backend
from espresso.backend.cuda import blas, choices, cudnn, kernels
from espresso.errors import BackendError, GraphCaptureError

INSTALL_HINT = ("pip install cupy-cuda13x (CUDA 13 drivers) or cupy-cuda12x (CUDA 12); "
                "see https://docs.cupy.dev/en/stable/install.html")


def _import_cupy(name):
    try:
        # (cupyx stays a lazy module until a fancy index or take_along_axis loads it, with SciPy's
        # sparse modules where SciPy is installed: 0.26 s on the H100 machine that LeNet's fused
        # kernels no longer pay)
        import cupy
    except ImportError as e:
        raise BackendError(f"backend '{name}' needs CuPy, which is not installed ({e}): "
                           f"{INSTALL_HINT}") from None
    return cupy


class CUDABackend(Backend):
    k = kernels
    host_arrays = False
    can_capture = True
    # batch-last convolutions split their long weight-gradient GEMMs (espresso/layers/vision.py)
    splits_long_gemms = True

    def __init__(self, cupy, index):
        self.xp, self.index, self.name = cupy, index, f"cuda:{index}"
        self.device = cupy.cuda.Device(index)
        self.device.use()  # layers call xp.* without naming a device: this one is current
        kernels.compile_ahead(index)  # in threads, while the rest is set up and nets are built
        # blocking (not non_blocking): work another thread puts on the legacy default stream
        # stays ordered with ours
        self.stream, self.side = cupy.cuda.Stream(), cupy.cuda.Stream(non_blocking=True)
        self.copy_stream = cupy.cuda.Stream(non_blocking=True)  # host-to-device batches (Uploader)
        self.stream.use()
        self.blas, self._side_blas = blas.Blas(cupy, self.stream, self, blas.WORKSPACE_BYTES), None
        kernels.bind_blas(index, self.blas)
        library = cudnn.library()
        self.cudnn = cudnn.Cudnn(library, self) if library else None  # 2-D convolutions
        self.choices = choices.Choices(choices.cache_dir(), self._setup())  # timed ones, kept on disk
        self._overlap, self._side_done = False, None  # inside `overlapping`; the last aside's end event
        self.capturing = False  # between `capture`'s begin and end (buffers grow in its eager run only)
        # deterministic: only kernels whose results never vary (im2col + GEMM for convolutions,
        # never a choice by timing); read by layers when they are set up
        self.deterministic = os.environ.get("ESPRESSO_DETERMINISTIC", "0") not in ("", "0")
        self.set_tf32(os.environ.get("ESPRESSO_TF32", "0") not in ("", "0"))
        # the generator of Dropout's masks, made at its first draw from the last seed: its
        # states (CuPy 14's default: 2048 per multiprocessor, 48 bytes each) take 12.4 MiB of
        # an H100 or H200, which every net held, inference too
        self._rng, self._rng_seed = None, None
        self._graph_pools, self._peak = [], 0

    @property
    def rng(self):
        if self._rng is None:
            if self.capturing:  # its states are set by a kernel that must run once, not at each replay
                raise GraphCaptureError("the random generator would be made inside the capture")
            with self.device:
                self._rng = self.xp.random.default_rng(self._rng_seed)
        return self._rng

    @property
    def side_blas(self):
        """The side stream's cuBLAS handle, with a workspace of its own (SIDE_WORKSPACE_BYTES): made when a
        backward pass first puts work aside (in the eager run before a capture), never for
        inference."""
        if self._side_blas is None:
            self._side_blas = blas.Blas(self.xp, self.side, self, blas.SIDE_WORKSPACE_BYTES)
            self._side_blas.set_tf32(self.blas.tf32)
        return self._side_blas

    def set_tf32(self, allow):
        """Let float32 GEMMs and convolutions use TF32 tensor cores (faster, 10-bit mantissa
        products), or not.  Graphs captured before are void (they hold the old kernels)."""
        self.blas.set_tf32(allow)
        if self._side_blas is not None:
            self._side_blas.set_tf32(allow)
        if self.cudnn:
            self.cudnn.set_tf32(allow)
        graphs.invalidate(self)

    @contextlib.contextmanager
    def overlapping(self, on=True):
        """Lets layers put work `aside` (Net's backward pass), joined at the end; not `on`: no
        work goes aside within, and the work put aside before is joined first."""
        outer, self._overlap = self._overlap, on
        if not on:
            self.join()
        try:
            yield
        finally:
            self._overlap = outer
            if not outer:
                self.join()

    @contextlib.contextmanager
    def aside(self, cudnn_bytes=0, when=True):
        """Work (parameter gradients) that nothing else in the pass reads, queued on the side
        stream after everything queued so far.  Yields whether it went aside: not unless
        `when`, not outside `overlapping`, nor when its cuDNN workspace would be over
        SIDE_WORKSPACE_LIMIT."""
        if not (when and self._overlap) or cudnn_bytes > cudnn.SIDE_WORKSPACE_LIMIT:
            yield False
            return
        if cudnn_bytes and cudnn_bytes > self.cudnn.lanes[True][1].nbytes:
            self.join()  # the side's old workspace goes back to the pool: no work may still use it
            self.cudnn.grow_workspace(cudnn_bytes, side=True)
        self.side.wait_event(self.stream.record(self.xp.cuda.Event(disable_timing=True)))
        kernels.bind_blas(self.index, self.side_blas)
        if self.cudnn:
            self.cudnn.use_side(True)
        self.side.use()  # (not `with side:`, whose exit made the legacy stream current)
        try:
            yield True
        finally:
            self.stream.use()
            kernels.bind_blas(self.index, self.blas)
            if self.cudnn:
                self.cudnn.use_side(False)
            self._side_done = self.side.record(self.xp.cuda.Event(disable_timing=True))

    def queue_after(self, stream):
        """`stream`'s next work waits for all the work queued so far, on the main stream and aside."""
        stream.wait_event(self.stream.record(self.xp.cuda.Event(disable_timing=True)))
        if self._side_done is not None:
            stream.wait_event(self._side_done)

    def join(self):
        """The main stream waits for the work put aside so far."""
        if self._side_done is not None:
            self.stream.wait_event(self._side_done)
            self._side_done = None

    def capture(self, run):
        """Run `run()` once (a real, eager run that also compiles kernels and creates lazily made
        buffers), then capture it as a CUDA graph; returns the graph, whose launch(stream)
        replays it.  Temporaries of the captured run come from a private memory pool kept for
        the life of the backend, so no other allocation ever reuses memory a replay writes.
        Raises GraphCaptureError when `run` does something a graph cannot hold (a host sync,
        a host-to-device copy from pageable memory, a library that refuses capture)."""
        run()
        kernels.finish_ahead()
        # the eager run's temporaries sit cached in the default pool; the capture takes its own
        # from a private one: return the cached ones, so the two do not add up at the peak
        self.join()
        self._sample_peak()
        self.xp.get_default_memory_pool().free_all_blocks()
        pool = self.xp.cuda.MemoryPool()
        self._graph_pools.append(pool)
        with self.xp.cuda.using_allocator(pool.malloc):
            self.stream.begin_capture()
            self.capturing = True
            try:
                run()
                self.join()  # a capture ends with every branch joined
            except Exception as e:
                _end_capture_quietly(self.stream)
                self._side_done = None  # an event of the aborted capture
                raise GraphCaptureError(f"cannot capture a CUDA graph: {type(e).__name__}: {e}") from e
            finally:
                self.capturing = False
            graph = self.stream.end_capture()
        self._sample_peak()
        return graph

    def launch(self, graph):
        graph.launch(self.stream)

    def replay_ms(self, run, repeats=3, floor_ms=0.1):
        """GPU milliseconds of run() replayed as a CUDA graph (best of `repeats`): what it will
        cost inside a captured iteration, without eager launches' gaps between kernels.  A run
        shorter than `floor_ms` is timed again as a graph of that many runs back to back, so
        that a graph launch's own microseconds do not decide between two small kernels."""
        best = self._best_replay_ms(run, 1, repeats)
        if best < floor_ms:
            copies = math.ceil(floor_ms / max(best, 1e-3))
            best = self._best_replay_ms(lambda: [run() for _ in range(copies)], copies, repeats)
        return best

    def _best_replay_ms(self, run, copies, repeats):
        graph = self.capture(run)
        self.device.synchronize()  # nothing else runs meanwhile (data-parallel buckets on their own stream)
        best = float("inf")
        for _ in range(repeats):
            start = self.mark()
            self.launch(graph)
            best = min(best, self.elapsed_ms(start, self.mark()) / copies)
        del graph
        self._graph_pools.pop().free_all_blocks()
        return best

    def peak_memory(self):
        """The most device memory CuPy's pools (the default one and the graphs') have held for
        this process: sampled now and around every capture (the pools keep freed blocks for
        reuse, so between samples the reserved memory only grows)."""
        return self._sample_peak()

    def available_memory(self):
        """The device's free memory and what CuPy's default pool holds unused."""
        with self.device:
            return self.device.mem_info[0] + self.xp.get_default_memory_pool().free_bytes()

    def reset_peak_memory(self):
        """Give back the pools' unused blocks, forget the pools of graphs no longer held, and
        start the peak over from what is held now."""
        with self.device:
            self._graph_pools = [pool for pool in self._graph_pools if pool.used_bytes()]
            for pool in [self.xp.get_default_memory_pool(), *self._graph_pools]:
                pool.free_all_blocks()
        self._peak = 0
        self._sample_peak()

    def _sample_peak(self):
        with self.device:
            pools = [self.xp.get_default_memory_pool(), *self._graph_pools]
            self._peak = max(self._peak, sum(pool.total_bytes() for pool in pools))
        return self._peak

    def pinned_empty(self, shape, dtype):
        """A host array in page-locked memory, which copies to the device can read asynchronously."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        memory = self.xp.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
        return np.frombuffer(memory, dtype, count).reshape(shape)

    def uploader(self, arrays):
        return Uploader(self, arrays)

    def seed(self, seed):
        self._rng, self._rng_seed = None, seed

    def synchronize(self):
        self.device.synchronize()

    def mark(self):
        """A CUDA event recorded on the stream: elapsed_ms between two is GPU time."""
        event = self.xp.cuda.Event()
        event.record(self.stream)
        return event

    def elapsed_ms(self, start, end):
        end.synchronize()
        return self.xp.cuda.get_elapsed_time(start, end)

    def to_device(self, array, dtype=None):
        """A C-contiguous device copy of `array` (no copy if it is one already); 0-d stays 0-d."""
        with self.device:
            out = self.xp.asarray(array, dtype=dtype)
            return out if out.flags.c_contiguous else out.copy()

    def to_host(self, array):
        if isinstance(array, self.xp.ndarray):
            return self.xp.asnumpy(array)  # waits for the work that writes it
        return np.asarray(array)

    def _setup(self):
        """What the timed choices depend on besides the shapes: the GPU and the software stack."""
        from espresso import __version__

        described = self.describe()  # (its "Device" names the index too: ranks of one machine share a file)
        return {what: described[what] for what in ("Compute capability", "Driver", "Runtime", "CuPy", "cuDNN")} | {
            "GPU": described["Device"].split(": ", 1)[-1], "Espresso": __version__}

    def describe(self):
        runtime = self.xp.cuda.runtime
        props = runtime.getDeviceProperties(self.index)
        free, total = self.device.mem_info
        name = props["name"]
        return {
            "Device": f"GPU {self.index}: {name.decode() if isinstance(name, bytes) else name}",
            "Compute capability": f"{props['major']}.{props['minor']}",
            "Multiprocessors": props["multiProcessorCount"],
            "Memory": f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)",
            "Driver": _version(runtime.driverGetVersion()),
            "Runtime": _version(runtime.runtimeGetVersion()),
            "CuPy": self.xp.__version__,
            "cuDNN": _version(self.cudnn.lib.cudnnGetVersion() // 10) if self.cudnn else "not found (im2col + GEMM)",
        }


class Uploader:
    """Copies host batches (pinned arrays shaped like `arrays`) to the device on the backend's
    copy stream, into two device slots in turn: the copy of one batch runs while the main stream
    still works on the previous one.  The main stream waits for a copy before its next work; a
    copy waits until the main stream is done with the slot it overwrites."""

    def __init__(self, backend, arrays):
        self.backend, self.turn, self.copied = backend, 0, None
        self.slots = [[backend.xp.empty(a.shape, a.dtype) for a in arrays] for _ in range(2)]
        self.released = [None, None]  # per slot: the main stream's event after its last use

    def __call__(self, arrays):
        """Device copies of `arrays` for work queued next on the main stream."""
        b, copy = self.backend, self.backend.copy_stream
        if self.released[self.turn] is not None:
            copy.wait_event(self.released[self.turn])
        slot = self.slots[self.turn]
        for device, host in zip(slot, arrays):
            device.set(host, stream=copy)
        self.copied = copy.record(b.xp.cuda.Event(disable_timing=True))
        b.stream.wait_event(self.copied)
        return slot

    def done(self):
        """The main stream's work on the current slot is queued: the next call takes the other.
        Returns once the copy (alone) has completed, so the host arrays may be refilled."""
        self.released[self.turn] = self.backend.stream.record(self.backend.xp.cuda.Event(disable_timing=True))
        self.turn ^= 1
        self.copied.synchronize()


def _end_capture_quietly(stream):
    try:
        stream.end_capture()
    except Exception:  # the capture was invalidated by the failure being reported
        pass


def _version(code):
    """CUDA's version integers (1000 * major + 10 * minor) as 'major.minor'."""
    return f"{code // 1000}.{code % 1000 // 10}"


def create(index):
    name = f"cuda:{index}"
    cupy = _import_cupy(name)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or a driver older than CuPy's runtime
        raise BackendError(f"backend '{name}': no usable CUDA driver or GPU ({e})") from None
    if not 0 <= index < count:
        raise BackendError(f"backend '{name}': no GPU {index} ({count} CUDA device(s) visible)")
    return CUDABackend(cupy, index)
