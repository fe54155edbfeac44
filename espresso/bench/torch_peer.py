"""PyTorch as the peer `espresso bench --compare torch` measures beside Espresso: the same Caffe
net as a torch.nn.Module (built layer by layer from the NetParameter, with Espresso's initial
weights), trained with torch.optim.SGD at the same settings, eagerly and, on a GPU, as one CUDA
graph of the whole step.  PyTorch is a peer here only: importing this module needs it, nothing
else in Espresso does.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.001, 0.9, 5e-4


def _conv(lp, shapes):
    p = lp.convolution_param
    one = lambda values, default: int(values[0]) if len(values) else default  # noqa: E731
    m = nn.Conv2d(shapes[lp.bottom[0]][1], p.num_output, one(p.kernel_size, 1), one(p.stride, 1),
                  one(p.pad, 0), one(p.dilation, 1), p.group, p.bias_term)
    return m, lambda x: m(x)


def _pool(lp, shapes):
    p = lp.pooling_param
    if p.global_pooling:
        pool = F.adaptive_max_pool2d if p.pool == p.MAX else F.adaptive_avg_pool2d
        return None, lambda x: pool(x, 1)
    kind = nn.MaxPool2d if p.pool == p.MAX else nn.AvgPool2d
    m = kind(p.kernel_size, p.stride, p.pad, ceil_mode=True)  # Caffe's ceil rounding
    return m, m


def _ip(lp, shapes):
    p = lp.inner_product_param
    m = nn.Linear(int(np.prod(shapes[lp.bottom[0]][1:])), p.num_output, p.bias_term)
    return m, lambda x: m(x.flatten(1))


def _batch_norm(lp, shapes):
    p = lp.batch_norm_param
    m = nn.BatchNorm2d(shapes[lp.bottom[0]][1], eps=p.eps, momentum=1 - p.moving_average_fraction, affine=False)
    return m, m


def _scale(lp, shapes):
    m = nn.Module()
    channels = shapes[lp.bottom[0]][1]
    m.weight = nn.Parameter(torch.ones(channels))
    m.bias = nn.Parameter(torch.zeros(channels)) if lp.scale_param.bias_term else None
    view = (1, channels, 1, 1)
    if m.bias is None:
        return m, lambda x: x * m.weight.view(view)
    return m, lambda x: torch.addcmul(m.bias.view(view), x, m.weight.view(view))


LAYERS = {
    "Convolution": _conv, "Pooling": _pool, "InnerProduct": _ip, "BatchNorm": _batch_norm, "Scale": _scale,
    "ReLU": lambda lp, s: (None, lambda x: F.relu(x, inplace=lp.bottom[0] == lp.top[0])),
    "LRN": lambda lp, s: (None, nn.LocalResponseNorm(lp.lrn_param.local_size, lp.lrn_param.alpha,
                                                     lp.lrn_param.beta, lp.lrn_param.k)),
    "Dropout": lambda lp, s: (nn.Dropout(lp.dropout_param.dropout_ratio),) * 2,
    "Softmax": lambda lp, s: (None, lambda x: F.softmax(x, 1)),
    "Concat": lambda lp, s: (None, lambda *xs: torch.cat(xs, lp.concat_param.axis)),
    "Eltwise": lambda lp, s: (None, lambda a, b: a + b),
    "SoftmaxWithLoss": lambda lp, s: (None, lambda x, label: F.cross_entropy(x, label.long())),
}


class CaffeModule(nn.Module):
    """A Caffe net (Input layers feeding named inputs) as a torch module: forward(**inputs)
    returns its last layer's output (the loss, when training)."""

    def __init__(self, net_param, shapes):
        super().__init__()
        self.steps, self.inputs = [], []
        for lp in net_param.layer:
            if lp.type == "Input":
                self.inputs += list(lp.top)
                continue
            if lp.type not in LAYERS or (lp.type == "Eltwise" and lp.eltwise_param.operation != 1):
                raise NotImplementedError(f"the PyTorch peer has no '{lp.type}' layer")
            module, run = LAYERS[lp.type](lp, shapes)
            if module is not None:
                self.add_module(lp.name.replace("/", "_").replace(".", "_"), module)
            self.steps.append((run, list(lp.bottom), lp.top[0], lp.name))

    def forward(self, **inputs):
        blobs = dict(inputs)
        for run, bottoms, top, _ in self.steps:
            blobs[top] = run(*(blobs[b] for b in bottoms))
        return blobs[self.steps[-1][2]]

    def copy_from(self, net):
        """Espresso's initial weights (same layouts: OIHW kernels, out x in matrices)."""
        with torch.no_grad():
            for name, blobs in net.params.items():
                module = getattr(self, name.replace("/", "_").replace(".", "_"), None)
                tensors = [t for t in (getattr(module, "weight", None), getattr(module, "bias", None)) if t is not None]
                for tensor, blob in zip(tensors, blobs):
                    tensor.copy_(torch.from_numpy(np.asarray(blob.data).reshape(tuple(tensor.shape))))


class TorchCase:
    """One PyTorch case: step(n) runs n iterations (training steps or forwards) eagerly, or as
    replays of one CUDA graph when graph=True."""

    def __init__(self, net_param, net, inputs, train, device, graph=False):
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        # strict float32 like Espresso's default: PyTorch's cuDNN convolutions default to TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        shapes = {name: blob.shape for name, blob in net.blobs.items()}
        self.model = CaffeModule(net_param, shapes).to(self.device)
        self.model.copy_from(net)
        self.model.train(train)
        self.train = train
        self.inputs = {name: torch.from_numpy(inputs[name]).to(self.device) for name in self.model.inputs}
        if train:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                             weight_decay=WEIGHT_DECAY)
        self.graph = self._capture() if graph else None

    def _once(self):
        if not self.train:
            with torch.inference_mode():
                return self.model(**self.inputs)
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.model(**self.inputs)
        loss.backward()
        self.optimizer.step()
        return loss

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as CUDA graphs need
                self._once()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._once()
        return graph

    def step(self, n):
        for _ in range(n):
            self.graph.replay() if self.graph is not None else self._once()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_memory(self):
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
