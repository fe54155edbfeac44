"""Where the GPU tests can run: one check for every test module.  GPU tests are marked `gpu`
and skipped, saying why, where CuPy or a GPU is missing."""

import numpy as np
import pytest

from espresso import backend
from espresso.backend.cpu import CPUBackend
from espresso.errors import BackendError, GraphCaptureError


def _gpu_missing():
    """Why no CUDA backend can be made here, or None."""
    try:
        backend.get("cuda:0")
    except BackendError as e:
        return str(e)
    return None


GPU_MISSING = _gpu_missing()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(GPU_MISSING is not None, reason=f"needs a CUDA GPU: {GPU_MISSING}")]
ON_GPU = pytest.param("gpu", marks=needs_gpu)  # parametrize("device", ["cpu", ON_GPU])


def gpu_test(function):
    """A test that needs a GPU (marked and skipped as above)."""
    for mark in needs_gpu:
        function = mark(function)
    return function


class FakeGraphs(CPUBackend):
    """The CPU backend with graphs: a capture runs `run` once (as the contract says) and keeps
    it; a launch calls it again.  Records what it did."""

    can_capture = True

    def __init__(self, fail=False):
        super().__init__()
        self.fail, self.captures, self.launches = fail, 0, 0

    def capture(self, run):
        run()
        if self.fail:
            raise GraphCaptureError("this fake refuses")
        self.captures += 1
        return run

    def launch(self, graph):
        self.launches += 1
        graph()


class FakeDevice(CPUBackend):
    """The CPU backend posing as a device: its arrays are not handed to pycaffe code directly,
    so nets give out host copies through espresso/hostview.py."""

    host_arrays = False

    def to_host(self, array):
        return np.array(array)
