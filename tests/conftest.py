import os
from pathlib import Path

import numpy as np
import pytest

import espresso

ZOO = Path(os.environ.get("ESPRESSO_CAFFE_ZOO", Path(__file__).resolve().parents[2] / "shared" / "caffe-zoo"))


@pytest.fixture
def zoo():
    """The prototxt files that ship with Caffe (../shared/caffe-zoo); skipped where absent."""
    if not ZOO.is_dir():
        pytest.skip(f"Caffe's prototxt files not found at {ZOO} (set ESPRESSO_CAFFE_ZOO)")
    return ZOO


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _cpu_mode():
    espresso.set_mode_cpu()
    espresso.set_random_seed(1701)
    yield
