"""The three stages run in order on a trained model, retraining with a given solver, and the
per-layer report (the paper's Tables 2 and 3) with accuracy before and after each stage.

Specs name layers, `*` standing for every compressible (InnerProduct / Convolution) layer:
  prune: {"*": 0.9, "ip3": 0.75} target fractions pruned, or "q1.5" for quality 1.5 x std;
  bits:  {"*": 5} weight bits, or "paper" for the paper's 8 (conv) / 5 (fully connected).
Pruning runs `prune_steps` rounds: round t of T prunes to sparsity 1 - (1 - s)**(t/T) (or
quality q*t/T) and retrains `retrain_iters` iterations; quantization then fine-tunes the
centroids `quant_iters` iterations.  The solver's iteration count and learning-rate policy
continue across the rounds.
"""

import dataclasses
import logging
import os

import numpy as np

import espresso
from espresso.compress import model_file
from espresso.compress.model_file import from_weights, write_model
from espresso.compress.prune import Masks, compressible_layers, prune_mask
from espresso.compress.quantize import SharedWeights, kmeans_share
from espresso.errors import EspressoError

log = logging.getLogger("espresso")
PAPER_BITS = {"Convolution": 8, "InnerProduct": 5}  # weight bits; also the relative-index bits


def paper_recipe(layers):
    """The paper's recipe where none is given: its 8 / 5 weight bits, and pruning at its rates
    for LeNet-300-100, LeNet-5 and AlexNet (Tables 1, 4, 5): the first convolution keeps about
    65%, later ones 35%, fully connected layers 8%, the last (the classifier) 25%."""
    names = list(layers)
    prune = {}
    for name, layer in layers.items():
        if layer.type == "Convolution":
            prune[name] = 0.35 if name == names[0] else 0.65
        else:
            prune[name] = 0.75 if name == names[-1] else 0.92
    return prune, "paper"


def parse_spec(text, what):
    """'*=0.9,ip3=q1.2' -> {'*': 0.9, 'ip3': 'q1.2'}; a bare value means '*'."""
    if isinstance(text, dict) or text is None:
        return text
    spec = {}
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        name, _, value = item.rpartition("=")
        spec[name or "*"] = value if value.startswith("q") or value == "paper" else _number(value, what)
    return spec


def _number(value, what):
    try:
        return float(value)
    except ValueError:
        raise EspressoError(f"--{what}: cannot read '{value}' (give name=value, comma-separated)") from None


def _per_layer(spec, layers, what):
    if not spec:
        return {}
    unknown = set(spec) - set(layers) - {"*"}
    if unknown:
        raise EspressoError(f"--{what}: no compressible layer named {', '.join(sorted(unknown))} "
                            f"(compressible: {', '.join(layers)})")
    out = {name: spec.get(name, spec.get("*")) for name in layers}
    return {name: v for name, v in out.items() if v is not None}


def _check_prune(name, value):
    """A fraction to prune in [0, 1), or 'q' and a positive quality (times the weights' std)."""
    if isinstance(value, str):
        if _number(value[1:], "prune") <= 0:
            raise EspressoError(f"--prune: layer '{name}': the quality after 'q' must be positive, got {value}")
    elif not 0 <= value < 1:
        raise EspressoError(f"--prune: layer '{name}': the fraction pruned must be in [0, 1), got {value:g}")


def _bits(value, layer):
    if value == "paper":
        return PAPER_BITS[layer.type]
    bits = int(value)
    if not 1 <= bits <= 8 or bits != value:
        raise EspressoError(f"--bits: layer '{layer.name}': bits must be an integer in 1..8, got {value}")
    return bits


class Compressor:
    """Runs the stages on a solver's train net (see the module docstring)."""

    def __init__(self, solver, weights, model=None):
        param = espresso.solver.read_solver_param(solver) if not hasattr(solver, "test_iter") else solver
        del param.weights[:]
        param.snapshot, param.snapshot_after_train = 0, False
        self.solver = espresso.get_solver(param)
        self.net = self.solver.net
        if weights:
            self.net.copy_from(weights)
        self.model, self.test_iter = model, param.test_iter[0] if param.test_iter else 0
        self.layers = compressible_layers(self.net)
        self.original = {n: np.array(layer.blobs[0].host_data()) for n, layer in self.layers.items()}
        self.masks, self.shared = Masks(self.net), None
        self.bits, self.accuracy, self.int8_ranges = {}, {}, {}

    def weights(self, name):
        return np.array(self.layers[name].blobs[0].host_data())

    def evaluate(self, stage):
        if not self.solver.test_nets:
            return None
        scores = self.solver.test(0)
        key = next((k for k in scores if "acc" in k), next(iter(scores)))
        self.accuracy[stage] = float(np.mean(scores[key]))
        log.info("Deep Compression: accuracy %s = %.4f", stage, self.accuracy[stage])
        return self.accuracy[stage]

    def prune(self, spec, steps=3, retrain_iters=1000):
        targets = _per_layer(parse_spec(spec, "prune"), self.layers, "prune")
        if not targets:
            return
        for name, value in targets.items():
            _check_prune(name, value)
        self.masks.attach(self.solver)
        for t in range(1, steps + 1):
            for name, value in targets.items():
                w = self.weights(name)
                if isinstance(value, str):
                    mask = prune_mask(w, quality=float(value[1:]) * t / steps, mask=self.masks.kept(name))
                else:
                    mask = prune_mask(w, sparsity=1 - (1 - value) ** (t / steps), mask=self.masks.kept(name))
                self.masks.set(name, mask)
            log.info("Deep Compression: pruning round %d/%d: kept %s", t, steps, ", ".join(
                f"{n} {self.masks.kept(n).mean():.1%}" for n in targets))
            self.solver.step(retrain_iters)
        self.evaluate("pruned")

    def quantize(self, spec, init="linear", iters=1000, centroid_grad="mean"):
        targets = _per_layer(parse_spec(spec, "bits"), self.layers, "bits")
        if not targets:
            return
        self.shared = SharedWeights(self.net, centroid_grad)
        for name, value in targets.items():
            self.bits[name] = _bits(value, self.layers[name])
            w = self.weights(name)
            if self.masks.kept(name) is None and (w == 0).mean() > 0.5:  # pruned before (an earlier run)
                self.masks.set(name, w != 0)
            codebook, index = kmeans_share(self.weights(name), self.bits[name], init, mask=self.masks.kept(name))
            self.shared.set(name, codebook, index)
        self.evaluate("quantized")
        if iters:
            self.shared.attach(self.solver)
            self.solver.step(iters)
            self.evaluate("quantized_finetuned")

    def int8_calibration(self, iterations=10, keep_float=(), inputs=None):
        """Checks the int8 options now; returns records -> int8 records, calibrated then on the
        weights of that time with `inputs` (samples for the deploy net `self.model`) or
        `iterations` batches of the solver's test net."""
        from espresso.compress.int8 import _input_batches, calibrate, int8_layers, int8_records

        names = int8_layers(self.net, keep_float)
        if inputs is not None:
            net = espresso.Net(self.model, espresso.TEST)
            net.share_with(self.net)
            _input_batches(net, inputs)
        elif self.solver.test_nets and iterations > 0:
            net = self.solver.test_nets[0]
        else:
            raise EspressoError("--int8 calibrates on the solver's test net: give --calibration-iters N > 0 and a "
                                "solver with a test net (or calibration inputs)")

        def calibrated(records):
            self.int8_ranges = calibrate(net, names, iterations, inputs)
            log.info("int8: input ranges %s", ", ".join(f"{n} [{lo:.3g}, {hi:.3g}]"
                                                        for n, (lo, hi) in self.int8_ranges.items()))
            return int8_records(self.net, self.int8_ranges, records)

        return calibrated

    def records(self, huffman=True, index_bits=None):
        """What write_model writes: compressed weights for pruned/quantized layers, raw else."""
        records = []
        for name, layer in self.net.layer_dict.items():
            if not layer.blobs:
                continue
            blobs = [np.array(b.host_data(), np.float32) for b in layer.blobs]
            if name in self.masks.layers or name in self.bits:
                blobs[0] = self._compressed(name, layer, huffman, index_bits)
            records.append((name, layer.type, blobs))
        return records

    def _compressed(self, name, layer, huffman, index_bits):
        mask = self.masks.kept(name)
        ib = 0 if mask is None else int((index_bits or {}).get(name, PAPER_BITS[layer.type]))
        if name in self.bits:
            cw = from_weights(self.weights(name), mask, self.shared.codebook(name), self.shared.index(name),
                              self.bits[name], ib, huffman)
        else:
            cw = from_weights(self.weights(name), mask, index_bits=ib, huffman=huffman)
        fixed = dataclasses.replace(cw, huffman=False)  # tiny layers: the code tables can cost more
        return fixed if huffman and sum(stream_sizes(fixed)) < sum(stream_sizes(cw)) else cw


def compress(model, weights, solver, prune=None, bits=None, output="model.espz", huffman=True, init="linear",
             prune_steps=3, retrain_iters=1000, quant_iters=1000, index_bits=None, report=None, plot=None,
             centroid_grad="mean", int8=None):
    """Run the stages given (each alone or together), write the compressed model to `output`
    and return the report dict (also written as JSON to `report`, with a PNG to `plot`).
    int8: {"iterations": calibration batches, "keep_float": layer names, "inputs": samples}
    makes the written layers int8 (espresso/compress/int8.py), calibrated on the final weights."""
    c = Compressor(solver, weights, model)
    if prune is None and bits is None and int8 is None:
        prune, bits = paper_recipe(c.layers)
        log.info("Deep Compression: no stages given: the paper's recipe, --prune %s --bits paper",
                 ",".join(f"{n}={v}" for n, v in prune.items()))
    calibration = c.int8_calibration(**int8) if int8 is not None else None  # its errors before any work
    c.evaluate("original")
    c.prune(prune, prune_steps, retrain_iters)
    c.quantize(bits, init, quant_iters, centroid_grad)
    records = c.records(huffman, parse_spec(index_bits, "index-bits"))
    if calibration is not None:
        records = calibration(records)
    write_model(output, records)
    from espresso.compress.report import make_report, plot_distributions, write_report

    result = make_report(c, records, output, model)
    if calibration is not None:
        from espresso.compress.int8 import input_format

        result["stages"] = [{"stage": "int8", "layer": name, "input_range": list(limits),
                             "input_scale_zero": list(input_format(*limits))}
                            for name, limits in c.int8_ranges.items()]
    if report:
        write_report(result, report)
    if plot:
        plot_distributions(c, plot)
    return result


def retrain_rewritten(model, weights, solver, rewrite, stage, iterations, output, output_model=None,
                      keep_weights=True):
    """The solver's net rewritten by rewrite(net_param, trained net) -> (new NetParameter,
    {new layer: [arrays]}), its other layers keeping `weights` (by name), trained `iterations`
    with the solver (from the fillers instead, keep_weights False), written to output
    (.caffemodel) and output_model (prototxt); (the report
    with D1's keys and the accuracy before, after the rewrite and after training, the original
    Compressor)."""
    from espresso.net import load_net_param
    from espresso.proto import caffe_pb2
    from espresso.proto.text import write_text

    original = Compressor(solver, weights, model)
    param = original.solver.param
    if not (param.HasField("net") or param.HasField("net_param")):
        raise EspressoError("rewriting a net needs a solver whose `net` (or net_param) holds the train and test layers")
    accuracy = {"original": original.evaluate("original")}
    source = param.net_param if param.HasField("net_param") else param.net  # as written: a built net's param
    new_param, new_weights = rewrite(load_net_param(source)[0], original.net)  # holds its own state
    solver_param = caffe_pb2.SolverParameter()
    solver_param.CopyFrom(param)
    solver_param.ClearField("net")
    solver_param.net_param.CopyFrom(new_param)
    tuned = Compressor(solver_param, weights if keep_weights else None, model)  # by name; the new ones below
    for name, arrays in new_weights.items():
        for view, array in zip(tuned.net.params[name], arrays):
            view.data[...] = array.reshape(view.data.shape)
    accuracy[stage] = tuned.evaluate(stage)
    if iterations:
        tuned.solver.step(iterations)
    accuracy["trained"] = tuned.evaluate("trained")
    tuned.net.save(output)
    if output_model:
        write_text(output_model, new_param)
    before = sum(b.count for blobs in original.net.params.values() for b in blobs) * 4
    after = sum(b.count for blobs in tuned.net.params.values() for b in blobs) * 4
    return {"ratio": before / after, "accuracy_before": accuracy["original"], "accuracy_after": accuracy["trained"],
            "accuracy": accuracy, "original_bytes": before, "compressed_bytes": after, "output": str(output)}, original


def hash_compress(model, weights, solver, factor, output, output_model=None, iterations=10000):
    """HashedNets: every InnerProduct of the solver's net made a HashedInnerProduct with
    1/factor of its weights as real ones (seed: its position), trained from the fillers with the
    solver, as Chen et al. train them; the report as retrain_rewritten's."""
    import math

    if not factor > 1:
        raise EspressoError(f"--hash: a factor above 1 (1/factor of the weights kept), got {factor}")

    def rewrite(param, net):
        found = 0
        for seed, lp in enumerate(param.layer):
            if lp.type == "InnerProduct":
                virtual = net.params[lp.name][0].count if lp.name in net.params else None
                if virtual is None:
                    continue
                lp.type, found = "HashedInnerProduct", found + 1
                lp.hashed_param.buckets, lp.hashed_param.seed = max(1, math.ceil(virtual / factor)), seed
        if not found:
            raise EspressoError("--hash: the net has no InnerProduct layer to hash")
        return param, {}

    report, _ = retrain_rewritten(model, weights, solver, rewrite, "hashed", iterations, output, output_model,
                                  keep_weights=False)
    return report


def fixed_point_compress(model, weights, solver, fixed_point, rounding, output, iterations=1000, dynamic=False):
    """Gupta et al.'s fixed point as a stage: the model rounded to <IL, FL> and trained on in it
    `iterations` (espresso/compress/fixed_point.py), its weights written as IL+FL-bit integers
    (one scale, 2**-FL, per blob: with `dynamic`, each blob's own FL); the report as D1's."""
    from espresso.compress.fixed_point import FixedPoint

    il, fl = fixed_point
    if il + fl > 16:
        raise EspressoError(f"--fixed-point {il},{fl}: the model file stores words of at most 16 bits")
    c = Compressor(solver, weights, model)
    c.evaluate("original")
    fixed = FixedPoint(c.net, il, fl, rounding, dynamic=dynamic).attach(c.solver)
    c.evaluate("rounded")
    if iterations:
        c.solver.step(iterations)
    c.evaluate("trained")
    fixed.dynamic = False  # the formats as they stand, the weights rounded to them once more
    fixed.round_weights()
    formats, records = fixed.formats(), []
    for name, layer in c.net.layer_dict.items():
        if layer.blobs:
            keys = [("weights", c.net._param_owner_of[id(b)]) for b in layer.blobs]
            blobs = [_integers(b, formats[key], il + fl) if key in formats else np.array(b.host_data(), np.float32)
                     for b, key in zip(layer.blobs, keys)]
            records.append((name, layer.type, blobs))
    write_model(output, records)
    return _report(c, "trained", output, {"stage": "fixed_point", "format": [il, fl], "rounding": rounding,
                                          "dynamic": dynamic, "iterations": iterations})


def _report(c, stage, output, row):
    """D1's keys for a stage that keeps the net's layers: the file's bytes against float32's."""
    before = sum(b.count for b in c.net.learnable_params) * 4
    after = os.path.getsize(output)
    return {"ratio": before / after, "accuracy_before": c.accuracy.get("original"),
            "accuracy_after": c.accuracy.get(stage), "accuracy": c.accuracy, "original_bytes": before,
            "compressed_bytes": after, "output": str(output), "stages": [row]}


def half_compress(model, weights, solver, kind, output):
    """Every InnerProduct's and Convolution's weights as 16-bit floats of `kind` (float16 or
    bfloat16; biases and other layers float32),
    espresso/compress/half.py; the report as D1's, the accuracy after from the file as deployed."""
    from espresso.compress.half import to_bits
    from espresso.compress.model_file import HalfFloats

    c = Compressor(solver, weights, model)
    c.evaluate("original")
    records, halved = [], []
    for name, layer in c.net.layer_dict.items():
        blobs = [np.array(b.host_data(), np.float32) for b in layer.blobs]
        if layer.type in ("InnerProduct", "Convolution") and blobs:
            blobs[0] = HalfFloats(to_bits(blobs[0], kind), kind)
            if not np.all(np.isfinite(blobs[0].dense())):
                raise EspressoError(f"--{kind}: layer '{name}' has weights beyond {kind}'s range")
            halved.append(name)
        if blobs:
            records.append((name, layer.type, blobs))
    write_model(output, records)
    c.accuracy[kind] = run_deployed(model, output, c.test_iter)
    return _report(c, kind, output, {"stage": kind, "layers": halved})


def _integers(blob, fl, word):
    from espresso.compress.model_file import ScaledIntegers

    values = np.rint(np.asarray(blob.host_data(), np.float64) * 2.0 ** fl)
    return ScaledIntegers(values.astype(np.int8 if word <= 8 else np.int16), np.array([2.0 ** -fl], np.float32))


def run_deployed(model, path, iterations):
    """The accuracy of the compressed file as deployed: a TEST net loading it directly."""
    if not model or not iterations:
        return None
    net = espresso.Net(model, espresso.TEST, weights=os.fspath(path))
    keys = [k for k in net.outputs if "acc" in k]
    if not keys:
        return None
    total = 0.0
    for _ in range(iterations):
        net.run_forward()
        total += float(np.mean(net.blobs[keys[0]].host_data()))
    return total / iterations


def stream_sizes(cw):
    """Bytes of a compressed blob's parts: codebook, weights, index (for the report)."""
    codebook = 0 if cw.codebook is None else 4 * len(cw.codebook)
    if cw.codebook is not None:
        weights = len(model_file._stream(cw.symbols, cw.bits, cw.huffman))
    else:
        weights = 4 * len(cw.symbols)
    index = 0
    if cw.positions is not None:
        gaps = np.diff(np.concatenate([[-1], cw.positions])) - 1
        index = len(model_file._stream(gaps, cw.index_bits, cw.huffman))
    return codebook, weights, index
