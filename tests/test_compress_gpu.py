"""Compressed inference on the CUDA backend (cuSPARSE through cupyx.scipy.sparse) against the
CPU one, from the same compressed file.  Skipped without CuPy and a GPU; passes on the H200
(benchmarks/results/gpu_tests.log)."""

import numpy as np
import pytest
from devices import needs_gpu
from test_compress import compressed_deploy

import espresso
from espresso.compress.runtime import CompressedLayer

pytestmark = needs_gpu


@pytest.mark.parametrize("quantize", [False, True])
def test_gpu_compressed_inference_matches_cpu(tmp_path, quantize):
    proto, path = compressed_deploy(tmp_path, quantize)
    x = np.random.default_rng(7).normal(size=(3, 2, 9, 9)).astype(np.float32)
    espresso.set_mode_cpu()
    cpu = espresso.Net(str(proto), str(path), espresso.TEST)
    want = cpu.forward(data=x)["ipt"].copy()
    espresso.set_mode_gpu()
    try:
        gpu = espresso.Net(str(proto), str(path), espresso.TEST)
        assert all(isinstance(gpu.layer_dict[n], CompressedLayer) for n in ("conv", "ip", "ipt"))
        assert all(gpu.layer_dict[n].matrix.cusparse is not None for n in ("conv", "ip", "ipt"))
        got = np.asarray(gpu.forward(data=x)["ipt"])
    finally:
        espresso.set_mode_cpu()
    assert np.allclose(got, want, atol=1e-5, rtol=1e-5), np.abs(got - want).max()
