"""The nets `espresso bench` measures, written with NetSpec (layer for layer as Caffe's model
zoo defines them; no file needed): LeNet, LeNet-300-100, CaffeNet, GoogLeNet (BVLC's, without
the auxiliary classifiers, as its deploy net) and ResNet-50 (He et al.'s Caffe release:
BatchNorm + Scale after each convolution).  Each is built for a batch size, for training (an
Input layer feeds data and labels, SoftmaxWithLoss on top) or for inference (Softmax on top).
The Deep-Compressed LeNet and LeNet-300-100 are the dense nets with weights from a compressed
model file (.espz)."""

from pathlib import Path

from espresso.net_spec import NetSpec
from espresso.net_spec import layers as L
from espresso.net_spec import params as P

ROOT = Path(__file__).resolve().parents[2]
XAVIER, CONST = dict(type="xavier"), dict(type="constant")
# the compressed models: the demo's shipped LeNet, and the 55x LeNet-300-100 of the results
COMPRESSED = {"lenet_dc": ("lenet", Path(__file__).resolve().parents[1] / "demo" / "model" / "lenet_fmnist.espz"),
              "lenet300_dc": ("lenet300", ROOT / "benchmarks" / "results" / "compress" / "lenet_300_100.espz")}


def conv(bottom, num_output, kernel, stride=1, pad=0, group=1, bias=True):
    return L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad, group=group,
                         bias_term=bias, weight_filler=XAVIER, bias_filler=CONST)


def fc(bottom, num_output):
    return L.InnerProduct(bottom, num_output=num_output, weight_filler=XAVIER, bias_filler=CONST)


def max_pool(bottom, kernel, stride, pad=0):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=kernel, stride=stride, pad=pad)


def lenet(n, data):
    n.conv1 = conv(data, 20, 5)
    n.pool1 = max_pool(n.conv1, 2, 2)
    n.conv2 = conv(n.pool1, 50, 5)
    n.pool2 = max_pool(n.conv2, 2, 2)
    n.ip1 = fc(n.pool2, 500)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = fc(n.relu1, 10)
    return n.ip2


def lenet300(n, data):
    n.ip1 = fc(data, 300)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = fc(n.relu1, 100)
    n.relu2 = L.ReLU(n.ip2, in_place=True)
    n.ip3 = fc(n.relu2, 10)
    return n.ip3


def caffenet(n, data):
    top = data
    for i, (out, kernel, stride, pad, group, pool) in enumerate(
            [(96, 11, 4, 0, 1, True), (256, 5, 1, 2, 2, True), (384, 3, 1, 1, 1, False),
             (384, 3, 1, 1, 2, False), (256, 3, 1, 1, 2, True)], 1):
        n[f"conv{i}"] = conv(top, out, kernel, stride, pad, group)
        top = n[f"relu{i}"] = L.ReLU(n[f"conv{i}"], in_place=True)
        if pool:
            top = n[f"pool{i}"] = max_pool(top, 3, 2)
            if i < 3:
                top = n[f"norm{i}"] = L.LRN(top, local_size=5, alpha=1e-4, beta=0.75)
    for i in (6, 7):
        n[f"fc{i}"] = fc(top, 4096)
        n[f"relu{i}"] = L.ReLU(n[f"fc{i}"], in_place=True)
        top = n[f"drop{i}"] = L.Dropout(n[f"relu{i}"], dropout_ratio=0.5, in_place=True)
    n.fc8 = fc(top, 1000)
    return n.fc8


def _inception(n, name, bottom, c1, c3r, c3, c5r, c5, pool_proj):
    branches = []
    for suffix, layers in (("1x1", [(c1, 1, 0)]), ("3x3", [(c3r, 1, 0), (c3, 3, 1)]),
                           ("5x5", [(c5r, 1, 0), (c5, 5, 2)])):
        top = bottom
        for k, (out, kernel, pad) in enumerate(layers):
            label = f"{name}/{suffix}" if k == len(layers) - 1 else f"{name}/{suffix}_reduce"
            n[label] = conv(top, out, kernel, pad=pad)
            top = n[f"{label}_relu"] = L.ReLU(n[label], in_place=True)
        branches.append(top)
    n[f"{name}/pool"] = max_pool(bottom, 3, 1, 1)
    n[f"{name}/pool_proj"] = conv(n[f"{name}/pool"], pool_proj, 1)
    branches.append(L.ReLU(n[f"{name}/pool_proj"], in_place=True))
    n[f"{name}/pool_proj_relu"] = branches[-1]  # (named after it is made: NetSpec names by assignment)
    n[f"{name}/output"] = L.Concat(*branches)
    return n[f"{name}/output"]


GOOGLENET_BLOCKS = [("3a", 64, 96, 128, 16, 32, 32), ("3b", 128, 128, 192, 32, 96, 64), "pool3",
                    ("4a", 192, 96, 208, 16, 48, 64), ("4b", 160, 112, 224, 24, 64, 64),
                    ("4c", 128, 128, 256, 24, 64, 64), ("4d", 112, 144, 288, 32, 64, 64),
                    ("4e", 256, 160, 320, 32, 128, 128), "pool4",
                    ("5a", 256, 160, 320, 32, 128, 128), ("5b", 384, 192, 384, 48, 128, 128)]


def googlenet(n, data):
    n["conv1/7x7_s2"] = conv(data, 64, 7, 2, 3)
    n["conv1/relu_7x7"] = L.ReLU(n["conv1/7x7_s2"], in_place=True)
    n["pool1/3x3_s2"] = max_pool(n["conv1/relu_7x7"], 3, 2)
    n["pool1/norm1"] = L.LRN(n["pool1/3x3_s2"], local_size=5, alpha=1e-4, beta=0.75)
    n["conv2/3x3_reduce"] = conv(n["pool1/norm1"], 64, 1)
    n["conv2/relu_3x3_reduce"] = L.ReLU(n["conv2/3x3_reduce"], in_place=True)
    n["conv2/3x3"] = conv(n["conv2/relu_3x3_reduce"], 192, 3, pad=1)
    n["conv2/relu_3x3"] = L.ReLU(n["conv2/3x3"], in_place=True)
    n["conv2/norm2"] = L.LRN(n["conv2/relu_3x3"], local_size=5, alpha=1e-4, beta=0.75)
    top = n["pool2/3x3_s2"] = max_pool(n["conv2/norm2"], 3, 2)
    for block in GOOGLENET_BLOCKS:
        if isinstance(block, str):
            top = n[f"{block}/3x3_s2"] = max_pool(top, 3, 2)
        else:
            top = _inception(n, f"inception_{block[0]}", top, *block[1:])
    n["pool5/7x7_s1"] = L.Pooling(top, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n["pool5/drop_7x7_s1"] = L.Dropout(n["pool5/7x7_s1"], dropout_ratio=0.4, in_place=True)
    n["loss3/classifier"] = fc(n["pool5/drop_7x7_s1"], 1000)
    return n["loss3/classifier"]


def _conv_bn(n, name, bottom, out, kernel, stride, pad, train, relu=True):
    n[name] = conv(bottom, out, kernel, stride, pad, bias=False)
    n[f"bn_{name}"] = L.BatchNorm(n[name], use_global_stats=not train, in_place=True)
    top = n[f"scale_{name}"] = L.Scale(n[f"bn_{name}"], bias_term=True, in_place=True)
    if relu:
        top = n[f"{name}_relu"] = L.ReLU(top, in_place=True)
    return top


def resnet50(n, data, train):
    top = _conv_bn(n, "conv1", data, 64, 7, 2, 3, train)
    top = n.pool1 = max_pool(top, 3, 2)
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], 2):
        for b in range(blocks):
            name, stride = f"res{stage}{'abcdef'[b]}", (2 if b == 0 and stage > 2 else 1)
            shortcut = top
            if b == 0:
                shortcut = _conv_bn(n, f"{name}_branch1", top, 4 * width, 1, stride, 0, train, relu=False)
            branch = _conv_bn(n, f"{name}_branch2a", top, width, 1, stride, 0, train)
            branch = _conv_bn(n, f"{name}_branch2b", branch, width, 3, 1, 1, train)
            branch = _conv_bn(n, f"{name}_branch2c", branch, 4 * width, 1, 1, 0, train, relu=False)
            n[name] = L.Eltwise(shortcut, branch)
            top = n[f"{name}_relu"] = L.ReLU(n[name], in_place=True)
    n.pool5 = L.Pooling(top, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n.fc1000 = fc(n.pool5, 1000)
    return n.fc1000


# name -> (builder, input shape per item, whether the builder takes `train`)
MODELS = {"lenet": (lenet, (1, 28, 28)), "lenet300": (lenet300, (1, 28, 28)),
          "caffenet": (caffenet, (3, 227, 227)), "googlenet": (googlenet, (3, 224, 224)),
          "resnet50": (resnet50, (3, 224, 224))}


def net_param(model, batch, train):
    """The NetParameter of `model` (a MODELS or COMPRESSED name) at `batch`, for training
    (data and label inputs, SoftmaxWithLoss) or inference (data input, Softmax)."""
    builder, shape = MODELS[COMPRESSED[model][0] if model in COMPRESSED else model]
    n = NetSpec()
    if train:
        n.data, n.label = L.Input(shape=[dict(dim=[batch, *shape]), dict(dim=[batch])], ntop=2)
    else:
        n.data = L.Input(shape=dict(dim=[batch, *shape]))
    logits = builder(n, n.data, train) if builder is resnet50 else builder(n, n.data)
    if train:
        n.loss = L.SoftmaxWithLoss(logits, n.label)
    else:
        n.prob = L.Softmax(logits)
    param = n.to_proto()
    param.name = model
    return param


def classes(model):
    return 10 if model.startswith("lenet") else 1000
