"""What the exporters (ONNX, Core ML) read from a built Caffe layer the same way: the layer as an
exporter sees it, and Caffe's rules that both must reproduce with their own operators."""

import collections

from espresso.errors import NetError
from espresso.proto import caffe_pb2

# one layer as an exporter sees it: the Espresso layer, the bottoms' tensors (names or values),
# the tops' names, the bottoms' and tops' shapes, the param blobs as float32 host arrays
Layer = collections.namedtuple("Layer", "layer x y xs ys w")


def refuse(L, target, message):
    L.layer.fail(f"cannot be exported to {target}: {message}", NetError)


def pool_window(L, target):
    """(kernel, stride, pad, extra) of a Pooling layer: Caffe's window, and the padding to add at
    each spatial axis's end so that floor rounding gives Caffe's output size (the top's: ceil
    rounding, the last window starting inside the image)."""
    layer, p = L.layer, L.layer.p
    if p.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
        refuse(L, target, f"STOCHASTIC pooling has no {target} operator")
    if len(L.y) > 1:
        refuse(L, target, f"MAX pooling's second top (the argmax mask) has no {target} operator")
    spatial = L.xs[0][2:]
    kernel = spatial if p.global_pooling else layer.kernel
    stride, pad = layer.stride, layer.pad
    extra = [max(0, (o - 1) * s + k - (n + 2 * q))
             for n, o, k, s, q in zip(spatial, L.ys[0][2:], kernel, stride, pad, strict=True)]
    return kernel, stride, pad, extra


def trailing(L, shape):
    """`shape`, of bottom 0's axes from the layer's axis on, with 1s for the axes after those
    (to broadcast over bottom 0); a scalar stays one."""
    rank = len(L.xs[0])
    return tuple(shape) + (1,) * (rank - L.layer.p.axis % rank - len(shape)) if len(shape) else ()
