"""Deep Compression's pieces on tiny nets: Huffman codes, pruning masks through the solver,
k-means weight sharing and its fine-tuning, the compressed file (and its refusals), and
compressed inference against dense inference."""

import struct
import zlib

import numpy as np
import pytest

import espresso
from espresso.compress import huffman, model_file, sparse
from espresso.compress.model_file import from_weights, read_model, write_model
from espresso.compress.prune import Masks, prune_mask
from espresso.compress.quantize import SharedWeights, kmeans_share
from espresso.compress.runtime import CompressedLayer
from espresso.errors import ModelFileError, NetError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

TINY = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 12 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def tiny_solver(kind="SGD", momentum=0.9):
    net = parse_text(TINY, caffe_pb2.NetParameter())
    momentum = momentum if kind in ("SGD", "Nesterov", "Adam") else 0
    param = caffe_pb2.SolverParameter(net_param=net, base_lr=0.05, lr_policy="fixed", type=kind, max_iter=100,
                                      weight_decay=0.01, momentum=momentum)
    if kind == "Adam":
        param.momentum2, param.delta = 0.999, 1e-8
    return espresso.get_solver(param)


# *** Huffman ***
@pytest.mark.parametrize("alphabet", [2, 32, 256])
def test_huffman_round_trip_and_near_entropy(alphabet):
    rng = np.random.default_rng(alphabet)
    symbols = rng.zipf(1.6, 5000) % alphabet
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, nbits = huffman.encode(symbols, lengths)
    assert np.array_equal(huffman.decode(data, nbits, lengths, len(symbols)), symbols)
    p = np.bincount(symbols) / len(symbols)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert entropy <= nbits / len(symbols) < entropy + 1  # Huffman's bound


def test_huffman_decodes_across_windows(monkeypatch):
    monkeypatch.setattr(huffman, "CHUNK_BITS", 37)  # codes straddle every window boundary
    symbols = np.random.default_rng(9).zipf(1.4, 3000) % 256
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=256))
    data, nbits = huffman.encode(symbols, lengths)
    assert np.array_equal(huffman.decode(data, nbits, lengths, len(symbols)), symbols)


def test_huffman_codes_are_canonical_prefix_codes_within_the_length_limit():
    lengths = huffman.code_lengths(2 ** np.arange(40, dtype=np.int64))  # a Fibonacci-like skew: depth 39
    assert lengths.max() == huffman.MAX_LENGTH and (lengths > 0).all()
    codes = huffman.canonical_codes(lengths)
    words = [format(int(c), "b").zfill(int(n)) for c, n in zip(codes, lengths)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    assert np.array_equal(huffman.code_lengths([0, 5, 0]), [0, 1, 0])


def test_huffman_refuses_corrupt_streams():
    symbols = np.array([0, 1, 2, 3, 3, 3, 2])
    lengths = huffman.code_lengths(np.bincount(symbols))
    data, nbits = huffman.encode(symbols, lengths)
    with pytest.raises(ModelFileError, match="symbols use|ends after"):
        huffman.decode(data, nbits, lengths, len(symbols) + 1)
    with pytest.raises(ModelFileError, match="prefix code"):
        huffman.decode(data, nbits, [1, 1, 1, 1], len(symbols))
    with pytest.raises(ModelFileError, match="cannot fit"):
        huffman.decode(data, 3, lengths, 10)


# *** pruning ***
def test_prune_mask_by_sparsity_and_by_quality():
    w = np.random.default_rng(0).normal(size=(40, 50))
    mask = prune_mask(w, sparsity=0.9)
    assert mask.sum() == 200 and np.abs(w[mask]).min() >= np.abs(w[~mask]).max()
    again = prune_mask(w * 0 + 5, sparsity=0.5, mask=mask)  # never revives what was pruned
    assert not (again & ~mask).any()
    q = prune_mask(w, quality=1.0)
    assert np.array_equal(q, np.abs(w) > w.std())


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "Adam", "AdaGrad"])
def test_masks_keep_pruned_weights_dead_through_momentum_and_decay(kind):
    solver = tiny_solver(kind)
    solver.step(5)  # history is non-zero everywhere before pruning
    net, masks = solver.net, Masks(solver.net)
    w = net.layer_dict["ip1"].blobs[0]
    mask = prune_mask(w.data, sparsity=0.7)
    masks.set("ip1", mask)
    masks.attach(solver)
    before = w.data.copy()
    solver.step(20)
    assert (w.data[~mask] == 0).all()
    assert not np.allclose(w.data[mask], before[mask])  # the survivors still learn
    for history in solver.updater.rule.history:
        view = history[: w.count].reshape(w.shape) if net.learnable_params[0] is w else None
        assert view is not None and (view[~mask] == 0).all()


def test_without_the_mask_hook_momentum_and_decay_revive_pruned_weights():
    """The control for the test above: zeroing weights once is not enough."""
    solver = tiny_solver()
    solver.step(5)
    w = solver.net.layer_dict["ip1"].blobs[0]
    mask = prune_mask(w.data, sparsity=0.7)
    w.data[~mask] = 0
    solver.step(3)
    assert (w.data[~mask] != 0).mean() > 0.9


# *** quantization ***
@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_share(init):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(30, 40)).astype(np.float32)
    mask = prune_mask(w, sparsity=0.5)
    codebook, index = kmeans_share(w, 4, init, mask=mask, seed=1)
    assert codebook.shape == (16,) and codebook[0] == 0 and index.dtype == np.uint8
    assert (index[~mask] == 0).all() and (index[mask] > 0).all()
    kept = w[mask]
    nearest = np.abs(kept[:, None] - codebook[1:][None]).argmin(axis=1) + 1
    assert np.array_equal(codebook[index[mask]], codebook[nearest])  # every weight at its nearest centroid
    error = np.abs(codebook[index[mask]] - kept).mean()
    start = np.linspace(kept.min(), kept.max(), 15)
    assert error < np.abs(start[np.abs(kept[:, None] - start).argmin(axis=1)] - kept).mean() + 1e-9


def test_centroids_fine_tune_with_the_summed_cluster_gradient():
    solver = tiny_solver(momentum=0.0)
    net, shared = solver.net, SharedWeights(solver.net, "sum")
    blob = net.layer_dict["ip1"].blobs[0]
    codebook, index = kmeans_share(blob.data, 3, mask=prune_mask(blob.data, sparsity=0.3))
    shared.set("ip1", codebook, index)
    shared.attach(solver)
    assert np.array_equal(blob.data, codebook[index])
    solver.step(10)  # weight decay, the fixed rate: members move together, pruned stay zero
    assert len(np.unique(blob.data[index > 0])) <= 7 and (blob.data[index == 0] == 0).all()
    assert np.array_equal(blob.data, shared.codebook("ip1")[index])
    assert not np.allclose(shared.codebook("ip1"), codebook)
    # one update by hand: centroid -= rate * (sum of its members' gradients + decay * centroid)
    g = np.random.default_rng(0).normal(size=blob.shape).astype(np.float32)

    def update(weights):
        """(codebook before, after) one update by `weights` from the gradient g."""
        before = weights.codebook("ip1").copy()
        net.arena_diff[...] = 0
        blob.diff[...] = g
        weights.cluster_gradients()
        solver.updater.apply(0.05, solver.iter)
        weights.read_codebooks()
        return before, weights.codebook("ip1")

    before, after = update(shared)
    sums = np.bincount(index.ravel(), g.ravel(), minlength=8).astype(np.float32)
    want = before - np.float32(0.05) * (sums + np.float32(0.01) * before)
    assert np.allclose(after[1:], want[1:], atol=1e-6) and after[0] == 0
    # the default: the summed gradient with the step divided by the cluster's size
    mean = SharedWeights(net)
    mean.layers = shared.layers
    before, after = update(mean)
    sizes = np.maximum(np.bincount(index.ravel(), minlength=8), 1).astype(np.float32)
    want = before - np.float32(0.05) * (sums / sizes + np.float32(0.01) * before)
    assert np.allclose(after[1:], want[1:], atol=1e-6)


# *** the file ***
def sample_layers(rng=None):
    rng = rng or np.random.default_rng(5)
    w = rng.normal(size=(20, 300)).astype(np.float32)
    w[np.abs(w) < 1.6] = 0  # ~11% kept: gaps longer than 2**3 need fillers
    codebook, index = kmeans_share(w, 4, mask=w != 0)
    q = from_weights(w, w != 0, codebook, index, 4, 3)
    return w, codebook, index, [("fc", "InnerProduct", [q, rng.normal(size=20).astype(np.float32)]),
                                ("c", "Convolution", [from_weights(w.reshape(20, 3, 10, 10), index_bits=8)])]


@pytest.mark.parametrize("use_huffman", [True, False])
def test_file_round_trip(tmp_path, use_huffman):
    w, codebook, index, layers = sample_layers()
    for _, _, blobs in layers:
        blobs[0].huffman = use_huffman
    path = tmp_path / "m.espz"
    write_model(path, layers)
    assert model_file.is_compressed(path)
    (fc, _, (q, bias)), (conv, _, (c,)) = read_model(path)
    assert np.array_equal(q.dense(), codebook[index]) and np.array_equal(bias, layers[0][2][1])
    assert np.array_equal(c.dense(), w.reshape(20, 3, 10, 10))
    assert (q.symbols == 0).sum() > 0  # filler zeros were needed with 3 index bits
    assert np.diff(np.concatenate([[-1], q.positions])).max() <= 8


def test_file_refuses_corrupt_truncated_and_crafted_input(tmp_path):
    *_, layers = sample_layers()
    path = tmp_path / "m.espz"
    write_model(path, layers)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.espz"

    def refused(blob, match):
        bad.write_bytes(bytes(blob))
        with pytest.raises(ModelFileError, match=match):
            read_model(bad)

    flipped = bytearray(data)
    flipped[100] ^= 0x10
    refused(flipped, "checksum")
    refused(data[:-7], "truncated")
    refused(data[:10], "bad magic|too short")
    refused(b"\x89ESPZ\r\n\x1a" + struct.pack("<HHQI", 9, 0, 0, 0), "version 9")
    # a well-checksummed file that declares a huge layer: refused before anything is allocated
    payload = struct.pack("<I", 1) + struct.pack("<H2s", 2, b"fc") + struct.pack("<H2s", 2, b"IP") + \
        struct.pack("<H", 1) + struct.pack("<BB2I", 1, 2, 1 << 20, 1 << 20) + struct.pack("<BBBI", 5, 4, 3, 10)
    crafted = model_file._HEADER.pack(model_file.MAGIC, 1, 0, len(payload), zlib.crc32(payload)) + payload
    refused(crafted, "exceed the limit")
    payload = payload.replace(struct.pack("<2I", 1 << 20, 1 << 20), struct.pack("<2I", 1000, 1000))
    crafted = model_file._HEADER.pack(model_file.MAGIC, 1, 0, len(payload), zlib.crc32(payload)) + payload
    refused(crafted, "10 entries for shape")  # 10 entries of 3-bit gaps cannot cover 10**6 weights


# *** compressed inference ***
DEPLOY = """
name: "small"
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ipt" type: "InnerProduct" bottom: "ip" top: "ipt"
  inner_product_param { num_output: 5 transpose: true bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
"""


def compressed_deploy(tmp_path, quantize, sparsity=0.6):
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(DEPLOY)
    net = espresso.Net(str(proto), espresso.TEST)
    layers = []
    for name, layer in net.layer_dict.items():
        if not layer.blobs:
            continue
        w = layer.blobs[0].data.copy()
        mask = prune_mask(w, sparsity=sparsity)
        if quantize:
            codebook, index = kmeans_share(w, 5, mask=mask)
            cw = from_weights(w, mask, codebook, index, 5, 4)
        else:
            cw = from_weights(w, mask, index_bits=4)
        layers.append((name, layer.type, [cw] + [b.data.copy() for b in layer.blobs[1:]]))
    path = tmp_path / "m.espz"
    write_model(path, layers)
    return proto, path


@pytest.mark.parametrize("sparsity", [0.6, 0.3])  # 0.3: over half kept, dense code matrices
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_compressed_inference_matches_dense(tmp_path, monkeypatch, quantize, kernels, sparsity):
    if kernels == "numpy":
        monkeypatch.setattr(sparse, "numba", None)
    elif sparse.numba is None:
        pytest.skip("Numba not installed")
    proto, path = compressed_deploy(tmp_path, quantize, sparsity)
    model_file.to_caffemodel(path, tmp_path / "dense.caffemodel")
    dense = espresso.Net(str(proto), str(tmp_path / "dense.caffemodel"), espresso.TEST)
    small = espresso.Net(str(proto), str(path), espresso.TEST)
    assert all(isinstance(small.layer_dict[n], CompressedLayer) for n in ("conv", "ip", "ipt"))
    assert all((small.layer_dict[n].matrix.dense_codes is None) == (sparsity == 0.6) for n in ("conv", "ip", "ipt"))
    x = np.random.default_rng(2).normal(size=(3, 2, 9, 9)).astype(np.float32)
    for _ in range(2):  # the second run reuses the buffers
        want = dense.forward(data=x)["ipt"].copy()
        got = small.forward(data=x)["ipt"]
        assert np.allclose(got, want, atol=1e-5, rtol=1e-5)
    for net in (dense, small):  # one image: the convolution's other column layout
        net.blobs["data"].reshape(1, 2, 9, 9)
        net.reshape()
    assert np.allclose(small.forward(data=x[:1])["ipt"], dense.forward(data=x[:1])["ipt"].copy(), atol=1e-5)
    for name in ("conv", "ip", "ipt"):  # pycaffe's view decodes, read-only
        view = small.params[name][0].data
        assert np.array_equal(view, dense.params[name][0].data) and not view.flags.writeable
    released = [layer.inner.blobs[0].data for layer in small.layers if isinstance(layer, CompressedLayer)]
    assert len(released) == 3 and all(not any(w.strides) for w in released)  # the dense weights hold no memory
    held = sum(layer.nbytes for layer in small.layers if isinstance(layer, CompressedLayer))
    dense_bytes = 4 * sum(dense.params[n][0].data.size for n in ("conv", "ip", "ipt"))
    if quantize or sparsity == 0.6:  # 40% kept: 3 or 6 bytes each, plus pointers; 70% quantized: 1 byte
        assert held < (0.6 if quantize else 0.9) * dense_bytes
    with pytest.raises(NetError, match="inference-only"):
        small.layer_dict["ip"].backward([], [True], [])


def test_train_nets_and_the_dense_switch_get_dense_weights(tmp_path, monkeypatch):
    proto, path = compressed_deploy(tmp_path, True)
    train = espresso.Net(str(proto), str(path), espresso.TRAIN)
    assert not any(isinstance(layer, CompressedLayer) for layer in train.layers)
    monkeypatch.setenv("ESPRESSO_COMPRESSED_DENSE", "1")
    test = espresso.Net(str(proto), str(path), espresso.TEST)
    assert not any(isinstance(layer, CompressedLayer) for layer in test.layers)
    assert np.array_equal(test.params["ip"][0].data, train.params["ip"][0].data)
    assert (train.params["ip"][0].data == 0).mean() > 0.5


def test_shared_weights_switch_a_compressed_layer_to_dense(tmp_path):
    """The solver's test nets share the train net's weights: they must run on those."""
    proto, path = compressed_deploy(tmp_path, False)
    small = espresso.Net(str(proto), str(path), espresso.TEST)
    dense = espresso.Net(str(proto), espresso.TEST)
    small.share_with(dense)
    x = np.random.default_rng(4).normal(size=(3, 2, 9, 9)).astype(np.float32)
    assert np.allclose(small.forward(data=x)["ipt"], dense.forward(data=x)["ipt"].copy(), atol=1e-6)


MLP = """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 3 dim: 30 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 20 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 12 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
  inner_product_param { num_output: 4 bias_term: false transpose: true weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "leaky" type: "ReLU" bottom: "ip3" top: "ip3" relu_param { negative_slope: 0.1 } }
layer { name: "prob" type: "Softmax" bottom: "ip3" top: "prob" }
"""


def mlp_pair(tmp_path, quantize):
    """A dense and a compressed net of MLP with the same weights (`quantize`: which layers)."""
    proto = tmp_path / "mlp.prototxt"
    proto.write_text(MLP)
    net = espresso.Net(str(proto), espresso.TEST)
    layers = []
    for name, layer in net.layer_dict.items():
        if layer.blobs:
            w = layer.blobs[0].data
            mask = prune_mask(w, sparsity=0.6)
            cw = from_weights(w, mask, *kmeans_share(w, 5, mask=mask), 5, 4) if name in quantize else \
                from_weights(w, mask, index_bits=4)
            layers.append((name, layer.type, [cw] + [b.data.copy() for b in layer.blobs[1:]]))
    write_model(tmp_path / "m.espz", layers)
    model_file.to_caffemodel(tmp_path / "m.espz", tmp_path / "d.caffemodel")
    dense = espresso.Net(str(proto), str(tmp_path / "d.caffemodel"), espresso.TEST)
    return dense, espresso.Net(str(proto), str(tmp_path / "m.espz"), espresso.TEST)


def same_blobs(small, dense, names=("ip1", "ip2", "ip3", "prob")):
    return all(np.allclose(small.blobs[n].data, dense.blobs[n].data, atol=1e-5) for n in names)


@pytest.mark.parametrize("quantize", [(), ("ip1", "ip2", "ip3"), ("ip1",)])  # the last: no common kernel
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_fully_connected_layers_and_their_relus_run_fused(tmp_path, monkeypatch, quantize, kernels):
    if kernels == "numpy":
        monkeypatch.setattr(sparse, "numba", None)
    elif sparse.numba is None:
        pytest.skip("Numba not installed")
    dense, small = mlp_pair(tmp_path, quantize)
    run = small.layer_dict["ip1"].run
    assert run is not None and run.layers == small.layers[1:6]  # ip1 .. ip3; the leaky ReLU stays out
    assert type(small.layer_dict["relu1"]).__name__ == "FusedReLU"
    assert type(small.layer_dict["leaky"]).__name__ == "ReLULayer"
    assert (run.bind is not None) == (kernels == "numba" and len(quantize) != 1)
    rng = np.random.default_rng(0)
    for batch in (3, 1, 5):  # a pycaffe user reads the intermediate blobs: each holds the dense value
        x = rng.normal(size=(batch, 30)).astype(np.float32)
        for net in (dense, small):
            net.blobs["data"].reshape(batch, 30)
            net.forward(data=x)
        assert same_blobs(small, dense) and (small.blobs["ip1"].data == 0).any()
    for i in range(len(small.layers)):  # layer by layer, as per-layer timing runs them
        small.run_forward(i, i)
        dense.run_forward(i, i)
    assert same_blobs(small, dense)
    small.forward(end="ip1")  # computes the whole run; ip1 comes back rectified
    assert np.allclose(small.blobs["ip1"].data, np.maximum(dense.blobs["ip1"].data, 0), atol=1e-5)
    for start in ("relu1", "ip2", "relu2"):  # a pass that starts inside the run, after a write
        for net in (dense, small):
            net.blobs["ip1"].data[...] = np.linspace(-1, 1, net.blobs["ip1"].count).reshape(5, 20)
            net.blobs["ip2"].data[...] = np.linspace(1, -1, net.blobs["ip2"].count).reshape(5, 12)
            net.forward(start=start)
        assert same_blobs(small, dense, ("ip2", "ip3", "prob"))
    for net in (dense, small):
        net.forward(start="ip3", end="ip3")
    assert same_blobs(small, dense, ("ip3",))
