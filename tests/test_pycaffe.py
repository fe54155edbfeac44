"""Ordinary pycaffe code, as in Caffe's "learning LeNet" notebook, with `import espresso as caffe`."""

from pathlib import Path

import numpy as np

import espresso as caffe
from espresso import layers as L
from espresso import params as P
from espresso.data.fmnist import make_fmnist_lmdbs

SUBSET = Path(__file__).resolve().parents[1] / "espresso" / "datasets" / "fmnist_subset"


def lenet(lmdb, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def test_learning_lenet_notebook(tmp_path):
    train_db, test_db, _ = make_fmnist_lmdbs(tmp_path, SUBSET)
    (tmp_path / "train.prototxt").write_text(str(lenet(str(train_db), 64)))
    (tmp_path / "test.prototxt").write_text(str(lenet(str(test_db), 100)))
    (tmp_path / "solver.prototxt").write_text(
        f'train_net: "{tmp_path}/train.prototxt"\ntest_net: "{tmp_path}/test.prototxt"\n'
        "test_iter: 10\ntest_interval: 500\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n"
        'lr_policy: "inv"\ngamma: 0.0001\npower: 0.75\ndisplay: 0\nmax_iter: 10000\nsnapshot: 0\n'
        f'snapshot_prefix: "{tmp_path}/lenet"\nrandom_seed: 3\n')
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    assert [(k, v.data.shape) for k, v in solver.net.blobs.items()][:2] == [("data", (64, 1, 28, 28)),
                                                                           ("label", (64,))]
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()][0] == ("conv1", (20, 1, 5, 5))
    solver.net.forward()
    solver.test_nets[0].forward()
    solver.step(1)
    assert np.abs(solver.net.params["conv1"][0].diff[:, 0]).sum() > 0
    train_loss = np.zeros(100)
    for it in range(100):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
    assert train_loss[-10:].mean() < 0.7 * train_loss[:10].mean()
    correct = 0
    for _ in range(10):
        solver.test_nets[0].forward()
        correct += sum(solver.test_nets[0].blobs["score"].data.argmax(1) == solver.test_nets[0].blobs["label"].data)
    assert correct / 1000 > 0.6
