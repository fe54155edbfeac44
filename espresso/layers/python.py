"""The `Python` layer: a user class named by the prototxt (python_param.module / .layer).

It imports and runs code named by the file, so a net that uses it is refused unless the user
opts in: `Net(..., allow_python=True)` or ESPRESSO_ALLOW_PYTHON_LAYER=1 in the environment.
The class follows pycaffe's contract: setup/reshape/forward/backward(top, propagate_down,
bottom), `self.param_str`, `self.phase`, `self.blobs`.
"""

import importlib
import os

from espresso.errors import LayerParamError, NetError
from espresso.layer import Layer, register

ALLOW_ENV = "ESPRESSO_ALLOW_PYTHON_LAYER"


def check_python_allowed(layer_param, where):
    if os.environ.get(ALLOW_ENV) == "1":
        return
    p = layer_param.python_param
    raise NetError(f"{where}layer '{layer_param.name}' (Python) would import and run "
                   f"'{p.module}.{p.layer}'; if you trust this file, pass allow_python=True (to Net, "
                   f"any solver or get_solver), --allow-python (espresso train, test, time) or set "
                   f"{ALLOW_ENV}=1")


class _BlobVec(list):
    """pycaffe's BlobVec: a Python layer's parameter blobs; add_blob(*shape), called in setup,
    gives it a learnable one (the net then trains it as any layer's)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def add_blob(self, *shape):
        self.append(self.layer.new_blob(shape))


@register
class PythonLayer(Layer):
    """Delegates to the user's class; honors python_param module, layer, param_str."""

    type = "Python"
    capturable = False
    param = "python_param"
    inplace = True  # the user's code decides; Caffe allows it

    def __init__(self, layer_param, backend, phase, dtype, source=""):
        super().__init__(layer_param, backend, phase, dtype, source)
        try:
            cls = getattr(importlib.import_module(self.p.module), self.p.layer)
        except (ImportError, AttributeError) as e:
            raise LayerParamError(f"{self.where}: cannot load {self.p.module}.{self.p.layer}: {e}") from None
        self.blobs = _BlobVec(self)
        self.user_object = cls.__new__(cls)  # what pycaffe's net.layers[i] gives
        self.user_object.param_str, self.user_object.phase = self.p.param_str, phase
        self.user_object.blobs, self.user_object.type = self.blobs, "Python"  # pycaffe's layer.type

    def setup(self, bottom, top):
        self.user_object.setup(bottom, top)

    def reshape(self, bottom, top):
        self.user_object.reshape(bottom, top)

    def forward(self, bottom, top):
        self.user_object.forward(bottom, top)

    def backward(self, top, propagate_down, bottom):
        self.user_object.backward(top, propagate_down, bottom)
