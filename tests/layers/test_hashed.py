"""HashedInnerProduct (HashedNets): the hash as specified, forward against the virtual matrix,
gradients (numerical), real weights shared by their buckets, CPU against the GPU."""

import numpy as np
import pytest
from devices import gpu_test

from espresso.errors import LayerParamError
from espresso.layers.hashed import hash_layout, splitmix64
from espresso.testing import LayerRun, assert_close, check_layer

GAUSS = 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" }'


def randn(*shape):
    return np.random.default_rng(7).standard_normal(shape)


def test_the_hash_is_splitmix64_as_documented():
    # SplitMix64's published first outputs from state 0 (its increment applied first)
    assert int(splitmix64(0)) == 0xE220A8397B1DCDAF
    assert int(splitmix64(0x9E3779B97F4A7C15)) == 0x6E789E6AA1B965F4
    bucket, sign = hash_layout(3, 4, 5, seed=2)
    u = splitmix64(np.arange(12, dtype=np.uint64) ^ np.uint64(2 << 32))
    assert bucket.tolist() == [int(v >> 32) % 5 for v in u.tolist()]
    assert sign.tolist() == [-1.0 if int(v) & 1 else 1.0 for v in u.tolist()]
    counts = np.bincount(hash_layout(300, 784, 1000)[0], minlength=1000)
    assert counts.min() > 150 and counts.max() < 330  # ~235 each: spread evenly
    assert hash_layout(3, 4, 5, seed=1)[0].tolist() != bucket.tolist()


@pytest.mark.parametrize("buckets, bias", [(7, True), (20, False), (1, True)])
def test_forward_is_the_virtual_matrix_and_gradients_check(buckets, bias):
    snippet = (f'type: "HashedInnerProduct" inner_product_param {{ num_output: 4 bias_term: {str(bias).lower()} '
               f'{GAUSS} }} hashed_param {{ buckets: {buckets} seed: 3 }}')
    bucket, sign = hash_layout(4, 5, buckets, seed=3)

    def reference(bottoms, params):
        virtual = (params[0][bucket] * sign).reshape(4, 5)
        return [bottoms[0] @ virtual.T + (params[1] if bias else 0)]

    run = check_layer(snippet, [randn(3, 5)], reference=reference, top_shapes=[(3, 4)])
    assert run.layer.blobs[0].shape == (buckets,)


def test_entries_of_one_bucket_share_one_weight_and_its_gradient():
    run = LayerRun(f'type: "HashedInnerProduct" inner_product_param {{ num_output: 3 {GAUSS} }} '
                   'hashed_param { buckets: 2 }', [randn(2, 4)])
    run.forward()
    virtual = np.asarray(run.layer.virtual_weights())
    bucket, sign = hash_layout(3, 4, 2)
    assert_close(np.abs(virtual).reshape(-1), np.abs(np.asarray(run.layer.blobs[0].data))[bucket])
    run.zero_param_diffs()
    run.backward([np.ones((2, 3))])
    full = np.ones((3, 2)) @ randn(2, 4)  # dL/dV of the whole virtual matrix
    assert_close(run.param_diffs()[0], np.bincount(bucket, weights=full.reshape(-1) * sign, minlength=2))


def test_bad_buckets_and_transpose_are_refused():
    with pytest.raises(LayerParamError, match=r"hashed_param.buckets: 1 to 12 real weights .* got 13"):
        LayerRun('type: "HashedInnerProduct" inner_product_param { num_output: 3 } hashed_param { buckets: 13 }',
                 [randn(2, 4)])
    with pytest.raises(LayerParamError, match="transpose is not supported"):
        LayerRun('type: "HashedInnerProduct" inner_product_param { num_output: 3 transpose: true } '
                 'hashed_param { buckets: 2 }', [randn(2, 4)])


@gpu_test
def test_hashed_layer_on_a_gpu_matches_the_cpu():
    snippet = (f'type: "HashedInnerProduct" inner_product_param {{ num_output: 6 {GAUSS} }} '
               'hashed_param { buckets: 9 }')
    cpu = LayerRun(snippet, [randn(4, 10)])
    gpu = LayerRun(snippet, [randn(4, 10)], device="cuda:0")
    for mine, theirs in zip(gpu.layer.blobs, cpu.layer.blobs):
        mine.data[...] = gpu.backend.to_device(np.asarray(theirs.data), mine.dtype)
    assert_close(gpu.forward()[0], cpu.forward()[0], rtol=1e-5, atol=1e-6)
    for run in (cpu, gpu):
        run.zero_param_diffs()
        run.backward([np.ones((4, 6))])
    assert_close(gpu.param_diffs()[0], cpu.param_diffs()[0], rtol=1e-5, atol=1e-5)
