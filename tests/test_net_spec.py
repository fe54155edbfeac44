"""espresso.net_spec: pycaffe's NetSpec, layers (L), params (P) and to_proto."""

import numpy as np
import pytest

import espresso
from espresso.errors import LayerParamError, NetError
from espresso.net_spec import NetSpec, param_name_dict, to_proto
from espresso.net_spec import layers as L
from espresso.net_spec import params as P
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, to_text


def lenet(batch=2):
    n = NetSpec()
    fillers = [dict(type="gaussian", std=0.5), dict(type="constant", value=1)]
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch, 1, 12, 12]), dict(dim=[batch])],
                                  data_filler=fillers, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=4, weight_filler=dict(type="xavier"),
                            param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=6, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n


# The same net written by hand, as in Caffe's examples/mnist/lenet_train_test.prototxt.
LENET_TEXT = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } shape { dim: 2 }
    data_filler { type: "gaussian" std: 0.5 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 6 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_lenet_matches_hand_written_prototxt():
    param = lenet().to_proto()
    assert isinstance(param, caffe_pb2.NetParameter)
    assert param == parse_text(LENET_TEXT, caffe_pb2.NetParameter())


def test_lenet_text_round_trip():
    param = lenet().to_proto()
    text = to_text(param)
    assert parse_text(text, caffe_pb2.NetParameter()) == param
    # pycaffe scripts write str(n.to_proto()) to a .prototxt
    assert parse_text(str(param), caffe_pb2.NetParameter()) == param


def test_auto_names_count_per_type():
    x = L.Input(shape=dict(dim=[1, 2]))
    y = L.ReLU(L.ReLU(x))
    param = to_proto(y)
    assert [layer.name for layer in param.layer] == ["Input1", "ReLU1", "ReLU2"]
    assert [list(layer.top) for layer in param.layer] == [["Input1"], ["ReLU1"], ["ReLU2"]]
    assert list(param.layer[2].bottom) == ["ReLU1"]
    assert y.to_proto() == param


def test_topological_order_with_shared_bottom():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    a = L.ReLU(n.data)
    b = L.Sigmoid(n.data)
    n.out = L.Eltwise(a, b, operation=P.Eltwise.SUM)
    param = n.to_proto()
    assert [layer.name for layer in param.layer] == ["data", "ReLU1", "Sigmoid1", "out"]
    assert list(param.layer[3].bottom) == ["ReLU1", "Sigmoid1"]
    assert param.layer[3].eltwise_param.operation == caffe_pb2.EltwiseParameter.SUM


def test_layers_named_by_netspec_even_when_assigned_out_of_order():
    n = NetSpec()
    data = L.Input(shape=dict(dim=[1]))
    n.top = L.ReLU(data)
    n.data = data  # named after use: the name still applies
    param = n.to_proto()
    assert [(layer.name, list(layer.bottom)) for layer in param.layer] == [("data", []), ("top", ["data"])]


def test_ntop_zero_and_several_tops():
    n = NetSpec()
    n.a, n.b = L.DummyData(shape=dict(dim=[1]), ntop=2)
    n.silence = L.Silence(n.a, n.b, ntop=0)
    param = n.to_proto()
    assert list(param.layer[0].top) == ["a", "b"] and param.layer[0].name == "a"
    assert param.layer[1].name == "silence" and list(param.layer[1].top) == []
    assert list(param.layer[1].bottom) == ["a", "b"]


def test_field_routing():
    top = L.Convolution(L.Input(shape=dict(dim=[1, 1, 4, 4])), kernel_size=3, num_output=2, name="c",
                        loss_weight=0.5, include=dict(phase=espresso.TRAIN), propagate_down=[True],
                        bias_filler=caffe_pb2.FillerParameter(type="constant", value=0.1),
                        param=dict(name="w", decay_mult=0))
    layer = top.to_proto().layer[1]
    assert layer.name == "c" and list(layer.top) == ["Convolution1"]
    assert list(layer.convolution_param.kernel_size) == [3]  # a scalar for a repeated field
    assert list(layer.loss_weight) == [0.5] and list(layer.propagate_down) == [True]
    assert layer.include[0].phase == caffe_pb2.TRAIN
    assert layer.convolution_param.bias_filler.value == pytest.approx(0.1)
    assert layer.param[0].name == "w" and layer.param[0].decay_mult == 0
    shape = L.Input(shape=dict(dim=np.array([2, 3]))).to_proto().layer[0].input_param.shape[0]
    assert list(shape.dim) == [2, 3]


def test_explicit_param_for_types_outside_the_naming_rule():
    top = L.Deconvolution(L.Input(shape=dict(dim=[1, 1, 2, 2])),
                          convolution_param=dict(num_output=1, kernel_size=[2, 2], stride=2))
    layer = top.to_proto().layer[1]
    assert list(layer.convolution_param.kernel_size) == [2, 2]
    with pytest.raises(LayerParamError, match="num_output"):
        to_proto(L.Deconvolution(L.Input(shape=dict(dim=[1])), num_output=1))


def test_python_layer_and_enum_names():
    top = L.Python(L.Input(shape=dict(dim=[1])), module="m", layer="Layer", param_str="{}")
    layer = top.to_proto().layer[1]
    assert (layer.python_param.module, layer.python_param.layer) == ("m", "Layer")
    pool = L.Pooling(L.Input(shape=dict(dim=[1])), pool="AVE").to_proto().layer[1]
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE


def test_param_name_dict_follows_caffe_naming_rule():
    names = param_name_dict()
    assert names["InnerProduct"] == "inner_product"
    assert names["Convolution"] == "convolution"
    assert names["Python"] == "python"
    assert names["Transformation"] == "transform"
    assert "Deconvolution" not in names and "SoftmaxWithLoss" not in names


def test_params_enum_values():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX == 0
    assert P.Pooling.STOCHASTIC == 2
    assert P.Eltwise.PROD == caffe_pb2.EltwiseParameter.PROD
    assert P.Convolution.CUDNN == caffe_pb2.ConvolutionParameter.CUDNN
    with pytest.raises(AttributeError, match="no enum value 'MIN'"):
        _ = P.Pooling.MIN
    with pytest.raises(AttributeError, match="did you mean 'Pooling'"):
        _ = P.Poolin.MAX


def test_unknown_field_names_layer_and_suggests():
    top = L.Convolution(L.Input(shape=dict(dim=[1])), kernel_sise=3)
    with pytest.raises(LayerParamError, match=r"'Convolution1'.*'kernel_sise'.*did you mean 'kernel_size'"):
        to_proto(top)
    top = L.Convolution(L.Input(shape=dict(dim=[1])), weight_filler=dict(typ="xavier"))
    with pytest.raises(LayerParamError, match=r"Convolution1.*convolution_param.weight_filler.typ: "
                                              r"FillerParameter has no field 'typ'; did you mean 'type'"):
        to_proto(top)


def test_bad_values():
    with pytest.raises(LayerParamError, match="num_output"):
        to_proto(L.InnerProduct(L.Input(shape=dict(dim=[1])), num_output="ten"))
    with pytest.raises(LayerParamError, match="expected a dict"):
        to_proto(L.InnerProduct(L.Input(shape=dict(dim=[1])), weight_filler="xavier"))


def test_bottoms_must_be_tops():
    pair = L.DummyData(shape=dict(dim=[1]), ntop=2)
    with pytest.raises(TypeError, match=r"^ReLU input 0 is not a Top \(type is <class 'tuple'>\)$") as caught:
        L.ReLU(pair)  # pycaffe's TypeError, in its words
    assert isinstance(caught.value, NetError)
    n = NetSpec()
    n.pair = pair
    with pytest.raises(NetError, match="unpack several outputs"):
        n.to_proto()


def test_netspec_item_access_and_missing_attribute():
    n = NetSpec()
    n["data"] = L.Input(shape=dict(dim=[1]))
    assert n.data is n["data"]
    with pytest.raises(AttributeError, match="did you mean 'data'"):
        _ = n.dta


def test_deep_chain_does_not_recurse():
    top = L.Input(shape=dict(dim=[1]))
    for _ in range(3000):
        top = L.ReLU(top)
    param = to_proto(top)
    assert len(param.layer) == 3001 and param.layer[-1].name == "ReLU3000"


# *** building a Net from the generated NetParameter ***
def test_net_from_netspec_data_layers():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.noise = L.DummyData(shape=dict(dim=[4, 1]), data_filler=dict(type="constant", value=2.5))
    net = espresso.Net(n.to_proto(), phase=espresso.TRAIN)
    assert net.blobs["data"].data.shape == (2, 3)
    net.forward()
    np.testing.assert_array_equal(net.blobs["noise"].data, 2.5)


def test_net_from_netspec_lenet():
    net = espresso.Net(lenet().to_proto(), phase=espresso.TRAIN)
    assert net.blobs["conv1"].data.shape == (2, 4, 8, 8)
    assert net.blobs["pool1"].data.shape == (2, 4, 4, 4)
    assert net.blobs["ip2"].data.shape == (2, 3)
    net.forward()
    loss = float(net.blobs["loss"].data)
    assert np.isfinite(loss) and loss > 0


def test_net_from_netspec_mlp():
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[2, 1, 4, 4]), dict(dim=[2])], ntop=2,
                                  data_filler=[dict(type="gaussian"), dict(type="constant", value=1)])
    n.ip1 = L.InnerProduct(n.data, num_output=6, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    net = espresso.Net(n.to_proto(), phase=espresso.TRAIN)
    assert list(net.blobs) == ["data", "label", "ip1", "ip2", "loss"]  # relu1 ran in place on ip1
    net.forward()
    assert np.all(net.blobs["ip1"].data >= 0)
    assert np.isfinite(float(net.blobs["loss"].data)) and float(net.blobs["loss"].data) > 0
