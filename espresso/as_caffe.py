"""Run a script written for pycaffe, unchanged: `python -m espresso.as_caffe script.py ARGS`.

The script's `import caffe` (and caffe.io, caffe.proto.caffe_pb2, caffe.draw, caffe.net_spec,
caffe.classifier, caffe.detector, caffe.coord_map, caffe.pycaffe, caffe._caffe) resolves to
Espresso's own modules: the same module objects under Caffe's names, one copy of each, with
nothing named `caffe` installed.  `--allow-python` lets the script's nets run Python layers
(ESPRESSO_ALLOW_PYTHON_LAYER=1), which Caffe's builds allow and Espresso refuses by default.
"""

import importlib
import os
import runpy
import sys

# Caffe's module name -> Espresso's
MODULES = {
    "caffe": "espresso",
    "caffe._caffe": "espresso",
    "caffe.pycaffe": "espresso",
    "caffe.io": "espresso.io",
    "caffe.proto": "espresso.proto",
    "caffe.proto.caffe_pb2": "espresso.proto.caffe_pb2",
    "caffe.draw": "espresso.draw",
    "caffe.net_spec": "espresso.net_spec",
    "caffe.classifier": "espresso.classifier",
    "caffe.detector": "espresso.detector",
    "caffe.coord_map": "espresso.coord_map",
}
USAGE = "usage: python -m espresso.as_caffe [--allow-python] script.py [ARGS ...]"


def install():
    """Make Caffe's module names resolve to Espresso's modules in this process."""
    for caffe_name, espresso_name in MODULES.items():
        sys.modules[caffe_name] = importlib.import_module(espresso_name)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--allow-python"]:
        os.environ["ESPRESSO_ALLOW_PYTHON_LAYER"] = "1"
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        sys.exit(USAGE)
    install()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` does
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
