"""Compare a Core ML model written by espresso.interop.coreml_export with the Espresso net it came
from.  Runs on a Mac (Core ML predicts only there), with espresso, coremltools and pillow installed:

    python tools/check_coreml_on_mac.py lenet.mlpackage lenet_deploy.prototxt [lenet.caffemodel] [--float16]

Both get the same random input (the model's input shapes; image inputs random 0..255 pixels, which
the net gets as Core ML preprocesses them: scale * pixel + bias, read from the model).  Prints the
largest absolute difference of each output and that difference over the output's largest
magnitude; exits with status 1 when the latter passes 1e-4 (float32 models) or 1e-2 (--float16).
A classifier's probabilities are compared in the order of its labels, with the net's last output.
"""

import argparse
import re
import sys

import coremltools as ct
import numpy as np
from coremltools.converters.mil.frontend.milproto.load import load as load_mil

import espresso

IMAGE = ct.proto.FeatureTypes_pb2.ImageFeatureType


def feature(name):
    """A blob's name as Core ML names its feature."""
    return re.sub(r"\W", "_", name)


def mil_ops(model, spec):
    """The ML Program's ops by output name (an empty dict for a NeuralNetwork)."""
    if spec.WhichOneof("Type") != "mlProgram":
        return {}
    program = load_mil(spec, spec.specificationVersion, model.weights_dir)
    return {op.outputs[0].name: op for op in program.functions["main"].operations if op.outputs}


def preprocessing(spec, ops, name, color_space):
    """(scale, bias per channel in the tensor's order) Core ML applies to image input `name`."""
    if spec.WhichOneof("Type") == "mlProgram":  # coremltools' ops after the input
        scale, bias = ops.get(f"{name}__scaled__"), ops.get(f"{name}__biased__")
        return (scale.y.val if scale else 1.0), (bias.y.val.ravel() if bias else np.zeros(1))
    (scaler,) = [p.scaler for p in getattr(spec, spec.WhichOneof("Type")).preprocessing if p.featureName == name]
    bias = {IMAGE.GRAYSCALE: [scaler.grayBias], IMAGE.BGR: [scaler.blueBias, scaler.greenBias, scaler.redBias],
            IMAGE.RGB: [scaler.redBias, scaler.greenBias, scaler.blueBias]}[color_space]
    return scaler.channelScale, np.array(bias)


def random_inputs(spec, ops, rng):
    """(what Core ML is fed, what the net is fed) by feature name."""
    from PIL import Image

    model_feeds, net_feeds = {}, {}
    for description in spec.description.input:
        kind = description.type
        if kind.WhichOneof("Type") == "multiArrayType":
            model_feeds[description.name] = rng.standard_normal(tuple(kind.multiArrayType.shape)).astype(np.float32)
            net_feeds[description.name] = model_feeds[description.name]
            continue
        image = kind.imageType
        grey = image.colorSpace == IMAGE.GRAYSCALE
        pixels = rng.integers(0, 256, (image.height, image.width, 1 if grey else 3), dtype=np.uint8)
        model_feeds[description.name] = Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB")
        planes = pixels.transpose(2, 0, 1).astype(np.float32)  # R, G, B (or grey)
        planes = planes[::-1] if image.colorSpace == IMAGE.BGR else planes
        scale, bias = preprocessing(spec, ops, description.name, image.colorSpace)
        net_feeds[description.name] = (planes * np.float32(scale) + np.reshape(bias, (-1, 1, 1)))[None]
    return model_feeds, net_feeds


def labels(spec, ops):
    if spec.WhichOneof("Type") == "mlProgram":
        (classify,) = [op for op in ops.values() if op.op_type == "classify"]
        return list(classify.classes.val)
    classifier = spec.neuralNetworkClassifier
    return list(getattr(classifier, classifier.WhichOneof("ClassLabels")).vector)


def compare(name, got, want, tolerance):
    """Print the differences; whether they are within the tolerance."""
    got, want = np.asarray(got, np.float64).reshape(want.shape), np.asarray(want, np.float64)
    largest = np.abs(got - want).max()
    relative = largest / max(np.abs(want).max(), np.finfo(np.float32).tiny)
    ok = relative <= tolerance
    print(f"{name}: max abs diff {largest:.3g}, max rel diff {relative:.3g} {'ok' if ok else 'TOO LARGE'}")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .mlpackage (or .mlmodel) export_coreml wrote")
    parser.add_argument("prototxt", help="the net's deploy prototxt")
    parser.add_argument("weights", nargs="?", help="its .caffemodel (or .h5) weights, if it had any")
    parser.add_argument("--float16", action="store_true", help="the model computes in float16: tolerance 1e-2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tolerance = 1e-2 if args.float16 else 1e-4
    model = ct.models.MLModel(args.model)
    spec = model.get_spec()
    ops = mil_ops(model, spec)
    net = espresso.Net(args.prototxt, args.weights, espresso.TEST) if args.weights else espresso.Net(
        args.prototxt, espresso.TEST)
    model_feeds, net_feeds = random_inputs(spec, ops, np.random.default_rng(args.seed))
    blobs = {feature(name): name for name in net.inputs}
    for name, value in net_feeds.items():  # the model's shapes (an updatable model takes batch 1)
        net.blobs[blobs[name]].reshape(value.shape)
    net.reshape()
    expected = net.forward(**{blobs[name]: value for name, value in net_feeds.items()})
    got = model.predict(model_feeds)
    ok = True
    for description in spec.description.output:
        name, kind = description.name, description.type.WhichOneof("Type")
        if kind == "dictionaryType":  # a classifier's probabilities: the net's last output
            probabilities = [got[name][label] for label in labels(spec, ops)]
            ok &= compare(name, probabilities, expected[net.outputs[-1]], tolerance)
        elif kind == "multiArrayType":
            outputs = {feature(blob): blob for blob in net.outputs}
            ok &= compare(name, got[name], expected[outputs[name]], tolerance)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
