"""Every built-in layer, one module per family; importing this registers them all.

The package also serves as pycaffe's `caffe.layers` (NetSpec's `L`): `espresso.layers.Convolution`
and any other capitalized Caffe type name resolve through `__getattr__` to NetSpec's layer
factory.  Both must live at one name because `import espresso as caffe; caffe.layers` is pycaffe's
spelling, and a subpackage of that name would otherwise replace NetSpec's object once imported.
"""

from espresso.layers import (  # noqa: F401
    common,
    data,
    extensions,
    hashed,
    inputs,
    loss,
    neuron,
    normalization,
    python,
    recurrent,
    utility,
    vision,
    window_data,
)


def __getattr__(name):
    if name[:1].isupper():  # a Caffe type name: NetSpec's L.<Type>(...)
        from espresso.net_spec import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'espresso.layers' has no attribute '{name}'")
