"""The network definitions that ship with Caffe: all parse, build, and run.

Deploy nets run forward on random input and must give the right output shape.  Train/val nets
read datasets that are not here, so their data layers are swapped for DummyData of the shape
the real data has (batch 2), and they are built in both phases and run forward and backward.
"""

import numpy as np
import pytest

import espresso as caffe
from espresso.proto import caffe_pb2
from espresso.proto.text import read_text

DEPLOY = {
    "examples/mnist/lenet.prototxt": {"prob": (1, 10)},
    "examples/cifar10/cifar10_quick.prototxt": {"prob": (1, 10)},
    "examples/cifar10/cifar10_full.prototxt": {"prob": (1, 10)},
    "examples/siamese/mnist_siamese.prototxt": {"feat": (1, 2)},
    "examples/net_surgery/conv.prototxt": {"conv": (1, 3, 96, 96)},
    "examples/net_surgery/bvlc_caffenet_full_conv.prototxt": {"prob": (1, 1000, 8, 8)},
    "models/bvlc_reference_caffenet/deploy.prototxt": {"prob": (1, 1000)},
    "models/bvlc_alexnet/deploy.prototxt": {"prob": (1, 1000)},
    "models/bvlc_googlenet/deploy.prototxt": {"prob": (1, 1000)},
    "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt": {"fc-rcnn": (1, 200)},
    "models/finetune_flickr_style/deploy.prototxt": {"prob": (1, 20)},
    "fmnist/lenet_deploy_with_loss.prototxt": {"prob": (1, 10), "accuracy": (), "loss": ()},
}

TRAIN_VAL = [
    "examples/mnist/lenet_train_test.prototxt",
    "examples/mnist/mnist_autoencoder.prototxt",
    "examples/siamese/mnist_siamese_train_test.prototxt",
    "examples/cifar10/cifar10_quick_train_test.prototxt",
    "examples/cifar10/cifar10_full_train_test.prototxt",
    "examples/cifar10/cifar10_full_sigmoid_train_test.prototxt",
    "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt",
    "examples/hdf5_classification/train_val.prototxt",
    "examples/hdf5_classification/nonlinear_train_val.prototxt",
    "examples/hdf5_classification/nonlinear_auto_train.prototxt",
    "examples/hdf5_classification/nonlinear_auto_test.prototxt",
    "examples/feature_extraction/imagenet_val.prototxt",
    "examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt",
    "fmnist/lenet_train_test.prototxt",
    "models/bvlc_reference_caffenet/train_val.prototxt",
    "models/bvlc_alexnet/train_val.prototxt",
    "models/bvlc_googlenet/train_val.prototxt",
    "models/finetune_flickr_style/train_val.prototxt",
]

DATA_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData"}
TEST_STAGES = {"examples/mnist/mnist_autoencoder.prototxt": ["test-on-test"]}  # as its solver's test_state
BATCH = 2


def _data_shape(path, layer):
    """The per-item shape of a data layer's first top, as the real dataset would give it."""
    if "siamese" in path:
        return (2, 28, 28)
    if "mnist" in path:
        return (1, 28, 28)
    if "cifar10" in path:
        return (3, 32, 32)
    if "hdf5" in path:
        return (4,)
    crop = layer.transform_param.crop_size or layer.window_data_param.crop_size
    return (3, crop, crop)


def _with_dummy_data(path, net):
    """The net with every data layer replaced by DummyData (data uniform, labels all 1)."""
    for layer in net.layer:
        if layer.type not in DATA_TYPES:
            continue
        item = _data_shape(path, layer)
        top, include = list(layer.top), list(layer.include)
        layer.Clear()
        layer.name, layer.type = "data", "DummyData"
        layer.top.extend(top)
        layer.include.extend(include)
        p = layer.dummy_data_param
        p.shape.add().dim.extend((BATCH,) + item)
        p.data_filler.add(type="uniform", min=-1, max=1)
        for _ in top[1:]:
            p.shape.add().dim.append(BATCH)
            p.data_filler.add(type="constant", value=1)
    return net


@pytest.mark.parametrize("name", sorted(DEPLOY))
def test_deploy_nets_run_forward_with_the_right_output_shape(zoo, name):
    net = caffe.Net(str(zoo / name), caffe.TEST)
    rng = np.random.default_rng(0)
    for blob_name in net.inputs:
        blob = net.blobs[blob_name]
        blob.reshape((1,) + blob.shape[1:])
        blob.data[...] = rng.integers(0, 2, blob.shape) if blob_name == "label" else rng.random(blob.shape)
    net.reshape()
    out = net.forward()
    assert {k: v.shape for k, v in out.items()} == DEPLOY[name]
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("name", TRAIN_VAL)
@pytest.mark.parametrize("phase", [caffe.TRAIN, caffe.TEST])
def test_train_val_nets_build_and_run_in_both_phases(zoo, name, phase):
    param = _with_dummy_data(name, read_text(zoo / name, caffe_pb2.NetParameter()))
    net = caffe.Net(param, phase, stages=TEST_STAGES.get(name, []) if phase == caffe.TEST else [])
    loss = net.forward_backward() if phase == caffe.TRAIN else float(net.run_forward())
    assert np.isfinite(loss)
