"""The CUDA backend: CuPy arrays on one NVIDIA GPU, GEMMs through CuPy's cuBLAS, the named
primitives as CUDA kernels (kernels.py and the .cu files beside it).

CuPy is imported by `create`, not by this module, so `import espresso` never needs it and a
missing CuPy or GPU is reported as a BackendError that says what to install.  Work is queued on
CuPy's current stream of the backend's device (the default stream for now).
"""

import numpy as np

from espresso.backend.cuda import kernels
from espresso.errors import BackendError

INSTALL_HINT = ("pip install cupy-cuda13x (CUDA 13 drivers) or cupy-cuda12x (CUDA 12); "
                "see https://docs.cupy.dev/en/stable/install.html")


def _import_cupy(name):
    try:
        import cupy
    except ImportError as e:
        raise BackendError(f"backend '{name}' needs CuPy, which is not installed ({e}): "
                           f"{INSTALL_HINT}") from None
    return cupy


class CUDABackend:
    k = kernels

    def __init__(self, cupy, index):
        self.xp, self.index, self.name = cupy, index, f"cuda:{index}"
        self.device = cupy.cuda.Device(index)
        self.device.use()  # layers call xp.* without naming a device: this one is current
        self.rng = cupy.random.default_rng()

    def seed(self, seed):
        with self.device:
            self.rng = self.xp.random.default_rng(seed)

    def synchronize(self):
        self.device.synchronize()

    def to_device(self, array, dtype=None):
        """A C-contiguous device copy of `array` (no copy if it is one already); 0-d stays 0-d."""
        with self.device:
            out = self.xp.asarray(array, dtype=dtype)
            return out if out.flags.c_contiguous else out.copy()

    def to_host(self, array):
        if isinstance(array, self.xp.ndarray):
            return self.xp.asnumpy(array)  # waits for the work that writes it
        return np.asarray(array)

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
        }


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
