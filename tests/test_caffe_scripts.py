"""The rest of pycaffe's surface: `python -m espresso.as_caffe`, Classifier, Detector, coord_map,
and the small names (Solver.share_weights, SGDSolver.lr, NCCL, IOError)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from devices import gpu_test

import espresso as caffe
from espresso import io
from espresso import layers as L
from espresso import params as P
from espresso.coord_map import coord_map_from_to, crop
from espresso.errors import EspressoError

ROOT = Path(__file__).resolve().parents[1]
LINEAR = """input: "data" input_shape { dim: 4 dim: 3 dim: 6 dim: 6 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def as_caffe(tmp_path, script, *args):
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, "-m", "espresso.as_caffe", *args, str(tmp_path / "script.py"), "x y"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})


def test_as_caffe_gives_espressos_modules_under_caffes_names(tmp_path):
    done = as_caffe(tmp_path, """
        import sys
        import caffe, caffe.io, caffe.draw, caffe.net_spec, caffe.coord_map, caffe.classifier, caffe.detector
        from caffe.proto import caffe_pb2
        from caffe import layers as L, params as P
        from caffe.pycaffe import Net, SGDSolver
        import espresso, espresso.proto.caffe_pb2
        assert caffe is espresso and caffe.io is espresso.io and caffe_pb2 is espresso.proto.caffe_pb2
        assert caffe.net_spec.NetSpec is caffe.NetSpec and caffe.classifier.Classifier is caffe.Classifier
        assert Net is espresso.Net and "caffe" not in {m.__name__ for m in sys.modules.values()}
        print(sys.argv[1:], __name__)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['x y'] __main__"


def test_as_caffe_python_layers_need_the_switch(tmp_path):
    (tmp_path / "ten.py").write_text("import caffe\nclass Ten(caffe.Layer):\n"
                                     "    def reshape(self, b, t): t[0].reshape(*b[0].data.shape)\n"
                                     "    def forward(self, b, t): t[0].data[...] = 10 * b[0].data\n")
    script = """
        import caffe, numpy as np
        net = caffe.NetSpec(); net.x = caffe.layers.Input(shape=dict(dim=[2]))
        net.y = caffe.layers.Python(net.x, python_param=dict(module="ten", layer="Ten"))
        open("n.prototxt", "w").write(str(net.to_proto()))
        n = caffe.Net("n.prototxt", caffe.TEST)
        n.blobs["x"].data[...] = [1, 2]
        print(n.forward()["y"].tolist(), type(n.layers[1]).__name__)
    """
    refused = as_caffe(tmp_path, script)
    assert refused.returncode == 1 and "allow_python=True" in refused.stderr
    allowed = as_caffe(tmp_path, script, "--allow-python")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "[10.0, 20.0] Ten"
    usage = subprocess.run([sys.executable, "-m", "espresso.as_caffe"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(ROOT)})
    assert usage.returncode == 1 and usage.stderr.startswith("usage: python -m espresso.as_caffe")


@pytest.fixture
def linear(tmp_path):
    path = tmp_path / "linear.prototxt"
    path.write_text(LINEAR)
    weights = tmp_path / "linear.caffemodel"
    caffe.Net(str(path), caffe.TEST).save(str(weights))
    return str(path), str(weights)


def test_classifier_centre_crop_and_ten_crop_average(linear, rng):
    clf = caffe.Classifier(*linear, image_dims=(8, 10), raw_scale=255.0, channel_swap=(2, 1, 0),
                           mean=np.array([10.0, 20.0, 30.0]))
    images = [rng.random((8, 10, 3)).astype(np.float32) for _ in range(3)]  # already at image_dims
    net = caffe.Net(*linear, caffe.TEST)

    def probabilities(crops):
        batch = np.array([(c.transpose(2, 0, 1)[::-1] * 255.0 - np.array([10.0, 20, 30])[:, None, None])
                          for c in crops])
        return np.concatenate([net.forward(data=batch[i:i + 4])["prob"].copy() for i in range(0, len(batch), 4)])

    centre = clf.predict(images, oversample=False)
    padded = [im[1:7, 2:8] for im in images] + [np.zeros((6, 6, 3), np.float32)]  # rows 1:7, cols 2:8
    np.testing.assert_allclose(centre, probabilities(padded)[:3], rtol=1e-5)
    ten = clf.predict(images)
    crops = io.oversample(images, (6, 6))
    np.testing.assert_allclose(ten, probabilities(list(crops) + [crops[0]] * 2)[:30].reshape(3, 10, 5).mean(1),
                               rtol=1e-5)
    assert ten.shape == (3, 5) and not np.allclose(ten, centre)


def test_detector_windows_and_context_padding(linear, tmp_path, rng):
    from PIL import Image

    pixels = rng.integers(0, 256, (12, 9, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    plain = caffe.Detector(*linear, raw_scale=255.0)
    image = io.load_image(str(tmp_path / "im.png"))
    np.testing.assert_array_equal(plain.crop(image, np.array([2, 1, 8, 7])), image[2:8, 1:7])
    found = plain.detect_windows([(str(tmp_path / "im.png"), [np.array([2, 1, 8, 7]), np.array([0, 0, 6, 6])])])
    assert [d["window"].tolist() for d in found] == [[2, 1, 8, 7], [0, 0, 6, 6]]
    direct = caffe.Net(*linear, caffe.TEST)
    batch = np.zeros((4, 3, 6, 6), np.float32)
    batch[0], batch[1] = image[2:8, 1:7].transpose(2, 0, 1) * 255, image[0:6, 0:6].transpose(2, 0, 1) * 255
    expected = direct.forward(data=batch)["prob"]
    np.testing.assert_allclose([d["prediction"] for d in found], expected[:2], rtol=1e-5)

    padded = caffe.Detector(*linear, raw_scale=255.0, mean=np.array([51.0, 102.0, 153.0]), context_pad=1)
    crop = padded.crop(image, np.array([0, 0, 5, 5]))  # at the corner: the context above and left is outside
    assert crop.shape == (6, 6, 3)
    np.testing.assert_allclose(crop[0, 0], [0.2, 0.4, 0.6])  # the mean in image space (/ raw_scale)
    assert not np.allclose(crop[-1, -1], [0.2, 0.4, 0.6])


def coord_net(pool=2, deconv_stride=2, pad=0):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool)
    n.deconv = L.Deconvolution(n.pool, convolution_param=dict(num_output=4, kernel_size=2 * deconv_stride,
                                                              stride=deconv_stride))
    return n


def test_coord_map_through_conv_pool_deconv_and_crop(tmp_path):
    with pytest.raises(RuntimeError, match="Could not compute map"):  # two nets: no common ancestor
        coord_map_from_to(coord_net().deconv, coord_net().data)
    n = coord_net()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a.item(), b.item()) == (1, 1.0, 0.0)  # conv -1, pool -0.25 x2, deconv +1.5: aligned
    n = coord_net(pool=4, deconv_stride=4, pad=5)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    # conv +4 (pad 5 - 1), pool 4 (-1.5) / 4, deconv 4 x (... ) + 3.5: data sits at 6 in the deconv's output
    assert (ax, a.item(), b.item()) == (1, 1.0, -6.0)
    n.relu = L.ReLU(n.deconv)
    assert coord_map_from_to(n.relu, n.data) == coord_map_from_to(n.deconv, n.data)  # element-wise: identity
    n.crop = crop(n.deconv, n.data)
    (tmp_path / "fcn.prototxt").write_text(str(n.to_proto()))
    net = caffe.Net(str(tmp_path / "fcn.prototxt"), caffe.TEST)
    assert net.blobs["crop"].data.shape[2:] == (100, 100) and net.blobs["deconv"].data.shape[2:] == (112, 112)
    assert list(n.crop.fn.params["crop_param"]["offset"]) == [6]


def test_solver_share_weights_lr_nccl_and_ioerror(tmp_path, linear):
    net_text = LINEAR.replace('input: "data" input_shape { dim: 4 dim: 3 dim: 6 dim: 6 }',
                              'layer { name: "d" type: "DummyData" top: "data" top: "label" dummy_data_param {'
                              ' shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }')
    net_text = net_text.replace('type: "Softmax" bottom: "fc" top: "prob"',
                                'type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss"')
    (tmp_path / "train.prototxt").write_text(net_text)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path}/train.prototxt" base_lr: 0.1 lr_policy: "step" '
                                              'gamma: 0.5 stepsize: 2 display: 0 max_iter: 10')
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    assert solver.lr == pytest.approx(0.1)
    solver.step(3)
    assert solver.lr == pytest.approx(0.05)
    other = caffe.Net(*linear, caffe.TEST)
    solver.share_weights(other)
    solver.net.params["fc"][0].data[...] = 3.0
    np.testing.assert_array_equal(other.params["fc"][0].data, 3.0)
    with pytest.raises(EspressoError, match="NCCL"):
        caffe.NCCL(solver, b"uid")
    with pytest.raises(IOError, match="missing.prototxt: cannot read"):  # pycaffe raises IOError there
        caffe.Net(str(tmp_path / "missing.prototxt"), caffe.TEST)


def test_pycaffes_underscored_bindings(tmp_path):
    (tmp_path / "n.prototxt").write_text(
        'input: "x" input_shape { dim: 2 dim: 3 } input: "y" input_shape { dim: 2 }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 3 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "y" top: "loss" loss_weight: 2 }')
    net = caffe.Net(str(tmp_path / "n.prototxt"), caffe.TRAIN)
    net.blobs["x"].data[...] = [[1, 2, 3], [4, 5, 6]]
    net.blobs["y"].data[...] = [0, 2]
    names = list(net._blob_names)
    assert [names[i] for i in net._inputs] == ["x", "y"] and [names[i] for i in net._outputs] == ["loss"]
    assert net._blob_loss_weights == [0.0, 0.0, 0.0, 2.0]
    loss = net._forward(0, len(net.layers) - 1)
    assert loss == pytest.approx(2 * float(net.blobs["loss"].data))  # ForwardFromTo's weighted loss
    net._backward(len(net.layers) - 1, 0)
    assert np.abs(net.params["ip"][0].diff).sum() > 0
    with pytest.raises(caffe.BackendError, match="lives on the CPU"):
        _ = net.blobs["x"]._gpu_data_ptr


@gpu_test
def test_classifier_python_layers_and_device_pointers_on_a_gpu(linear, rng, tmp_path):
    images = [rng.random((8, 10, 3)).astype(np.float32) for _ in range(2)]
    expected = caffe.Classifier(*linear, image_dims=(8, 10), raw_scale=255.0).predict(images)
    (tmp_path / "ten.py").write_text("import espresso\nclass Ten(espresso.Layer):\n"
                                     "    def reshape(self, b, t): t[0].reshape(*b[0].data.shape)\n"
                                     "    def forward(self, b, t): t[0].data[...] = 10 * b[0].data\n")
    sys.path.insert(0, str(tmp_path))
    caffe.set_mode_gpu()
    try:
        clf = caffe.Classifier(*linear, image_dims=(8, 10), raw_scale=255.0)
        np.testing.assert_allclose(clf.predict(images), expected, rtol=1e-4, atol=1e-6)
        assert clf.blobs["data"]._gpu_data_ptr != clf.blobs["data"]._gpu_diff_ptr
        net = caffe.Net(parse_python_net(), caffe.TEST, allow_python=True)
        net.blobs["x"].data[...] = [1.0, 2.0]
        assert net.forward()["y"].tolist() == [10.0, 20.0] and type(net.layers[1]).__name__ == "Ten"
    finally:
        caffe.set_mode_cpu()
        sys.path.remove(str(tmp_path))


def parse_python_net():
    from espresso.proto import caffe_pb2
    from espresso.proto.text import parse_text

    return parse_text('input: "x" input_shape { dim: 2 } layer { name: "ten" type: "Python" bottom: "x" top: "y" '
                      'python_param { module: "ten" layer: "Ten" } }', caffe_pb2.NetParameter())
