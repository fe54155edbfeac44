"""Other formats in and out: ONNX import (onnx_import.py) and export (onnx_export.py), Core ML
export (coreml_export.py), and comparing two models tensor by tensor (compare.py).

Each needs its package (onnx, onnxruntime, coremltools: pip install 'espresso-nn[onnx,coreml]'),
imported only when used."""
