"""16-bit float deployment: the rounding to float16 and bfloat16, the model file's 16-bit blobs,
`espresso compress --fp16/--bf16`, and (on a GPU) the HalfLayer against float32 arithmetic on
the same 16-bit values."""

import json

import numpy as np
import pytest
from devices import gpu_test
from test_int8 import NET, _example, _net

import espresso
from espresso.compress.half import from_bits, to_bits
from espresso.compress.model_file import HalfFloats, read_model, write_model
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text


def test_rounding_to_16_bits_is_to_nearest_even(rng):
    values = rng.standard_normal(10000).astype(np.float32) * 100
    np.testing.assert_array_equal(from_bits(to_bits(values, "float16"), "float16"),
                                  values.astype(np.float16).astype(np.float32))
    bf16 = from_bits(to_bits(values, "bfloat16"), "bfloat16")
    assert np.all(np.abs(bf16 - values) <= np.abs(values) * 2.0 ** -8)  # half an ulp of 7 fraction bits
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)  # exactly between two
    np.testing.assert_array_equal(from_bits(to_bits(ties, "bfloat16"), "bfloat16"), [1, 1 + 2 ** -6, -1])
    nan = np.array([np.nan, -np.nan, np.float32(np.uint32(0x7F800001).view(np.float32))], np.float32)
    assert np.all(np.isnan(from_bits(to_bits(nan, "bfloat16"), "bfloat16")))  # not rounded into an infinity
    with pytest.raises(EspressoError, match="float16 or bfloat16"):
        to_bits(values, "float8")


def test_16_bit_blobs_round_trip(tmp_path, rng):
    values = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    layers = [("c", "Convolution", [HalfFloats(to_bits(values, kind), kind)]) for kind in ("float16", "bfloat16")]
    write_model(tmp_path / "h.espz", [(f"{name}{k}", t, b) for k, (name, t, b) in enumerate(layers)])
    for (_, _, (read,)), (_, _, (wrote,)) in zip(read_model(tmp_path / "h.espz"), layers):
        assert read.kind == wrote.kind and np.array_equal(read.bits, wrote.bits)
        np.testing.assert_allclose(read.dense(), values, rtol=2.0 ** -7)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_compress_16_bit_halves_the_weights_and_keeps_the_accuracy(tmp_path, kind):
    common = _example(tmp_path, "lenet", "lenet")
    out = str(tmp_path / "h.espz")
    assert espresso.cli.main(common + [f"--{kind}", "--output", out]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert 1.9 < report["ratio"] < 2 and abs(report["accuracy_after"] - report["accuracy_before"]) <= 0.01
    assert {type(blobs[0]).__name__ for _, _, blobs in read_model(out)} == {"HalfFloats"}
    assert espresso.cli.main(common + [f"--{kind}", "--int8", "--output", out]) == 1  # one precision


@gpu_test
@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_half_layers_on_the_gpu_compute_in_float32_from_16_bit_operands(tmp_path, kind, rng):
    net = _net()
    records = [(name, layer.type, [HalfFloats(to_bits(layer.blobs[0].data, kind), kind),
                                   np.array(layer.blobs[1].data)]) for name, layer in net.layer_dict.items()
               if layer.blobs]
    write_model(tmp_path / "h.espz", records)
    x = rng.standard_normal((3, 2, 9, 8)).astype(np.float32)
    reference = _net()  # float32 arithmetic on the 16-bit weights and inputs
    for name, _, (weights, bias) in records:
        reference.params[name][0].data[...] = weights.dense()
        reference.params[name][1].data[...] = bias
    rounded = lambda a: from_bits(to_bits(a, kind), kind)  # noqa: E731
    reference.blobs["data"].data[...] = rounded(x)
    reference.forward(end="conv")
    conv = rounded(reference.blobs["conv"].data - reference.params["conv"][1].data[:, None, None])
    conv += reference.params["conv"][1].data[:, None, None]  # cuDNN writes the 16-bit type, the bias comes after
    espresso.set_mode_gpu()
    try:
        half = espresso.Net(parse_text(NET, caffe_pb2.NetParameter()), espresso.TEST, weights=str(tmp_path / "h.espz"))
        assert [type(layer).__name__ for layer in half.engine_layers].count("HalfLayer") == 2
        half.forward(data=x)
        got_conv, got_ip = (np.array(half.blobs[name].data) for name in ("conv", "ip"))
    finally:
        espresso.set_mode_cpu()
    ulp = 2.0 ** (-10 if kind == "float16" else -7)  # of the 16-bit type at 1: a rounding may flip one
    np.testing.assert_allclose(got_conv, np.maximum(conv, 0), atol=np.abs(conv).max() * ulp)  # the ReLU in place
    reference.blobs["conv"].data[...] = rounded(got_conv)
    reference.forward(start="ip", end="ip")
    np.testing.assert_allclose(got_ip, reference.blobs["ip"].data, rtol=1e-4, atol=1e-4 * np.abs(got_ip).max())
