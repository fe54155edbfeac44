"""The files the demo's model downloads as (Classifier.export): EXPORTS maps each format to the
function making its bytes from a model (its built `net`, `labels`, and `stored`: the blobs of the
loaded .espz, by layer, for the layers not retrained since), its file name and its media type.
"""

import io
import tempfile
import zipfile
from pathlib import Path

from espresso.compress.model_file import CompressedWeights, from_weights, write_model
from espresso.compress.prune import COMPRESSIBLE
from espresso.compress.quantize import kmeans_share
from espresso.proto.text import to_text

QUANTIZE_BITS = 8  # weights exported to .espz without retraining are k-means shared to 8 bits


def _via_file(write, name):
    """The bytes `write(path)` writes to a temporary file `name`."""
    with tempfile.TemporaryDirectory(prefix="espresso-demo-") as tmp:
        path = Path(tmp) / name
        write(path)
        return path.read_bytes()


def _caffemodel(model):
    return _via_file(model.net.save, "model.caffemodel")


def _espz(model):
    """The model as a compressed file: the loaded .espz's blobs where a layer was not retrained,
    every other weight blob of a Convolution or InnerProduct k-means shared to QUANTIZE_BITS."""
    records = []
    for name, layer in model.net.layer_dict.items():
        if not layer.blobs:
            continue
        blobs = model.stored.get(name) or [blob.host_data() for blob in layer.blobs]
        if layer.type in COMPRESSIBLE and not isinstance(blobs[0], CompressedWeights):
            codebook, index = kmeans_share(blobs[0], QUANTIZE_BITS)
            blobs = [from_weights(blobs[0], codebook=codebook, index=index, bits=QUANTIZE_BITS)] + blobs[1:]
        records.append((name, layer.type, blobs))
    return _via_file(lambda path: write_model(path, records), "model.espz")


def _onnx(model):
    from espresso.interop.onnx_export import to_onnx_model

    return to_onnx_model(model.net).SerializeToString()


def _coreml(model):
    """A zip of the .mlpackage directory (a classifier with the labels)."""
    from espresso.interop.coreml_export import to_coreml_model

    with tempfile.TemporaryDirectory(prefix="espresso-demo-") as tmp:
        package = Path(tmp) / "model.mlpackage"
        to_coreml_model(model.net, class_labels=model.labels).save(str(package))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(package.rglob("*")):
                z.write(path, path.relative_to(tmp).as_posix())
        return out.getvalue()


# format -> (the bytes of the served model, the file name to save them as, media type)
EXPORTS = {
    "caffemodel": (_caffemodel, "model.caffemodel", "application/octet-stream"),
    "prototxt": (lambda model: to_text(model.net.param).encode(), "deploy.prototxt", "text/plain; charset=utf-8"),
    "labels": (lambda model: "".join(f"{label}\n" for label in model.labels).encode(), "labels.txt",
               "text/plain; charset=utf-8"),
    "espz": (_espz, "model.espz", "application/octet-stream"),
    "onnx": (_onnx, "model.onnx", "application/octet-stream"),
    "coreml": (_coreml, "model.mlpackage.zip", "application/zip"),
}
