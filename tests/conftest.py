import os
from pathlib import Path

import numpy as np
import pytest

import espresso

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


@pytest.fixture(autouse=True, scope="session")
def _choice_cache(tmp_path_factory):
    """The GPU's timed choices (espresso/backend/cuda/choices.py) go to this session's directory,
    not the user's cache; subprocesses inherit it."""
    os.environ["ESPRESSO_CACHE_DIR"] = str(tmp_path_factory.mktemp("espresso-cache"))
