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


def test_fixed_point_training_on_the_gpu_rounds_as_on_the_cpu():
    """FixedPoint with CuPy's generator: the same rules (nearest exactly equal to the CPU's,
    stochastic on the grid and unbiased), and a solver step keeps the weights on the grid."""
    from test_fixed_point import _solver

    from espresso.compress.fixed_point import FixedPoint, on_grid

    values = np.random.default_rng(3).uniform(-3, 3, 4096).astype(np.float32)
    cpu = values.copy()
    FixedPoint(_solver().net, 2, 5, "nearest").round(cpu, "x")
    espresso.set_mode_gpu()
    try:
        solver = _solver()
        xp = solver.net.backend.xp
        nearest, stochastic = xp.asarray(values), xp.asarray(np.repeat(values[None, :64], 2000, 0))
        FixedPoint(solver.net, 2, 5, "nearest").round(nearest, "x")
        FixedPoint(solver.net, 2, 5, "stochastic").round(stochastic, "x")
        FixedPoint(solver.net, 3, 6, "stochastic").attach(solver)
        solver.net.blobs["data"].data[...] = np.random.default_rng(4).standard_normal((8, 6))
        solver.net.blobs["label"].data[...] = np.arange(8) % 3
        solver.step(2)
        weights = [b.host_data() for b in solver.net.learnable_params]
    finally:
        espresso.set_mode_cpu()
    np.testing.assert_array_equal(xp.asnumpy(nearest), cpu)
    draws = xp.asnumpy(stochastic)
    assert on_grid(draws, 5, 7) and np.abs(draws.mean(0) - np.clip(values[:64], -2, 2 - 1 / 32)).max() < 0.01
    assert all(on_grid(w, 6, 9) for w in weights)
