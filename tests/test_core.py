"""Blob, fillers, the layer registry and prototxt helpers."""

import os

import numpy as np
import pytest

import espresso as caffe
from espresso import backend
from espresso.blob import Blob
from espresso.errors import BackendError, LayerParamError, ShapeError
from espresso.filler import fill
from espresso.layer import known_types, legacy_types
from espresso.proto import caffe_pb2
from espresso.proto.text import block_lines


def test_blob_reshape_reuses_memory_when_it_fits():
    blob = Blob((4, 5))
    buffer = blob.data.base if blob.data.base is not None else blob.data
    blob.reshape(2, 5)
    assert np.shares_memory(blob.data, buffer)
    blob.reshape((3, 3))
    assert blob.shape == (3, 3) and np.shares_memory(blob.data, buffer)
    blob.reshape(10, 10)
    assert blob.count == 100 and not np.shares_memory(blob.data, buffer)
    assert (blob.num, blob.channels, blob.height, blob.width) == (10, 10, 1, 1)


def test_blob_diff_is_lazy_and_shaped():
    blob = Blob((2, 3))
    assert blob._diff is None
    assert blob.diff.shape == (2, 3) and (blob.diff == 0).all()


def test_blob_rejects_negative_dims():
    with pytest.raises(ShapeError):
        Blob((2, -1))


def filler(**kw):
    return caffe_pb2.FillerParameter(**kw)


def test_constant_uniform_gaussian_fillers():
    blob = Blob((200, 50), np.float64)
    fill(blob, filler(type="constant", value=3))
    assert (blob.data == 3).all()
    fill(blob, filler(type="uniform", min=-2, max=-1))
    assert blob.data.min() >= -2 and blob.data.max() < -1
    fill(blob, filler(type="gaussian", mean=1, std=2))
    assert abs(blob.data.mean() - 1) < 0.1 and abs(blob.data.std() - 2) < 0.1


def test_sparse_gaussian_keeps_about_sparse_over_num_outputs():
    blob = Blob((20, 1000), np.float64)
    fill(blob, filler(type="gaussian", sparse=5))
    assert abs((blob.data != 0).mean() - 5 / 20) < 0.02


def _assert_uniform(values, bound):
    """18,432 draws of U(-bound, bound): their extremes reach within 0.1% of the bound, their
    mean is near 0 and their standard deviation near bound / sqrt(3)."""
    assert -bound <= values.min() < -0.999 * bound and 0.999 * bound < values.max() <= bound
    assert abs(values.mean()) < 0.02 * bound
    assert values.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)


def test_xavier_and_msra_scale_by_fan():
    blob = Blob((64, 32, 3, 3), np.float64)  # fan_in 288, fan_out 576
    fill(blob, filler(type="xavier"))  # Caffe: U(-a, a) with a = sqrt(3 / fan_in)
    _assert_uniform(blob.data, np.sqrt(3 / 288))
    fill(blob, filler(type="msra", variance_norm=caffe_pb2.FillerParameter.FAN_OUT))  # N(0, 2 / fan_out)
    assert abs(blob.data.mean()) < 0.002 and abs(blob.data.std() - np.sqrt(2 / 576)) < 0.003
    fill(blob, filler(type="xavier", variance_norm=caffe_pb2.FillerParameter.AVERAGE))
    _assert_uniform(blob.data, np.sqrt(3 / 432))


def test_positive_unitball_rows_sum_to_one():
    blob = Blob((5, 2, 3), np.float64)
    fill(blob, filler(type="positive_unitball"))
    assert np.allclose(blob.data.reshape(5, -1).sum(1), 1) and (blob.data >= 0).all()


def test_bilinear_filler_matches_caffes_formula():
    blob = Blob((1, 1, 4, 4), np.float64)
    fill(blob, filler(type="bilinear"))
    f, c = 2, (2 * 2 - 1 - 0) / 4  # f = ceil(4/2), c = (2f - 1 - f%2) / (2f)
    want = [[(1 - abs(x / f - c)) * (1 - abs(y / f - c)) for x in range(4)] for y in range(4)]
    assert np.allclose(blob.data[0, 0], want)


def test_unknown_filler_is_a_clear_error():
    with pytest.raises(LayerParamError, match="unknown filler type 'gausian'"):
        fill(Blob((2,)), filler(type="gausian"))


def test_random_seed_makes_fillers_repeatable():
    caffe.set_random_seed(5)
    a = Blob((10,), np.float64)
    fill(a, filler(type="gaussian"))
    caffe.set_random_seed(5)
    b = Blob((10,), np.float64)
    fill(b, filler(type="gaussian"))
    assert np.array_equal(a.data, b.data)


def test_registry_knows_the_catalog_and_v1_names():
    types = set(known_types())
    assert {"Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss", "BatchNorm",
            "LSTM", "Input", "Python"} <= types
    assert legacy_types()["INNER_PRODUCT"] == "InnerProduct"


def test_block_lines_skips_comments_strings_and_nesting():
    text = '# layer { in a comment\nname: "n"\nlayer {\n  name: "a { }"\n  param { }\n}\n\nlayers { }\nlayer{}\n'
    assert block_lines(text) == [3, 8, 9]


def test_gpu_mode_without_a_gpu_backend_is_a_clear_error():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy present: the GPU backend may work here")
    except ImportError:
        pass
    with pytest.raises(caffe.BackendError, match="needs CuPy.*pip install cupy"):
        caffe.set_mode_gpu()


def test_shared_blob_shrinks_within_the_shared_memory():
    owner, view = Blob((10, 10)), Blob((10, 10))
    view.share_data(owner)
    owner.reshape(1, 10)
    view.reshape(1, 10)
    view.share_data(owner)
    owner.data[...] = 3
    assert view.shape == (1, 10) and (view.data == 3).all()


def test_blas_threads_follow_the_setting(monkeypatch):
    from espresso.backend import cpu

    monkeypatch.setenv("ESPRESSO_NUM_THREADS", "1")
    assert cpu.default_threads() == 1
    monkeypatch.setenv("ESPRESSO_NUM_THREADS", "x")
    with pytest.raises(BackendError, match="ESPRESSO_NUM_THREADS must be a positive integer, got 'x'"):
        cpu.default_threads()
    monkeypatch.delenv("ESPRESSO_NUM_THREADS")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert cpu.default_threads() is None  # the user's BLAS setting is left to work
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert 1 <= cpu.default_threads() == cpu.physical_cores() <= len(os.sched_getaffinity(0))
    before = cpu.blas_threads()
    try:
        caffe.set_num_threads(1)
        assert cpu.blas_threads() == 1 and backend.get("cpu").describe()["BLAS threads"] == 1
    finally:
        caffe.set_num_threads(before)


@pytest.mark.parametrize("kind", ["xavier", "msra", "gaussian", "uniform", "positive_unitball", "constant"])
def test_a_large_blob_is_filled_row_block_by_row_block_with_the_values_of_one_draw(monkeypatch, kind):
    import espresso.filler

    p = caffe_pb2.FillerParameter(type=kind, std=0.3, min=-1, max=2, value=0.5)
    filled = []
    for chunk in (1 << 22, 1000):  # one draw; blocks of 111 rows
        monkeypatch.setattr(espresso.filler, "CHUNK", chunk)
        blob = Blob((300, 7, 3, 3))
        fill(blob, p, np.random.default_rng(3))
        filled.append(np.array(blob.data))
    np.testing.assert_array_equal(filled[0], filled[1])
    assert np.abs(filled[0]).sum() > 0


def _openblas_timeouts():
    import threadpoolctl

    return [lib.dynlib.openblas_thread_timeout() for lib in
            threadpoolctl.ThreadpoolController().select(internal_api="openblas").lib_controllers
            if hasattr(lib.dynlib, "openblas_thread_timeout")]


def test_openblas_threads_stop_spinning_soon_unless_the_user_says(monkeypatch):
    """OpenBLAS's idle threads spin 2^BLAS_SPIN_EXPONENT cycles, not its default 2^28, after
    the CPU backend starts; a user's OPENBLAS_THREAD_TIMEOUT is left to work."""
    from espresso.backend import cpu

    if not _openblas_timeouts():
        pytest.skip("NumPy's BLAS is not an OpenBLAS that exports its thread controls")
    cpu.shorten_blas_spin()
    assert set(_openblas_timeouts()) == {cpu.BLAS_SPIN_EXPONENT} and "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    np.dot(np.ones((512, 512)), np.ones((512, 512)))  # the threads start again, and work
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "12")
    monkeypatch.setattr(cpu, "BLAS_SPIN_EXPONENT", 6)
    cpu.shorten_blas_spin()
    assert set(_openblas_timeouts()) == {4}  # left alone: the user's variable is OpenBLAS's to read
