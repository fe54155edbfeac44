""".caffemodel reading and writing (espresso.proto.weights) against protobuf's own encoding, large
files, and fuzzing of the binary and text parsers: damaged input raises only our errors."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espresso.errors import EspressoError, ModelFileError, PrototxtError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_net_text
from espresso.proto.upgrade import upgrade_net
from espresso.proto.weights import encode_blob, read_weights, release, write_weights

REPO = Path(__file__).resolve().parents[1]


def bits(array):
    """The array's raw bits, so NaN payloads and -0.0 compare exactly."""
    array = np.asarray(array)
    return array.view({4: np.uint32, 8: np.uint64, 2: np.uint16}[array.dtype.itemsize])


def assert_bit_identical(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


def special_values(shape, dtype, rng):
    """Random values with NaN (odd payloads), +-inf, -0.0 and denormals mixed in."""
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    info = np.finfo(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, info.tiny / 4, -info.tiny / 8, info.max], dtype)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    if flat.size > specials.size:  # a NaN with a non-default payload
        flat.view(bits(flat).dtype)[specials.size] = 0x7FC01234 if dtype == np.float32 else 0x7FF0000000F00BA4
    return a


def proto_layer(name, arrays, **fields):
    """A LayerParameter with its blobs filled by protobuf itself (shape + data / double_data)."""
    layer = caffe_pb2.LayerParameter(name=name, **fields)
    for a in arrays:
        blob = layer.blobs.add()
        blob.shape.dim.extend(a.shape)
        (blob.double_data if a.dtype == np.float64 else blob.data).extend(a.reshape(-1).tolist())
    return layer


def write_bytes(tmp_path, data, name="m.caffemodel"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def without_blobs(net):
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    for layer in list(copy.layer) + list(copy.layers):
        del layer.blobs[:]
    return copy


# *** round trips ***
SHAPES = [(), (0,), (5,), (0, 3), (2, 3, 4, 5), (1, 2, 1, 2, 3), (7, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_bit_identical(tmp_path, rng, dtype):
    arrays = [special_values(shape, dtype, rng) for shape in SHAPES]
    net = caffe_pb2.NetParameter(name="rt")
    net.layer.add(name="a", type="InnerProduct", bottom=["x"], top=["y"]).inner_product_param.num_output = 5
    net.layer.add(name="empty", type="ReLU")
    net.layer.add(name="b", type="Convolution", phase=caffe_pb2.TEST)
    path = tmp_path / "rt.caffemodel"
    write_weights(path, net, [[(a, None) for a in arrays[:4]], [], [(a, None) for a in arrays[4:]]])
    got_net, got_blobs = read_weights(path)
    assert got_net == net
    assert [len(b) for b in got_blobs] == [4, 0, 3]
    for (got, legacy), want in zip(got_blobs[0] + got_blobs[2], arrays, strict=True):
        assert not legacy and not got.flags.writeable
        if want.size == 0:  # an empty field is not written, so nothing says it was double
            assert got.shape == want.shape
            continue
        assert_bit_identical(got, want)


def test_other_dtypes_are_written_as_float32(tmp_path):
    values = np.array([[1.5, -2.25], [3.0, 65504.0]], np.float16)
    net = caffe_pb2.NetParameter(name="h")
    net.layer.add(name="a")
    write_weights(tmp_path / "h.caffemodel", net, [[(values, None), (np.arange(3), None)]])
    (half, _), (ints, _) = read_weights(tmp_path / "h.caffemodel")[1][0]
    assert_bit_identical(half, values.astype(np.float32))
    assert_bit_identical(ints, np.arange(3, dtype=np.float32))


def test_diff_is_written_as_protobuf_reads_it(tmp_path, rng):
    data, diff = rng.standard_normal((2, 2, 3)).astype(np.float32)
    ddata, ddiff = data.astype(np.float64), diff.astype(np.float64) * 3
    net = caffe_pb2.NetParameter(name="d")
    net.layer.add(name="a")
    write_weights(tmp_path / "d.caffemodel", net, [[(data, diff), (ddata, ddiff)]])
    parsed = caffe_pb2.NetParameter.FromString((tmp_path / "d.caffemodel").read_bytes())
    single, double = parsed.layer[0].blobs
    np.testing.assert_array_equal(np.array(single.diff, np.float32), diff.ravel())
    np.testing.assert_array_equal(np.array(double.double_diff), ddiff.ravel())
    assert not single.double_data and not double.data
    got = read_weights(tmp_path / "d.caffemodel")[1][0]
    assert_bit_identical(got[0][0], data)
    assert_bit_identical(got[1][0], ddata)


def test_empty_layer_list(tmp_path):
    net = caffe_pb2.NetParameter(name="nothing", force_backward=True)
    write_weights(tmp_path / "e.caffemodel", net, [])
    got_net, got_blobs = read_weights(tmp_path / "e.caffemodel")
    assert got_net == net and got_blobs == []
    assert caffe_pb2.NetParameter.FromString((tmp_path / "e.caffemodel").read_bytes()) == net


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(ModelFileError, match="empty file"):
        read_weights(write_bytes(tmp_path, b""))


def test_layer_blobs_must_match_layers(tmp_path):
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="a")
    with pytest.raises(ValueError, match="1 layers but 2 blob lists"):
        write_weights(tmp_path / "x.caffemodel", net, [[], []])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_blobs_already_in_the_message_are_kept_first(tmp_path):
    layer = proto_layer("a", [np.ones(2, np.float32)], type="Scale")
    net = caffe_pb2.NetParameter(name="n", layer=[layer])
    write_weights(tmp_path / "k.caffemodel", net, [[(np.full(3, 2.0, np.float32), None)]])
    got = read_weights(tmp_path / "k.caffemodel")[1][0]
    assert [a.tolist() for a, _ in got] == [[1, 1], [2, 2, 2]]


# *** protobuf's encoding ***
def random_net(rng):
    """A NetParameter with blobs, every top-level field set, built through protobuf alone."""
    net = caffe_pb2.NetParameter(name="ref", force_backward=True, debug_info=True, input=["data"])
    net.input_shape.add(dim=[1, 3, 4, 4])
    net.state.phase = caffe_pb2.TEST
    net.state.stage.append("deploy")
    weights = [special_values((4, 3, 2, 2), np.float32, rng), rng.random(4).astype(np.float32)]
    conv = proto_layer("conv", weights, type="Convolution", bottom=["data"], top=["c"], loss_weight=[0.5])
    conv.param.add(lr_mult=1, name="w")
    conv.param.add(lr_mult=2, decay_mult=0)
    conv.convolution_param.num_output = 4
    conv.convolution_param.kernel_size.append(2)
    conv.include.add(phase=caffe_pb2.TEST, stage=["deploy"])
    bn = proto_layer("bn", [rng.random(4), rng.random(4), np.ones(1)], type="BatchNorm", bottom=["c"],
                     top=["c"], propagate_down=[True])
    bn.batch_norm_param.eps = 1e-4
    relu = proto_layer("relu", [], type="ReLU", bottom=["c"], top=["c"])
    scalar = proto_layer("scalar", [np.array(3.5, np.float32)], type="Parameter", top=["s"])
    net.layer.extend([conv, bn, relu, scalar])
    return net


def test_protobuf_written_file_reads_identically(tmp_path, rng):
    net = random_net(rng)
    path = write_bytes(tmp_path, net.SerializeToString())
    got_net, got_blobs = read_weights(path)
    assert got_net == without_blobs(net)
    for layer, arrays in zip(net.layer, got_blobs, strict=True):
        assert len(arrays) == len(layer.blobs)
        for blob, (array, legacy) in zip(layer.blobs, arrays, strict=True):
            assert not legacy and array.shape == tuple(blob.shape.dim)
            want = np.array(blob.double_data) if blob.double_data else np.array(blob.data, np.float32)
            assert_bit_identical(array.reshape(-1), want)


def test_written_file_parses_with_protobuf_to_the_same_content(tmp_path, rng):
    net = random_net(rng)
    arrays = [[(np.asarray(a), None) for a, _ in layer] for layer in read_weights(
        write_bytes(tmp_path, net.SerializeToString(), "ref.caffemodel"))[1]]
    write_weights(tmp_path / "ours.caffemodel", without_blobs(net), arrays)
    ours = (tmp_path / "ours.caffemodel").read_bytes()
    assert caffe_pb2.NetParameter.FromString(ours) == net
    assert ours == net.SerializeToString()  # protobuf's field order, packed runs and all


def test_encode_blob_matches_protobuf(rng):
    for a in (rng.random((2, 3)).astype(np.float32), rng.random(4), np.float32(1.0).reshape(()),
              np.zeros((0, 2), np.float32)):
        blob = caffe_pb2.BlobProto()
        blob.shape.SetInParent()
        blob.shape.dim.extend(a.shape)
        (blob.double_data if a.dtype == np.float64 else blob.data).extend(a.ravel().tolist())
        assert encode_blob(a) == blob.SerializeToString()


def test_legacy_4d_blobs(tmp_path):
    layer = caffe_pb2.LayerParameter(name="old")
    layer.blobs.add(num=2, channels=3, height=1, width=2, data=np.arange(12).tolist())
    layer.blobs.add(num=1, channels=1, height=1, width=3, data=[1, 2, 3]).shape.dim.extend([9])  # legacy wins
    layer.blobs.add(num=3, data=[])  # unset dims are 0, as in Caffe
    net = caffe_pb2.NetParameter(layer=[layer])
    (a, la), (b, lb), (c, lc) = read_weights(write_bytes(tmp_path, net.SerializeToString()))[1][0]
    assert la and lb and lc
    assert a.shape == (2, 3, 1, 2) and a.ravel().tolist() == list(range(12))
    assert b.shape == (1, 1, 1, 3) and c.shape == (3, 0, 0, 0)


def test_double_data_wins_over_data(tmp_path):
    """Caffe's Blob::FromProto reads double_data when it is present."""
    layer = caffe_pb2.LayerParameter(name="d")
    blob = layer.blobs.add(data=[1, 2], double_data=[0.1, 0.2])
    blob.shape.dim.append(2)
    only_double = layer.blobs.add(double_data=[1e300])
    only_double.shape.dim.append(1)
    got = read_weights(write_bytes(tmp_path, caffe_pb2.NetParameter(layer=[layer]).SerializeToString()))[1][0]
    assert got[0][0].dtype == np.float64 and got[0][0].tolist() == [0.1, 0.2]
    assert got[1][0].tolist() == [1e300]


def test_blob_without_shape_is_a_scalar(tmp_path):
    """No shape and no legacy dims: Caffe reshapes to () and expects one value."""
    layer = caffe_pb2.LayerParameter(name="s")
    layer.blobs.add(data=[4.0])
    data = caffe_pb2.NetParameter(layer=[layer]).SerializeToString()
    (a, legacy), = read_weights(write_bytes(tmp_path, data))[1][0]
    assert a.shape == () and float(a) == 4.0 and not legacy


def test_v1_layers_in_a_weights_file(tmp_path, rng):
    w, b = rng.random((3, 2)).astype(np.float32), rng.random(3).astype(np.float32)
    net = caffe_pb2.NetParameter(name="v1", input=["data"])
    ip = net.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT, bottom=["data"], top=["ip"],
                        blobs_lr=[1, 2])
    for a in (w, b):
        ip.blobs.add(num=1, channels=1, height=a.shape[0], width=a.size // len(a), data=a.ravel().tolist())
    net.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU, bottom=["ip"], top=["ip"])
    got_net, got_blobs = read_weights(write_bytes(tmp_path, net.SerializeToString()))
    assert got_net == without_blobs(net)
    assert [[a.shape for a, _ in arrays] for arrays in got_blobs] == [[(1, 1, 3, 2), (1, 1, 3, 1)], []]
    assert all(legacy for legacy in (x for _, x in got_blobs[0]))
    # upgrading carries the arrays along with their layers; `input` alone is dropped
    upgrade_net(got_net, got_blobs)
    assert [(layer.name, layer.type) for layer in got_net.layer] == [("ip", "InnerProduct"), ("relu", "ReLU")]
    assert [s.lr_mult for s in got_net.layer[0].param] == [1, 2]
    np.testing.assert_array_equal(got_blobs[0][0][0].reshape(3, 2), w)
    assert got_blobs[1] == []


def test_v0_layers_in_a_weights_file(tmp_path):
    """Very old files: blobs sit in the V0 layer inside each V1 entry; they come back as that entry's."""
    net = caffe_pb2.NetParameter(name="v0", input=["data"], input_dim=[1, 1, 4, 4])
    pad = net.layers.add(bottom=["data"], top=["pad"])
    pad.layer.name, pad.layer.type, pad.layer.pad = "pad", "padding", 1
    conv = net.layers.add(bottom=["pad"], top=["conv"])
    conv.layer.name, conv.layer.type, conv.layer.num_output, conv.layer.kernelsize = "conv", "conv", 2, 3
    conv.layer.blobs.add(num=2, channels=1, height=3, width=3, data=np.arange(18).tolist())
    conv.layer.blobs.add(num=1, channels=1, height=1, width=2, data=[7, 8])
    got_net, got_blobs = read_weights(write_bytes(tmp_path, net.SerializeToString()))
    assert got_net == without_v0_blobs(net)
    assert [[a.shape for a, _ in arrays] for arrays in got_blobs] == [[], [(2, 1, 3, 3), (1, 1, 1, 2)]]
    upgrade_net(got_net, got_blobs)
    assert [(x.name, x.type) for x in got_net.layer] == [("input", "Input"), ("conv", "Convolution")]
    assert got_blobs[0] is None and got_blobs[1][1][0].ravel().tolist() == [7, 8]
    assert list(got_net.layer[1].convolution_param.pad) == [1] and list(got_net.layer[1].bottom) == ["data"]


def without_v0_blobs(net):
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    for entry in copy.layers:
        del entry.layer.blobs[:]
    return copy


def test_layer_and_layers_blobs_are_listed_layer_first(tmp_path):
    net = caffe_pb2.NetParameter()
    net.layers.add(name="old").blobs.add(data=[1]).shape.dim.append(1)
    net.layer.append(proto_layer("new", [np.array([2.0], np.float32)]))
    got_net, got_blobs = read_weights(write_bytes(tmp_path, net.SerializeToString()))
    assert [layer.name for layer in list(got_net.layer) + list(got_net.layers)] == ["new", "old"]
    assert [arrays[0][0].tolist() for arrays in got_blobs] == [[2.0], [1.0]]


# *** hand-made wire forms protobuf accepts ***
def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def one_blob_file(tmp_path, blob_bytes):
    return write_bytes(tmp_path, field(100, field(1, b"L") + field(7, blob_bytes)))


def test_packed_data_in_pieces_and_unpacked_values(tmp_path):
    shape = field(7, field(1, varint(3)))
    pieces = field(5, np.array([1, 2], "<f4").tobytes()) + field(5, np.array([3], "<f4").tobytes()) + shape
    unpacked = b"".join(varint(5 << 3 | 5) + np.float32(v).tobytes() for v in (4, 5, 6)) + shape
    for blob_bytes, want in ((pieces, [1, 2, 3]), (unpacked, [4, 5, 6])):
        assert caffe_pb2.BlobProto.FromString(blob_bytes).data == want  # what protobuf makes of it
        (array, _), = read_weights(one_blob_file(tmp_path, blob_bytes))[1][0]
        assert array.tolist() == want


@pytest.mark.parametrize("blob_bytes, message", [
    (field(5, np.ones(3, "<f4").tobytes()) + field(7, field(1, varint(2))), r"shape \(2,\) holds 3 values"),
    (field(5, b"\0" * 6) + field(7, field(1, varint(2))), "not a whole number of values"),
    (field(7, field(1, varint(2**64 - 2))), r"negative dimension in \(-2,\)"),
    (field(7, field(1, varint(2**40) + varint(2**40))), "holds 0 values"),
])
def test_bad_blobs_are_model_file_errors(tmp_path, blob_bytes, message):
    with pytest.raises(ModelFileError, match=message):
        read_weights(one_blob_file(tmp_path, blob_bytes))


def test_unreadable_paths(tmp_path):
    with pytest.raises(ModelFileError, match="cannot read"):
        read_weights(tmp_path / "missing.caffemodel")
    with pytest.raises(ModelFileError, match=r"not a regular file \(a folder\)"):
        read_weights(tmp_path)


def test_truncated_file_names_the_path(tmp_path, rng):
    data = random_net(rng).SerializeToString()
    with pytest.raises(ModelFileError, match=r"cut\.caffemodel: truncated or corrupt"):
        read_weights(write_bytes(tmp_path, data[:-3], "cut.caffemodel"))


# *** large files ***
def big_net(tmp_path, shapes):
    net = caffe_pb2.NetParameter(name="big")
    arrays = []
    for i, shape in enumerate(shapes):
        net.layer.add(name=f"fc{i}", type="InnerProduct")
        a = np.empty(shape, np.float32)
        a.reshape(-1)[:] = np.arange(a.size, dtype=np.float32) % 4093 - 2046.5
        arrays.append([(a, None)])
    path = tmp_path / "big.caffemodel"
    write_weights(path, net, arrays)
    return path, arrays


def test_file_over_protobufs_64mb_limit(tmp_path):
    path, arrays = big_net(tmp_path, [(4096, 4608), (10,)])  # 72 MiB in one blob
    assert path.stat().st_size > 70 * 2**20
    net, blobs = read_weights(path)
    assert [layer.name for layer in net.layer] == ["fc0", "fc1"]
    for (got, _), ((want, _),) in zip((b[0] for b in blobs), arrays, strict=True):
        assert_bit_identical(got, want)


_PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np

    sys.path.insert(0, sys.argv[1])
    from espresso.proto import caffe_pb2
    from espresso.proto.weights import read_weights, release, write_weights

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    mode, path = sys.argv[2], sys.argv[3]
    shapes = [(4096, 25088), (4096, 12000), (1000,)]  # ~607 MB of float32
    base = peak()
    if mode == "write":
        net = caffe_pb2.NetParameter(name="big")
        blobs = []
        for i, shape in enumerate(shapes):
            net.layer.add(name=f"fc{i}", type="InnerProduct")
            blobs.append([(np.full(shape, i + 0.5, np.float32), None)])
        write_weights(path, net, blobs)
        total = sum(b[0][0].sum(dtype=np.float64) for b in blobs)
    elif mode == "read":
        net, blobs = read_weights(path)
        total = sum(b[0][0].sum(dtype=np.float64) for b in blobs)  # touches every page
    else:  # "load": copy into arrays of our own, as a net does, releasing the file's pages
        net, blobs = read_weights(path)
        kept = []
        for (array, _), in blobs:
            dest, src = np.empty(array.size, np.float32), array.reshape(-1)
            for i in range(0, src.size, 1 << 23):  # 32 MB at a time
                dest[i:i + (1 << 23)] = src[i:i + (1 << 23)]
                release([src[i:i + (1 << 23)]])
            kept.append(dest)
        total = sum(dest.sum(dtype=np.float64) for dest in kept)
    print(peak() - base, total)
""")


@pytest.mark.slow
def test_600mb_file_loads_within_1_5x_its_size(tmp_path):
    """Peak memory (VmHWM) of writing, reading and loading, each in a fresh process; protobuf's
    own parser needs 2x here, copying without `release` 2x as well."""
    path = tmp_path / "huge.caffemodel"
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)

    def run(mode):
        out = subprocess.run([sys.executable, str(script), str(REPO), mode, str(path)], check=True,
                             capture_output=True, text=True, timeout=600).stdout.split()
        return int(out[0]), float(out[1])

    write_growth, write_total = run("write")
    size = path.stat().st_size
    assert size > 600 * 10**6
    assert write_growth < 1.5 * size, f"writing grew the peak by {write_growth / size:.2f}x the weights"
    for mode in ("read", "load"):
        growth, total = run(mode)
        assert total == write_total
        assert growth < 1.5 * size, f"{mode} grew the peak by {growth / size:.2f}x the weights"


# *** fuzzing: damaged input raises only our errors ***
# ESPRESSO_FUZZ_EXAMPLES=5000 for a long local run; the deadline turns a hang into a failure.
FUZZ = settings(max_examples=int(os.environ.get("ESPRESSO_FUZZ_EXAMPLES", 150)), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow])


def _valid_model():
    rng = np.random.default_rng(7)
    net = random_net(rng)
    net.layers.add(name="v1", type=caffe_pb2.V1LayerParameter.RELU).blobs.add(num=1, channels=1, height=1,
                                                                                width=2, data=[1, 2])
    v0 = net.layers.add(bottom=["data"], top=["x"])
    v0.layer.name, v0.layer.type = "v0", "conv"
    v0.layer.blobs.add(data=[1, 2]).shape.dim.append(2)
    return net.SerializeToString()


VALID_MODEL = _valid_model()
_FUZZ_DIR = tempfile.mkdtemp(prefix="espresso-fuzz-")  # hypothesis reruns cannot use function fixtures
atexit.register(shutil.rmtree, _FUZZ_DIR, True)


def read_damaged(data):
    """read_weights on `data`: a ModelFileError or a result; and then upgrading the result
    raises nothing but Espresso's errors either."""
    path = os.path.join(_FUZZ_DIR, "fuzz.caffemodel")
    with open(path, "wb") as f:
        f.write(data)
    try:
        net, blobs = read_weights(path)
    except ModelFileError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # V0 fields without meaning
        try:
            upgrade_net(net, blobs)
        except EspressoError:
            pass


def test_valid_fuzz_seed_reads():
    net, blobs = read_weights(write_bytes(Path(_FUZZ_DIR), VALID_MODEL, "seed.caffemodel"))
    assert len(blobs) == 6 and [len(b) for b in blobs] == [2, 3, 0, 1, 1, 1]


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_model_file_error(data):
    read_damaged(data)


@FUZZ
@given(st.integers(0, len(VALID_MODEL) - 1))
def test_truncated_model_raises_only_model_file_error(cut):
    read_damaged(VALID_MODEL[:cut])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_MODEL) - 1), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flipped_model_raises_only_model_file_error(flips):
    data = bytearray(VALID_MODEL)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    read_damaged(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID_MODEL)), st.binary(min_size=1, max_size=12))
def test_spliced_bytes_raise_only_model_file_error(pos, junk):
    read_damaged(VALID_MODEL[:pos] + junk + VALID_MODEL[pos:])


VALID_TEXT = """name: "fuzz"  # a comment
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } }
  include { phase: TEST }
}
layers { name: "old" type: RELU bottom: "conv" top: "conv" blobs_lr: 1.5 }
layer < name: 'pool' type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE } >
"""
PROTOTXT_CHARS = st.sampled_from(list('{}<>:"\'#\n\t -.0123456789eExyz_\\') + ["layer", "name", "param"])


def parse_damaged(text):
    try:
        parse_text(text, caffe_pb2.NetParameter(), "fuzz.prototxt")
    except PrototxtError as e:
        assert "fuzz.prototxt:" in str(e)


def read_text_damaged(text):
    path = os.path.join(_FUZZ_DIR, "fuzz.prototxt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        net, lines = read_net_text(path)
    except PrototxtError:
        return
    assert all(isinstance(line, int) for line in lines)


def test_valid_text_seed_parses():
    net = parse_text(VALID_TEXT, caffe_pb2.NetParameter())
    assert [layer.name for layer in net.layer] == ["conv", "pool"] and net.layers[0].name == "old"


@FUZZ
@given(st.text(max_size=120))
def test_random_text_raises_only_prototxt_error(text):
    parse_damaged(text)
    read_text_damaged(text)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_TEXT)), st.integers(0, 3), PROTOTXT_CHARS),
                min_size=1, max_size=5))
def test_mutated_prototxt_raises_only_prototxt_error(edits):
    text = VALID_TEXT
    for pos, drop, insert in edits:
        pos = min(pos, len(text))
        text = text[:pos] + insert + text[pos + drop:]
    parse_damaged(text)
    read_text_damaged(text)


def test_release_keeps_arrays_valid(tmp_path):
    path, arrays = big_net(tmp_path, [(1024, 300), (5,)])
    net, blobs = read_weights(path)
    release(blobs[0])  # (array, legacy) pairs
    release([blobs[1][0][0][:2], np.ones(3)])  # a slice, and an array that is not a view of the map
    for (got, _), ((want, _),) in zip((b[0] for b in blobs), arrays, strict=True):
        assert_bit_identical(got, want)  # the pages come back from the file


def test_a_field_given_twice_is_an_error_as_in_caffe():
    """Caffe parses with TextFormat::Parse, which refuses a non-repeated field given twice."""
    with pytest.raises(PrototxtError, match=r"n\.prototxt:2:\d+: .*multiple \"name\""):
        parse_text('layer {\n  name: "a" type: "ReLU" name: "b" }', caffe_pb2.NetParameter(), "n.prototxt")
    with pytest.raises(PrototxtError, match="multiple \"state\""):
        parse_text("state { phase: TEST } state { level: 2 }", caffe_pb2.NetParameter())
    assert len(parse_text('layer { name: "a" } layer { name: "b" }', caffe_pb2.NetParameter()).layer) == 2


@pytest.mark.parametrize("escape", ["\\{", "\\8", "\\q"])
def test_bad_escape_in_a_string_is_a_prototxt_error(escape):
    """C++ protobuf refuses an unknown escape; Python's would keep the backslash with a warning."""
    with pytest.raises(PrototxtError, match=rf"e\.prototxt:3: invalid escape sequence '\{escape}'"):
        parse_text(f'name: "n"\n# "{escape}" in a comment is fine\nlayer {{ name: "a{escape}" }}',
                   caffe_pb2.NetParameter(), "e.prototxt")
    good = parse_text(r'name: "\x41\101\n\"\\" layer { name: "\u00e9" }', caffe_pb2.NetParameter())
    assert good.name == 'AA\n"\\' and good.layer[0].name == "é"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    """Everything goes through one atomic write (temporary + rename): the file ends with the
    umask's mode, as Caffe's files, not the temporary's 0600."""
    from espresso.compress.model_file import write_model
    from espresso.proto.text import write_binary

    old = os.umask(umask)
    try:
        write_weights(tmp_path / "w.caffemodel", caffe_pb2.NetParameter(name="n"), [])
        write_binary(tmp_path / "mean.binaryproto", caffe_pb2.BlobProto())
        write_model(tmp_path / "m.espz", [("fc", "InnerProduct", [np.ones((2, 2), np.float32)])])
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        dict.fromkeys(["w.caffemodel", "mean.binaryproto", "m.espz"], oct(mode))


def test_a_text_file_given_as_weights_says_so(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "LeNet"\nlayer { name: "data" type: "Input" top: "data" }\n')
    with pytest.raises(ModelFileError, match="net.prototxt: looks like text \\(a prototxt\\?\\), not a binary"):
        read_weights(path)


# *** every reader bounded and typed ***
def _blobproto(**fields):
    blob = caffe_pb2.BlobProto()
    for name, value in fields.items():
        if name == "dims":
            blob.shape.dim.extend(value)
        elif isinstance(value, list):
            getattr(blob, name).extend(value)
        else:
            setattr(blob, name, value)
    return blob


@pytest.mark.parametrize("fields, message", [
    (dict(dims=[2, 3], data=[1.0] * 5), r"5 values for shape \(2, 3\)"),
    (dict(num=1, channels=1, height=-2, width=3, data=[1.0] * 6), "negative dimension"),
    (dict(dims=[2], data=[1.0, 2.0], double_data=[1.0, 2.0]), "holds both float and double data"),
])
def test_a_malformed_binaryproto_is_refused(tmp_path, fields, message):
    from espresso.io import ArrayShapeError, blobproto_to_array, read_blobproto
    from espresso.proto.text import write_binary

    blob = _blobproto(**fields)
    write_binary(tmp_path / "mean.binaryproto", blob)
    with pytest.raises(ModelFileError, match=f"mean.binaryproto: {message}"):
        read_blobproto(tmp_path / "mean.binaryproto")
    with pytest.raises(ArrayShapeError, match=message):  # pycaffe's ValueError
        blobproto_to_array(blob)


def test_a_solverstate_with_a_negative_iter_or_a_binary_name_is_refused(tmp_path):
    from espresso.solver.state import read_state

    path = tmp_path / "s.solverstate"
    path.write_bytes(caffe_pb2.SolverState(iter=-5, learned_net="x.caffemodel").SerializeToString())
    with pytest.raises(ModelFileError, match="iter -5 and current_step 0 must not be negative"):
        read_state(path)
    path.write_bytes(b"\x08\x05\x12\x02\xff\xfe")  # iter 5, learned_net b"\xff\xfe"
    with pytest.raises(ModelFileError, match="learned_net is not UTF-8 text"):
        read_state(path)


def test_a_compressed_model_declaring_an_endless_payload_is_refused(tmp_path):
    from espresso.compress import model_file

    path = tmp_path / "m.espz"
    path.write_bytes(model_file._HEADER.pack(model_file.MAGIC, model_file.VERSION, 0, 2**64 - 1, 0) + b"\0" * 10)
    with pytest.raises(ModelFileError, match="truncated or padded: the header declares 18446744073709551615"):
        model_file.read_model(path)


def _open_hdf5(path):
    pytest.importorskip("h5py")
    from espresso import hdf5

    with hdf5.open_file(path):
        pass


@pytest.mark.parametrize("read", ["weights", "solverstate", "espz", "binaryproto", "prototxt", "hdf5", "idx"])
def test_an_endless_device_is_refused_by_every_reader(read):
    """/dev/zero has no end: every reader refuses what is not a regular file before reading."""
    import espresso
    from espresso.compress.model_file import read_model
    from espresso.data import DatasetError
    from espresso.data.idx import read_idx
    from espresso.io import read_blobproto
    from espresso.solver.state import read_state

    readers = {"weights": read_weights, "solverstate": read_state, "espz": read_model, "binaryproto": read_blobproto,
               "prototxt": lambda p: espresso.Net(p, espresso.TEST), "idx": read_idx,
               "hdf5": _open_hdf5}
    with pytest.raises((ModelFileError, DatasetError), match="/dev/zero: not a regular file"):
        readers[read]("/dev/zero")


def test_a_large_blob_is_copied_in_row_blocks_whose_file_pages_are_released(tmp_path, monkeypatch, rng):
    """The loader copies a blob over COPY_BYTES in row blocks (releasing each block's mapped
    pages): the values are those of one copy, rows of any size and a last partial block alike."""
    import espresso
    import espresso.net.files as files

    text = """layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 7 } } }
              layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 37 } }"""
    param = parse_text(text, caffe_pb2.NetParameter())
    net = espresso.Net(param, espresso.TEST)
    net.params["ip"][0].data[...] = rng.standard_normal((37, 7))
    net.params["ip"][1].data[...] = rng.standard_normal(37)
    net.save(str(tmp_path / "w.caffemodel"))
    monkeypatch.setattr(files, "COPY_BYTES", 100)  # 3 rows of 7 float32 a block
    loaded = espresso.Net(param, espresso.TEST, weights=str(tmp_path / "w.caffemodel"))
    for mine, theirs in zip(loaded.params["ip"], net.params["ip"]):
        np.testing.assert_array_equal(mine.data, theirs.data)
