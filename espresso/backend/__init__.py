"""The backend contract and registry.

A backend is one device's way of doing math: a subclass of `Backend`, one module per device
(cpu/, cuda/), created by `get(name)`.  Layers, nets and solvers use only what `Backend` names
here, and never ask which backend they run on: where a device has more (CUDA graphs, cuDNN, a
side stream, fused kernels), the contract names the capability and its default, which the base
class gives and the device overrides (as tinygrad's devices declare `graph=None`).
tests/backend/test_contract.py checks every backend against it.

Required (no default):
  name              'cpu', 'cuda:0', ...
  xp                the array module layer code is written against (NumPy, CuPy, ...)
  k                 the named primitives (see KERNELS and FUSED_KERNELS below)
  rng               a NumPy-compatible random Generator on the device (dropout masks); seed(s)
  to_device(a, dtype=None) / to_host(a)   a C-contiguous device array / a NumPy array
  synchronize()     wait for the queued device work
  mark() / elapsed_ms(start, end)          device time between two marks
  describe()        {field: text} for `espresso device-query`

Capabilities, with their defaults:
  host_arrays = True        xp's arrays are host (NumPy) memory: pycaffe's views need no
                            copies, host code may index them per batch
  can_capture = False       capture(run) -> graph, launch(graph), replay_ms(run): CUDA graphs
  cudnn = None              the cuDNN library (2-D convolutions), where installed
  deterministic = True      results never vary run to run (a GPU may choose kernels by timing)
  splits_long_gemms = False long weight-gradient GEMMs run as split partial products
  batch_ranges(count) / over_ranges(ranges, run)   one part: a batch is not split over threads
  set_tf32(allow)           no-op: TF32 tensor cores for float32 math, where there are any
  overlapping(on) / aside(cudnn_bytes, when) / join()   one stream of work: nothing runs aside
  pinned_empty(shape, dtype) host memory a device copies from asynchronously (plain here)
  uploader(arrays)          moves host batches to the device (here: hands them through)
  rng_state() / set_rng_state(state)   rng's state as JSON values, saved with a snapshot
                            (None here: not saved, a resumed run draws anew)
  peak_memory()             the most device memory held so far, in bytes (host RSS here)
  reset_peak_memory()       peak_memory starts over from what is held now (benchmarks)
  available_memory()        bytes the device can still give (the host's MemAvailable here)
"""

import contextlib
import importlib
import os
import resource

import numpy as np

from espresso import graphs
from espresso.errors import BackendError

# every backend's `k` defines these (tests/backend/test_contract.py)
KERNELS = ("matmul", "matmul_bias", "im2col_workspace_size", "im2col", "col2im", "pool_workspace_size",
           "max_pool_forward", "max_pool_backward", "ave_pool_forward", "ave_pool_backward",
           "stochastic_pool_forward_train", "stochastic_pool_forward_test", "stochastic_pool_backward",
           "lrn_workspace_size", "lrn_across_forward", "lrn_across_backward")
# fused fast paths: a function, or None where the backend has none (callers then use xp code)
FUSED_KERNELS = ("relu_forward", "relu_backward", "softmax_forward", "softmax_loss_forward", "softmax_loss_backward",
                 "accuracy_forward", "direct_conv_forward", "direct_conv_weight_grad", "sgd_update", "gather_batch",
                 "record_iteration", "csr_matrix", "channel_sums_workspace_size", "channel_sums", "batch_norm_forward",
                 "batch_norm_backward", "scale_forward", "add_relu", "matmul_bias_relu", "im2row", "row2im")
# and k.SOFTMAX_LOSS_MOST: the most inputs its softmax_loss pair takes (None: any), xp code beyond

_CACHE = {}
_MODULES = {"cpu": "espresso.backend.cpu", "cuda": "espresso.backend.cuda"}


class Backend:
    """The contract, with the defaults of a host device that has one stream of work."""

    name = xp = k = rng = None
    host_arrays = True
    can_capture = False
    cudnn = None
    deterministic = True
    splits_long_gemms = False

    def seed(self, seed):
        raise NotImplementedError

    def rng_state(self):
        return None

    def set_rng_state(self, state):
        pass

    def to_device(self, array, dtype=None):
        raise NotImplementedError

    def to_host(self, array):
        raise NotImplementedError

    def synchronize(self):
        raise NotImplementedError

    def mark(self):
        raise NotImplementedError

    def elapsed_ms(self, start, end):
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    # *** capabilities ***
    def capture(self, run):
        raise BackendError(f"backend {self.name} cannot capture graphs (can_capture is False)")

    def launch(self, graph):
        raise BackendError(f"backend {self.name} cannot replay graphs (can_capture is False)")

    def replay_ms(self, run, repeats=3):
        raise BackendError(f"backend {self.name} cannot replay graphs (can_capture is False)")

    def set_tf32(self, allow):
        pass

    def batch_ranges(self, count):
        """[(lo, hi), ...]: the parts a batch of `count` items splits into, each run by its own
        thread in `over_ranges` (a layer sizes one set of buffers per part).  One part here: the
        device spreads each kernel over its own cores."""
        return [(0, count)]

    def over_ranges(self, ranges, run):
        """run(part, lo, hi) for each range of `batch_ranges`, side by side where the backend
        splits batches; returns when all are done."""
        for part, (lo, hi) in enumerate(ranges):
            run(part, lo, hi)

    def overlapping(self, on=True):
        """Lets layers put work `aside` within (Net's backward pass); joined at the end."""
        return contextlib.nullcontext()

    def aside(self, cudnn_bytes=0, when=True):
        """Runs its block's work beside the main stream where it can; yields whether it did."""
        return contextlib.nullcontext(False)

    def join(self):
        """The main stream's next work waits for the work put aside so far."""

    def pinned_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def uploader(self, arrays):
        return HostUploader()

    def peak_memory(self):
        """The process's peak RSS since the last reset_peak_memory (Linux's VmHWM), else ever."""
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def reset_peak_memory(self):
        """Start peak_memory over from what is held now (Linux: clear_refs 5 resets VmHWM)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def available_memory(self):
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):  # not Linux: the physical memory
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class HostUploader:
    """A backend's uploader where the device reads host memory: batches pass through.  `arrays`
    gives the device arrays of a host batch; `done()` follows the last work queued on them, and
    returns once the host batch may be refilled."""

    def __call__(self, arrays):
        return arrays

    def done(self):
        pass


def get(name="cpu"):
    """The backend for `name` ('cpu', 'cuda' or 'cuda:N'), created once and cached."""
    if name not in _CACHE:
        kind, _, index = name.partition(":")
        if kind not in _MODULES:
            raise BackendError(f"unknown backend '{name}' (known: {', '.join(_MODULES)})")
        try:
            module = importlib.import_module(_MODULES[kind])
        except ImportError as e:
            raise BackendError(f"backend '{name}' is not available: {e}") from None
        _CACHE[name] = module.create(int(index or 0))
    return _CACHE[name]


def address(array):
    """Where an array's data starts (NumPy or CuPy): equal addresses mean shared storage."""
    data = array.data
    return data.ptr if hasattr(data, "ptr") else array.ctypes.data


def reseed(seed):
    """Re-seed the device generators of every backend created so far.  The new generators hold
    their state in new memory, so captured graphs (which baked in the old) are void."""
    for backend in _CACHE.values():
        backend.seed(seed)
        graphs.invalidate(backend)
