"""Other formats in and out: ONNX import (onnx_import.py) and export (onnx_export.py), Core ML
export (coreml_export.py), and comparing two models tensor by tensor (compare.py).

Each needs its package (onnx, onnxruntime, coremltools: pip install 'espresso-nn[onnx,coreml]'),
imported only when used."""


def unique_name(base, taken, separator=""):
    """`base`, else base + separator + 2, 3, ...: the first not in `taken` (which it does not change)."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{separator}{k}"
    return name
