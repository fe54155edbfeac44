import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import espresso

# The GPU's timed choices (espresso/backend/cuda/choices.py) go to a directory of this session,
# not the user's cache: set before any test module is imported (tests/devices.py makes the CUDA
# backend then); subprocesses inherit it.
_CHOICES = tempfile.mkdtemp(prefix="espresso-choices-")
os.environ["ESPRESSO_CACHE_DIR"] = _CHOICES


def pytest_unconfigure(config):
    shutil.rmtree(_CHOICES, ignore_errors=True)


# the prototxt files that ship with Caffe: ../shared/caffe-zoo beside the checkout, or $ESPRESSO_CAFFE_ZOO
ZOO = Path(os.environ.get("ESPRESSO_CAFFE_ZOO", Path(__file__).resolve().parents[2] / "shared" / "caffe-zoo"))


@pytest.fixture
def zoo():
    """Caffe's prototxt files (ZOO): a failure under CI=true when absent, else a visible skip."""
    if not ZOO.is_dir():
        message = f"Caffe's prototxt files not found at {ZOO} (set ESPRESSO_CAFFE_ZOO)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must have them")
        pytest.skip(message)
    return ZOO


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _cpu_mode():
    espresso.set_mode_cpu()
    espresso.set_random_seed(1701)
    yield
