"""Other formats in and out: ONNX import (onnx_import.py) and export (onnx_export.py).

Each needs the `onnx` package (pip install 'espresso-nn[onnx]'), imported only when used."""
