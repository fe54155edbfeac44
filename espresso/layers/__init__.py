"""Every built-in layer, one module per family; importing this registers them all."""

from espresso.layers import (  # noqa: F401
    common,
    data,
    datalayers,
    loss,
    neuron,
    normalization,
    python,
    recurrent,
    utility,
    vision,
)
