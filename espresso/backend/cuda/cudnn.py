"""2-D convolutions through cuDNN's convolution API (as Caffe's CuDNNConvolutionLayer), called
through ctypes with the backend's own handles, streams and workspaces, so that they can be
captured in a CUDA graph like the rest of an iteration.

cuDNN is optional: the system's libcudnn.so.9, or the one the `cudnn13` extra installs
(nvidia-cudnn-cu13's nvidia/cudnn/lib).  Without it, with ESPRESSO_CUDNN=0, or in deterministic
mode, convolutions run as im2col + GEMM.  A plan lists cuDNN's candidate algorithms per
direction (its heuristics' order, workspace up to `workspace_limit`); the layer times them on its
own blobs and keeps the fastest, or of those timed within 5% of it the one of least workspace
(espresso/layers/vision.py).  Unless TF32 is allowed, plans use
FMA math: float32 products and sums, as PyTorch with allow_tf32 off.

Numerics policy (docs/gpu_numerics.md): cuDNN's algorithms fall into three classes by how they
sum: "gemm" (implicit, precomputed and explicit GEMM, direct, the gradients' ALGO_0/1/3) adds
the float32 products themselves; "fft" and "winograd" multiply transformed tiles.  Measured on
an H100 against exact results (relative L2 error), gemm and fft stay within 7e-7 and Winograd
within 3e-6 on 3x3 kernels, but Winograd's 9x9 tiles for 5x5 kernels reach 3e-4 to 9e-4.  The
default policy, "all", lists every algorithm (those tiles make CaffeNet's training 1.56x faster:
22.7 against 35.5 ms); ESPRESSO_CONV_ALGOS=accurate (or `backend.cudnn.set_policy("accurate")`)
lists all but Winograd on kernels larger than 3x3, for results within 1e-5 of the exact ones.
"""

import ctypes
import importlib.util
import math
import os

import numpy as np

from espresso import graphs
from espresso.backend.cuda.blas import call_failed
from espresso.errors import BackendError, GraphCaptureError

FMA_MATH, TENSOR_OP_MATH = 3, 1  # cudnnMathType_t
# the forward algorithm whose kernel adds a bias itself (cudnnConvolutionBiasActivationForward with
# the identity activation runs with it alone): IMPLICIT_PRECOMP_GEMM
FUSED_BIAS_ALGO = 1
IDENTITY, NOT_PROPAGATE_NAN = 5, 0  # cudnnActivationMode_t, cudnnNanPropagation_t
CROSS_CORRELATION, NCHW = 1, 0
# CaffeNet's Winograd convolutions need up to 530 MB; larger workspaces bought little there
WORKSPACE_LIMIT = 640 << 20
# and a candidate may take at most WORKSPACE_RATIO times its operands' bytes (WORKSPACE_FLOOR at
# least): small convolutions gain nothing from big workspaces, which only raised the memory peak
# (CaffeNet's batch-1 inference held 864 MiB against PyTorch's 468).  CaffeNet's chosen algorithms
# took up to 3.5x (Winograd on 13x13 maps); its FFTs on those maps, 6.8-7.3x, were 3-4x slower
# than Winograd there and set a first run's peak (H100, benchmarks/results/perf16_h100/)
WORKSPACE_RATIO, WORKSPACE_FLOOR = 6, 16 << 20
# im2col + GEMM, the layer's own or cuDNN's explicit-GEMM forward (im2col into its workspace),
# is timed where cuDNN is only up to this many bytes of columns (Convolution.timed_columns):
# larger convolutions ran 1.3-5x faster in cuDNN's other algorithms (CaffeNet on an H100), and
# the columns set a first run's peak (CaffeNet's conv2 at batch 64: 427 MiB and 1.16 ms, against
# Winograd's 139 MiB and 0.26 ms)
EXPLICIT_GEMM, TIMED_COLUMNS = 2, 64 << 20
# the side stream's workspace (filter gradients computed aside, concurrent with the main stream's
# work): larger needs keep the gradient on the main stream rather than hold a second big buffer
SIDE_WORKSPACE_LIMIT = 64 << 20
# cudnnDataType_t and the scalars' C type; the 16-bit types compute in float ("pseudo half")
_DATA_TYPE = {np.dtype(np.float32): (0, ctypes.c_float), np.dtype(np.float64): (1, ctypes.c_double),
              "float16": (2, ctypes.c_float), "bfloat16": (9, ctypes.c_float)}
_FLOAT = 0
# cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t -> class (the enums' values in cuDNN 9)
ALGORITHM_CLASS = {
    "Forward": {0: "gemm", 1: "gemm", 2: "gemm", 3: "gemm", 4: "fft", 5: "fft", 6: "winograd", 7: "winograd"},
    "BackwardData": {0: "gemm", 1: "gemm", 2: "fft", 3: "fft", 4: "winograd", 5: "winograd"},
    "BackwardFilter": {0: "gemm", 1: "gemm", 2: "fft", 3: "gemm", 4: "winograd", 5: "winograd", 6: "fft"},
}
POLICIES = ("all", "accurate")


def policy_from_environment():
    """ESPRESSO_CONV_ALGOS: "all" (the default) or "accurate"."""
    policy = os.environ.get("ESPRESSO_CONV_ALGOS", "").strip() or "all"
    if policy not in POLICIES:
        raise BackendError(f"ESPRESSO_CONV_ALGOS={policy!r}: give one of {', '.join(POLICIES)}")
    return policy


def allowed(policy, which, algo, kernel):
    """Whether `policy` lets direction `which` use algorithm `algo` on a kernel of shape `kernel`."""
    return policy == "all" or ALGORITHM_CLASS[which].get(algo) != "winograd" or max(kernel) <= 3


class _Perf(ctypes.Structure):  # cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t (same layout)
    _fields_ = [("algo", ctypes.c_int), ("status", ctypes.c_int), ("time", ctypes.c_float),
                ("memory", ctypes.c_size_t), ("determinism", ctypes.c_int), ("math", ctypes.c_int),
                ("reserved", ctypes.c_int * 3)]


def library():
    """libcudnn.so.9 from the nvidia-cudnn wheel when installed, else from the loader's path;
    None when neither exists or ESPRESSO_CUDNN=0."""
    if os.environ.get("ESPRESSO_CUDNN", "1") in ("", "0"):
        return None
    spec = importlib.util.find_spec("nvidia")
    roots = (spec.submodule_search_locations or []) if spec else []
    for name in [os.path.join(root, "cudnn", "lib", "libcudnn.so.9") for root in roots] + ["libcudnn.so.9"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class Cudnn:
    """A cuDNN handle and workspace per stream (the backend's main and side streams; `use_side`
    switches); `plan(...)` gives the Convolution of one geometry."""

    def __init__(self, lib, backend):
        self.lib, self.backend, self.xp = lib, backend, backend.xp
        self.tf32, self._plans, self.on_side = False, {}, False
        self.policy = policy_from_environment()
        self.lanes = {False: [self._handle(backend.stream), self.xp.empty(0, np.uint8)],
                      True: [self._handle(backend.side), self.xp.empty(0, np.uint8)]}
        self.identity = ctypes.c_void_p()  # the activation of a forward that adds the bias itself
        self.call("cudnnCreateActivationDescriptor", ctypes.byref(self.identity))
        self.call("cudnnSetActivationDescriptor", self.identity, IDENTITY, NOT_PROPAGATE_NAN, ctypes.c_double(0))

    def _handle(self, stream):
        handle = ctypes.c_void_p()
        self.call("cudnnCreate", ctypes.byref(handle))
        self.call("cudnnSetStream", handle, ctypes.c_void_p(stream.ptr))
        return handle

    @property
    def handle(self):
        return self.lanes[self.on_side][0]

    @property
    def workspace(self):
        return self.lanes[self.on_side][1]

    def use_side(self, on):
        self.on_side = on

    def call(self, name, *args):
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise call_failed(self.lib, name, status, ("cudnnGetErrorString",))

    def set_tf32(self, allow):
        """TF32 tensor-core math allowed or not (FMA math, float32 semantics): every plan
        chooses its algorithms again."""
        self.tf32 = bool(allow)
        for plan in self._plans.values():
            plan.configure()

    def set_policy(self, policy):
        """Which algorithms plans may choose from ("all" or "accurate"); every plan lists its
        candidates again (layers already timed keep their choice until reshaped)."""
        if policy not in POLICIES:
            raise BackendError(f"unknown convolution algorithm policy {policy!r}: give one of {', '.join(POLICIES)}")
        self.policy = policy
        for plan in self._plans.values():
            plan.configure()

    def plan(self, image_shape, data_shape, weight_shape, stride, pad, dilation, group, dtype):
        """The Convolution from image (n, Ci, H, W) to data (n, Cd, H', W') with weights
        (Cd, Ci/group, kh, kw), made once per geometry (descriptors live as long as the handle)."""
        key = (image_shape, data_shape, weight_shape, stride, pad, dilation, group,
               dtype if dtype in _DATA_TYPE else np.dtype(dtype))  # (a 16-bit type by name)
        if key not in self._plans:
            self._plans[key] = Convolution(self, *key)
        return self._plans[key]

    def grow_workspace(self, nbytes, side=False):
        """Grow the main (or side) stream's workspace to at least nbytes.  It moves, so graphs
        captured with the old one are void; not while a graph is captured, whose kernels queued
        so far hold the old one (the capture fails: its pass runs eagerly, which grows it)."""
        if nbytes > self.lanes[side][1].nbytes:
            if self.backend.capturing:
                raise GraphCaptureError("a cuDNN workspace would grow inside the capture")
            self._replace_workspace(side, nbytes)

    def workspace_sizes(self):
        """(main, side): the bytes each stream's workspace holds."""
        return self.lanes[False][1].nbytes, self.lanes[True][1].nbytes

    def resize_workspaces(self, sizes):
        """Give the (main, side) workspaces `sizes` bytes, after the work queued so far.  A
        layer's timing starts each direction's candidates with none, since a lane keeps the
        largest candidate tried (LeNet b256's side lane 42.5 MiB against the 12.2 chosen), which
        stayed on top of the next candidates in a first run's peak.  It ends with what they held
        before: the layers chosen earlier run with them, so the first run's eager pass ends with
        every chosen workspace in place and its graph capture grows none."""
        changed = [side for side, size in zip((False, True), sizes) if self.lanes[side][1].nbytes != size]
        if changed:
            self.backend.device.synchronize()  # no queued work may still use them
        for side in changed:
            self._replace_workspace(side, sizes[side])

    def _replace_workspace(self, side, nbytes):
        self.lanes[side][1] = None  # the old one goes back to the device first, not after
        self.xp.get_default_memory_pool().free_all_blocks()
        self.lanes[side][1] = self.xp.empty(nbytes, np.uint8)
        graphs.invalidate(self.backend)


class Convolution:
    """Descriptors and algorithms of one convolution.  Arrays are C-contiguous, of the planned
    shapes; work is queued on the handle's stream.  Gradients accumulate (beta = 1), as Caffe's
    param diffs do.  A bias lies on either side: "data" (Convolution) or "image" (Deconvolution)."""

    timed_columns = TIMED_COLUMNS  # (the layer's own im2col + GEMM is timed up to this too)

    def __init__(self, cudnn, image_shape, data_shape, weight_shape, stride, pad, dilation, group, dtype):
        self.cudnn = cudnn
        # what the timed choices' cache knows this convolution by (JSON values)
        self.key = (image_shape, data_shape, weight_shape, stride, pad, dilation, group, str(dtype))
        type_code, self.scalar = _DATA_TYPE[dtype]
        self.half = isinstance(dtype, str)  # 16-bit operands: float accumulation on tensor cores
        self.tensor = {side: self._tensor(type_code, shape) for side, shape in
                       (("image", image_shape), ("data", data_shape))}
        self.bias = {side: self._tensor(type_code, (1, shape[1], 1, 1)) for side, shape in
                     (("image", image_shape), ("data", data_shape))}
        self.weights, self.kernel = self._descriptor("Filter"), weight_shape[2:]
        operands = (math.prod(image_shape) + math.prod(data_shape) + math.prod(weight_shape)) * (
            2 if self.half else np.dtype(dtype).itemsize)
        self.workspace_limit = min(WORKSPACE_LIMIT, max(WORKSPACE_FLOOR, WORKSPACE_RATIO * operands))
        cudnn.call("cudnnSetFilter4dDescriptor", self.weights, type_code, NCHW, *weight_shape)
        self.fuses_bias = not self.half  # until cuDNN refuses it
        self.conv = self._descriptor("Convolution")
        cudnn.call("cudnnSetConvolution2dDescriptor", self.conv, *pad, *stride, *dilation, CROSS_CORRELATION,
                   _FLOAT if self.half else type_code)
        cudnn.call("cudnnSetConvolutionGroupCount", self.conv, group)
        self.configure()

    def configure(self):
        """Set the math type; each direction's candidate algorithms are listed again when next
        used (options), the first (the heuristics' favourite) used until the layer has timed them."""
        tensor_cores = self.cudnn.tf32 or self.half
        self.cudnn.call("cudnnSetConvolutionMathType", self.conv, TENSOR_OP_MATH if tensor_cores else FMA_MATH)
        self.candidates, self.algo = {}, {}

    def options(self, which):
        """[(algorithm, workspace bytes)] of direction `which` ("Forward", "BackwardData",
        "BackwardFilter"), listed on first use."""
        if which not in self.candidates:
            image, data = self.tensor["image"], self.tensor["data"]
            operands = {"Forward": (image, self.weights, self.conv, data),
                        "BackwardData": (self.weights, data, self.conv, image),
                        "BackwardFilter": (image, data, self.conv, self.weights)}[which]
            self.candidates[which] = self._candidates(which, *operands)
            self.algo[which] = self.candidates[which][0]
        return self.candidates[which]

    def chosen(self, which):
        """(algorithm, workspace bytes) that direction `which` runs with."""
        self.options(which)
        return self.algo[which]

    def _descriptor(self, kind):
        desc = ctypes.c_void_p()
        self.cudnn.call(f"cudnnCreate{kind}Descriptor", ctypes.byref(desc))
        return desc

    def _tensor(self, type_code, shape):
        desc = self._descriptor("Tensor")
        self.cudnn.call("cudnnSetTensor4dDescriptor", desc, NCHW, type_code, *shape)
        return desc

    def _candidates(self, which, *descs):
        """[(algorithm, workspace bytes)] that cuDNN supports here and the policy allows, in its
        heuristics' order."""
        perf, count, c, options = (_Perf * 16)(), ctypes.c_int(), self.cudnn, {}
        c.call(f"cudnnGetConvolution{which}Algorithm_v7", c.handle, *descs, 16, ctypes.byref(count), perf)
        for p in perf[: count.value]:
            if p.status == 0 and p.algo not in options and allowed(c.policy, which, p.algo, self.kernel):
                size = ctypes.c_size_t()
                c.call(f"cudnnGetConvolution{which}WorkspaceSize", c.handle, *descs, p.algo, ctypes.byref(size))
                wide_gemm = which == "Forward" and p.algo == EXPLICIT_GEMM and size.value > TIMED_COLUMNS
                if size.value <= self.workspace_limit and not wide_gemm:
                    options[p.algo] = size.value
        if not options:
            raise BackendError(f"cuDNN offers no {which} algorithm for this convolution")
        return list(options.items())

    def _run(self, which, operands, out, accumulate, function=None):
        c, (algo, size) = self.cudnn, self.chosen(which)
        if not c.on_side:  # (the side's is grown by backend.aside, which knows when it is free)
            # sized for what runs, not for every candidate listed: with the timed choices taken
            # from the cache, the untried candidates' workspaces are never allocated
            c.grow_workspace(size)
        alpha, beta = self.scalar(1), self.scalar(1 if accumulate else 0)
        c.call(function or f"cudnnConvolution{which}", c.handle, ctypes.byref(alpha), *operands, self.conv, algo,
               _ptr(c.workspace), ctypes.c_size_t(size), ctypes.byref(beta), *out)

    def forward(self, x, w, y, bias=None):
        """y (data side) = w * x (image side), plus bias per channel unless None: in the
        convolution's own kernel where the chosen algorithm adds it (the same sum, rounded once
        and the bias added: one launch less), else by cudnnAddTensor after."""
        operands = (self.tensor["image"], _ptr(x), self.weights, _ptr(w))
        if bias is not None and self.fuses_bias and self.chosen("Forward")[0] == FUSED_BIAS_ALGO:
            data = self.tensor["data"]
            try:  # y = identity(conv + 0 * z + bias), z = y (with alpha2 0, cuDNN does not read it)
                self._run("Forward", operands, (data, _ptr(y), self.bias["data"], _ptr(bias), self.cudnn.identity,
                                                data, _ptr(y)), False, "cudnnConvolutionBiasActivationForward")
                return
            except BackendError:  # refused (checked before any launch): the two calls from now on
                self.fuses_bias = False
        self._run("Forward", operands, (self.tensor["data"], _ptr(y)), accumulate=False)
        if bias is not None:
            self.add_bias(bias, y, "data")

    def backward_data(self, w, dy, dx):
        """dx (image side) = w^T * dy (data side)."""
        self._run("BackwardData", (self.weights, _ptr(w), self.tensor["data"], _ptr(dy)),
                  (self.tensor["image"], _ptr(dx)), accumulate=False)

    def backward_filter(self, x, dy, dw):
        """dw += x (*) dy, summed over the batch."""
        self._run("BackwardFilter", (self.tensor["image"], _ptr(x), self.tensor["data"], _ptr(dy)),
                  (self.weights, _ptr(dw)), accumulate=True)

    def add_bias(self, bias, y, side):
        """y += bias per channel of `side`.  (An elementwise kernel of our own saved 0.4 us a
        call on LeNet but, indexing by division, took CaffeNet's training from 21.9 to 22.7 ms;
        back on cuDNN's it is 21.9 again: cuDNN's stays.)"""
        one, c = self.scalar(1), self.cudnn
        c.call("cudnnAddTensor", c.handle, ctypes.byref(one), self.bias[side], _ptr(bias), ctypes.byref(one),
               self.tensor[side], _ptr(y))


def _ptr(array):
    return ctypes.c_void_p(array.data.ptr)
