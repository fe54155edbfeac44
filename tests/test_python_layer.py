"""Python layers: refused unless allowed (they run the code the file names), and allowed by one
switch wherever a net is built: Net, every solver, get_solver, the CLI's --allow-python."""

import textwrap

import numpy as np
import pytest

import espresso
from espresso import cli
from espresso.errors import NetError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text

MODULE = '''
import espresso as caffe


class TimesTen(caffe.Layer):
    """Caffe's test_python_layer.py SimpleLayer: top = 10 * bottom."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff
'''
NET = """
layer { name: "x" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 1 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ten" type: "Python" bottom: "ip" top: "ten" python_param { module: "times_ten" layer: "TimesTen" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ten" bottom: "y" top: "loss" }
"""


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "times_ten.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ESPRESSO_ALLOW_PYTHON_LAYER", raising=False)
    return tmp_path


def net_param():
    return parse_text(NET, caffe_pb2.NetParameter())


def test_refused_by_default_saying_how_to_allow(module):
    with pytest.raises(NetError, match=r"would import and run 'times_ten.TimesTen'.*allow_python=True.*"
                                       r"--allow-python"):
        espresso.Net(net_param(), espresso.TRAIN)


def test_a_net_allowed_runs_the_layer_forward_and_backward(module):
    net = espresso.Net(net_param(), espresso.TRAIN, allow_python=True)
    net.forward()
    np.testing.assert_allclose(net.blobs["ten"].data, 10 * net.blobs["ip"].data, rtol=1e-6)
    net.backward()
    np.testing.assert_allclose(net.blobs["ip"].diff, 10 * net.blobs["ten"].diff, rtol=1e-6)


def test_solvers_take_the_switch(module, tmp_path):
    param = parse_text('base_lr: 0.001 lr_policy: "fixed" max_iter: 5 display: 0', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(net_param())
    with pytest.raises(NetError, match="allow_python=True"):
        espresso.SGDSolver(param)
    solver = espresso.SGDSolver(param, allow_python=True)
    first = float(solver.net.forward()["loss"])
    solver.step(5)
    assert float(solver.net.forward()["loss"]) < first  # it learns through the Python layer
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path}/net.prototxt" base_lr: 0.001 lr_policy: "fixed" '
                                              f'max_iter: 2 display: 0 snapshot_after_train: false type: "Adam"')
    assert espresso.get_solver(str(tmp_path / "solver.prototxt"), allow_python=True).type == "Adam"
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--allow-python"]) == 0
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt")]) == 1


LEARNABLE = '''
import espresso as caffe


class Scaled(caffe.Layer):
    """Caffe's test_python_layer.py ParameterLayer, learnable: top = w * bottom."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[...] = 1.0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum()
        bottom[0].diff[...] = self.blobs[0].data * top[0].diff
'''


def test_a_learnable_python_layer_has_type_python_and_trains_its_blob(module, tmp_path):
    (tmp_path / "scaled.py").write_text(textwrap.dedent(LEARNABLE))
    text = NET.replace('module: "times_ten" layer: "TimesTen"', 'module: "scaled" layer: "Scaled"')
    param = parse_text('base_lr: 0.01 lr_policy: "fixed" display: 0', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(parse_text(text, caffe_pb2.NetParameter()))
    solver = espresso.SGDSolver(param, allow_python=True)
    layer = solver.net.layer_dict["ten"]
    assert type(layer).__name__ == "Scaled"  # pycaffe's net.layers give the user's own object
    assert layer.type == "Python" and len(layer.blobs) == 1 and solver.net.params["ten"][0] is layer.blobs[0]
    assert float(solver.net.params["ten"][0].data[0]) == 1.0  # set in setup, kept by the net
    solver.step(3)
    assert float(solver.net.params["ten"][0].data[0]) != 1.0  # the solver updated the layer's blob
