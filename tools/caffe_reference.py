"""Reference arrays from real BVLC Caffe, for tests/test_caffe_reference.py.

Runs INSIDE the chroot of tools/real_caffe.sh (real pycaffe, python3.9, numpy 1.19):

    bash tools/real_caffe.sh python3 tools/caffe_reference.py [NAME ...]

For each small net below: fill the weights with Caffe's fillers (fixed seed), feed random
inputs through Input layers, forward, then backward from random top diffs (loss tops carry
their loss weights), and save into tests/data/caffe_reference/NAME.npz:
  proto, phase, backward         the net (text), its phase and whether backward ran
  in/B, outdiff/B                 input blobs, the diffs fed to non-loss outputs
  param/L/i, pafter/L/i, pdiff/L/i  weights before the forward (and after, where the forward
                                  changed them: BatchNorm), param diffs
  blob/B, diff/B                  every blob's data and diff after forward and backward
For each solver: the tiny net, its initial weights, the weights after each of STEPS steps
(w/K/L/i) and the loss of each step.  Everything float32, as Caffe computes it.
And, where it exists, the LeNet real Caffe trained (benchmarks/results/real_caffe/) on 16
test images of the embedded subset: its scores and probabilities, in lenet_iter_10000_outputs.npz
beside it.
"""

import gzip
import os
import sys
import tempfile

import caffe
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "caffe_reference")
LENET = "benchmarks/results/real_caffe/lenet_iter_10000.caffemodel"  # trained by real Caffe
SEED = 1701
STEPS = 5
G = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


def inputs(**shapes):
    names = "".join(f' top: "{n}"' for n in shapes)
    dims = "".join(" shape {%s }" % "".join(f" dim: {d}" for d in s) for s in shapes.values())
    return f'layer {{ name: "input" type: "Input"{names} input_param {{{dims} }} }}\n'


def layer(name, type_, bottoms, tops=None, params=""):
    bottoms = "".join(f' bottom: "{b}"' for b in bottoms.split())
    tops = "".join(f' top: "{t}"' for t in (name if tops is None else tops).split())
    return f'layer {{ name: "{name}" type: "{type_}"{bottoms}{tops} {params} }}\n'


def conv(name, bottom, params, type_="Convolution", top=None):
    return layer(name, type_, bottom, top, f"convolution_param {{ {params} {G} }}")


# name: (net text, {input: kind}, options); kinds: "g" gaussian (default), "u" uniform(0.05, 1),
# "iK" integer labels in [0, K), an array: fixed values.  Options: phase, backward (default True),
# force (force_backward, default True), init {layer: [arrays]} to overwrite filled weights.
NETS = {
    "conv": (inputs(x=(2, 4, 7, 7)) +
             conv("c_group", "x", "num_output: 6 group: 2 kernel_size: 3 pad: 1 stride: 2") +
             conv("c_dil", "x", "num_output: 3 kernel_size: 3 dilation: 2 pad: 2") +
             conv("c_rect", "x", "num_output: 2 kernel_h: 2 kernel_w: 3 pad_h: 1 stride_h: 1 stride_w: 2 "
                                 "bias_term: false") +
             conv("c_1x1", "c_group", "num_output: 5 kernel_size: 1"), {}, {}),
    "deconv": (inputs(x=(2, 4, 3, 4)) +
               conv("d_group", "x", "num_output: 6 group: 2 kernel_size: 4 stride: 2 pad: 1", "Deconvolution") +
               conv("d_dil", "x", "num_output: 3 kernel_size: 3 dilation: 2 pad: 1", "Deconvolution") +
               conv("d_rect", "x", "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 bias_term: false",
                    "Deconvolution"), {}, {}),
    "pool": (inputs(x=(2, 3, 7, 8)) +
             layer("p_max", "Pooling", "x", params="pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }") +
             layer("p_ave", "Pooling", "x", params="pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }") +
             layer("p_max_ceil", "Pooling", "x", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }") +
             layer("p_ave_ceil", "Pooling", "x", params="pooling_param { pool: AVE kernel_size: 2 stride: 2 }") +
             layer("p_ave_pad", "Pooling", "x", params="pooling_param { pool: AVE kernel_size: 3 stride: 3 pad: 1 }") +
             layer("p_mask", "Pooling", "x", "p_mask p_argmax",
                   "pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 }") +
             layer("p_global", "Pooling", "x", params="pooling_param { pool: AVE global_pooling: true }") +
             layer("p_floor", "Pooling", "x",
                   params="pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR }"), {}, {}),
    "lrn": (inputs(x=(2, 7, 5, 5)) +
            layer("l_across", "LRN", "x", params="lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }") +
            layer("l_across3", "LRN", "x", params="lrn_param { local_size: 3 }") +
            layer("l_within", "LRN", "x",
                  params="lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.2 beta: 0.6 }"), {}, {}),
    "inner_product": (inputs(x=(2, 3, 4, 5)) +
                      layer("ip1", "InnerProduct", "x", params=f"inner_product_param {{ num_output: 6 {G} }}") +
                      layer("ip2", "InnerProduct", "x", params=f"inner_product_param {{ num_output: 4 axis: 2 {G} }}") +
                      layer("ip3", "InnerProduct", "x",
                            params=f"inner_product_param {{ num_output: 3 transpose: true {G} }}") +
                      layer("ip4", "InnerProduct", "x",
                            params=f"inner_product_param {{ num_output: 2 axis: -1 bias_term: false {G} }}"), {}, {}),
    "batchnorm": (inputs(x=(3, 4, 2, 3), s=(4, 2)) +
                  layer("bn_global", "BatchNorm", "x",
                        params="batch_norm_param { use_global_stats: true eps: 0.001 }") +
                  layer("bn_batch", "BatchNorm", "x",
                        params="batch_norm_param { use_global_stats: false moving_average_fraction: 0.9 }") +
                  layer("scale", "Scale", "bn_global", params='scale_param { bias_term: true filler { type: '
                                                              '"gaussian" } bias_filler { type: "gaussian" } }') +
                  layer("scale2", "Scale", "bn_batch s", params="scale_param { axis: 1 }") +
                  layer("bias", "Bias", "x", params='bias_param { filler { type: "gaussian" } }'),
                  {}, {"init": {"bn_global": [[0.3, -0.2, 0.5, 1.0], [0.8, 1.5, 0.4, 2.0], [2.5]],
                                "bn_batch": [[0.1, 0.2, 0.3, 0.4], [1.0, 1.1, 1.2, 1.3], [3.0]]}}),
    "batchnorm_train": (inputs(x=(4, 3, 2, 2)) + layer("bn", "BatchNorm", "x") +
                        conv("c", "x", "num_output: 3 kernel_size: 1", top="x2") +
                        layer("bn_inplace", "BatchNorm", "x2", "x2"), {}, {"phase": "TRAIN"}),
    "neuron": (inputs(x=(2, 3, 4, 5)) +
               layer("relu", "ReLU", "x", params="relu_param { negative_slope: 0.1 }") +
               layer("relu0", "ReLU", "x") +
               layer("prelu", "PReLU", "x", params='prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }') +
               layer("prelu_s", "PReLU", "x", params="prelu_param { channel_shared: true }") +
               layer("elu", "ELU", "x", params="elu_param { alpha: 0.5 }") +
               layer("sig", "Sigmoid", "x") + layer("tanh", "TanH", "x") +
               layer("pow", "Power", "x", params="power_param { power: 3 scale: 0.5 shift: 0.2 }") +
               layer("pow_half", "Power", "sig", params="power_param { power: 0.5 scale: 2 shift: 0.1 }") +
               layer("exp", "Exp", "x", params="exp_param { base: 2 scale: 0.5 shift: 0.1 }") +
               layer("exp_e", "Exp", "x") +
               layer("log", "Log", "sig", params="log_param { base: 10 scale: 2 shift: 0.5 }") +
               layer("log_e", "Log", "sig") + layer("abs", "AbsVal", "x") + layer("bnll", "BNLL", "x") +
               layer("drop", "Dropout", "x", params="dropout_param { dropout_ratio: 0.3 }") +
               layer("lin", "InnerProduct", "x", params=f"inner_product_param {{ num_output: 6 {G} }}") +
               layer("lin_relu", "ReLU", "lin", "lin"), {}, {}),
    "eltwise": (inputs(a=(2, 3, 4), b=(2, 3, 4), c=(2, 3, 4)) +
                layer("e_prod", "Eltwise", "a b c", params="eltwise_param { operation: PROD }") +
                layer("e_sum", "Eltwise", "a b c", params="eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }") +
                layer("e_max", "Eltwise", "a b c", params="eltwise_param { operation: MAX }") +
                layer("e_sum2", "Eltwise", "a b") +
                layer("e_prod2", "Eltwise", "a b",
                      params="eltwise_param { operation: PROD stable_prod_grad: false }"), {}, {}),
    "shape": (inputs(x=(2, 6, 3, 4), y=(2, 2, 3, 4), z=(1, 1, 2, 2), w=(1, 4, 1, 2)) +
              layer("slice", "Slice", "x", "s0 s1 s2", "slice_param { axis: 1 slice_point: 2 slice_point: 5 }") +
              layer("cat1", "Concat", "s2 s0 y") + layer("cat0", "Concat", "s0 s0", params="concat_param { axis: 0 }") +
              layer("slice0", "Slice", "x", "t0 t1", "slice_param { axis: 0 }") +
              layer("split", "Split", "t0", "u0 u1") + layer("flat", "Flatten", "u0") +
              layer("flat2", "Flatten", "u1", params="flatten_param { axis: 2 end_axis: -1 }") +
              layer("resh", "Reshape", "t1", params="reshape_param { shape { dim: 0 dim: -1 dim: 2 } }") +
              layer("resh2", "Reshape", "x", params="reshape_param { shape { dim: -1 dim: 1 } axis: 1 num_axes: 1 }") +
              layer("crop", "Crop", "x z", params="crop_param { axis: 2 offset: 1 }") +
              layer("crop2", "Crop", "x w", params="crop_param { axis: 1 offset: 1 offset: 2 offset: 1 }"), {}, {}),
    "softmax_loss": (inputs(s=(4, 5, 2, 3), l=(4, 1, 2, 3)) +
                     layer("sm1", "Softmax", "s") + layer("sm2", "Softmax", "s", params="softmax_param { axis: 2 }") +
                     layer("l_valid", "SoftmaxWithLoss", "s l", params="loss_param { ignore_label: 2 }") +
                     layer("l_full", "SoftmaxWithLoss", "s l",
                           params="loss_weight: 0.5 loss_param { ignore_label: 2 normalization: FULL }") +
                     layer("l_batch", "SoftmaxWithLoss", "s l", params="loss_param { normalization: BATCH_SIZE }") +
                     layer("l_none", "SoftmaxWithLoss", "s l",
                           params="loss_weight: 2 loss_param { ignore_label: 2 normalization: NONE }") +
                     layer("l_legacy", "SoftmaxWithLoss", "s l", params="loss_param { normalize: false }"),
                     {"l": "i5"}, {}),
    "loss": (inputs(a=(4, 3), b=(4, 3), t=(4, 3), lab=(4,), y=(4,)) +
             layer("euc", "EuclideanLoss", "a b") + layer("sce", "SigmoidCrossEntropyLoss", "a t") +
             layer("sce_valid", "SigmoidCrossEntropyLoss", "b t",
                   params="loss_weight: 0.5 loss_param { normalization: VALID }") +
             layer("hinge1", "HingeLoss", "a lab") +
             layer("hinge2", "HingeLoss", "b lab", params="loss_weight: 0.5 hinge_loss_param { norm: L2 }") +
             layer("contr", "ContrastiveLoss", "a b y", params="contrastive_loss_param { margin: 3 }") +
             layer("contr_legacy", "ContrastiveLoss", "a b y",
                   params="contrastive_loss_param { margin: 3 legacy_version: true }") +
             layer("pb", "Softmax", "b") + layer("mlog", "MultinomialLogisticLoss", "pb lab"),
             {"t": "u", "lab": "i3", "y": np.array([0, 1, 1, 0])}, {}),
    "infogain": (inputs(x=(4, 5), lab=(4,), H=(1, 1, 3, 3)) +
                 layer("ip", "InnerProduct", "x", "sc", f"inner_product_param {{ num_output: 3 {G} }}") +
                 layer("info", "InfogainLoss", "sc lab H"), {"lab": "i3", "H": "u"}, {"force": False}),
    "mvn": (inputs(x=(2, 3, 4, 5)) + layer("mvn", "MVN", "x") +
            layer("mvn_ac", "MVN", "x", params="mvn_param { across_channels: true eps: 0.001 }") +
            layer("mvn_mean", "MVN", "x", params="mvn_param { normalize_variance: false }"), {}, {}),
    "embed": (inputs(idx=(4, 3)) +
              layer("emb", "Embed", "idx", params=f"embed_param {{ num_output: 5 input_dim: 6 {G} }}") +
              layer("emb_nb", "Embed", "idx",
                    params=f"embed_param {{ num_output: 2 input_dim: 6 bias_term: false {G} }}"),
              {"idx": "i6"}, {"force": False}),
    "reduction_tile": (inputs(x=(2, 3, 4)) +
                       layer("tile", "Tile", "x", params="tile_param { axis: 1 tiles: 3 }") +
                       layer("tile2", "Tile", "x", params="tile_param { axis: -1 tiles: 2 }") +
                       layer("r_sum", "Reduction", "x", params="reduction_param { axis: 1 }") +
                       layer("r_asum", "Reduction", "x",
                             params="reduction_param { operation: ASUM axis: 2 coeff: 0.5 }") +
                       layer("r_sumsq", "Reduction", "x", params="reduction_param { operation: SUMSQ axis: 0 }") +
                       layer("r_mean", "Reduction", "x",
                             params="reduction_param { operation: MEAN axis: 1 coeff: -2 }"),
                       {}, {}),
    "forward_only": (inputs(x=(5, 6), lab=(5,), x4=(2, 3, 4, 5)) +
                     layer("argmax", "ArgMax", "x") +
                     layer("argmax2", "ArgMax", "x", params="argmax_param { top_k: 2 out_max_val: true }") +
                     layer("argmax3", "ArgMax", "x4", params="argmax_param { axis: 1 top_k: 2 }") +
                     layer("argmax4", "ArgMax", "x4", params="argmax_param { axis: 1 out_max_val: true }") +
                     layer("acc", "Accuracy", "x lab", "acc acc_class", "accuracy_param { top_k: 2 }") +
                     layer("acc1", "Accuracy", "x lab", params="accuracy_param { ignore_label: 1 }") +
                     layer("thr", "Threshold", "x", params="threshold_param { threshold: 0.2 }"),
                     {"lab": np.array([0, 1, 1, 3, 5])}, {"backward": False}),
    "recurrent": (inputs(x=(3, 2, 4), cont=(3, 2), xs=(2, 3), h0=(1, 2, 5)) +
                  layer("rnn", "RNN", "x cont", params=f"recurrent_param {{ num_output: 5 {G} }}") +
                  layer("lstm", "LSTM", "x cont xs", params=f"recurrent_param {{ num_output: 4 {G} }}") +
                  layer("rnn_h", "RNN", "x cont h0", "rnn_h hT",
                        f"recurrent_param {{ num_output: 5 expose_hidden: true {G} }}"),
                  {"cont": np.array([[0, 0], [1, 1], [0, 1]])}, {}),
    "extra": (inputs(x=(2, 3, 4, 5), y=(2, 3), x5=(1, 2, 4, 5, 6), lab=(2, 3, 5), xs=(1, 2, 6, 7)) +
              layer("clip", "Clip", "x", params="clip_param { min: -0.5 max: 0.7 }") +
              layer("swish", "Swish", "x", params="swish_param { beta: 1.5 }") +
              layer("spp_max", "SPP", "xs", params="spp_param { pyramid_height: 3 pool: MAX }") +
              layer("spp_ave", "SPP", "x", params="spp_param { pyramid_height: 2 pool: AVE }") +
              layer("im2col", "Im2col", "x", params="convolution_param { kernel_size: 2 stride: 2 pad: 1 }") +
              layer("bias2", "Bias", "x y", params="bias_param { axis: 0 }") +
              layer("scale0", "Scale", "x", params='scale_param { num_axes: 0 filler { type: "gaussian" } }') +
              layer("scale2", "Scale", "x y", params="scale_param { axis: 0 }") +
              layer("silence", "Silence", "y", "") +
              layer("pow1", "Power", "x", params="power_param { scale: 2 }") +
              layer("pow0", "Power", "x", params="power_param { power: 0 shift: 1 }") +
              conv("conv3d", "x5", "num_output: 2 kernel_size: 3 pad: 1 stride: 2") +
              layer("sm_axis", "SoftmaxWithLoss", "x lab", params="softmax_param { axis: 2 }"),
              {"lab": "i4"}, {}),
    "variants": (inputs(x=(2, 3, 4), y=(2, 3), x4=(2, 4, 5, 5), a=(2, 3), t=(2, 3)) +
                 layer("lrn_wide", "LRN", "x4", params="lrn_param { local_size: 9 alpha: 0.5 }") +
                 layer("sm_last", "Softmax", "x", params="softmax_param { axis: -1 }") +
                 layer("cat_last", "Concat", "x x", params="concat_param { axis: -1 }") +
                 layer("slice_dim", "Slice", "x", "sl0 sl1", "slice_param { slice_dim: 1 slice_point: 1 }") +
                 layer("ip_t", "InnerProduct", "x",
                       params=f"inner_product_param {{ num_output: 2 axis: 2 transpose: true {G} }}") +
                 layer("scale_bias", "Scale", "x y",
                       params='scale_param { axis: 0 bias_term: true bias_filler { type: "gaussian" } }') +
                 layer("bias_all", "Bias", "x", params='bias_param { num_axes: -1 filler { type: "gaussian" } }') +
                 layer("r_last", "Reduction", "x", params="reduction_param { operation: SUMSQ axis: -1 }") +
                 conv("depthwise", "x4", "num_output: 4 group: 4 kernel_size: 3 pad: 2", top="x4b") +
                 layer("prelu_inplace", "PReLU", "x4b", "x4b",
                       'prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }') +
                 conv("d_gap", "x4", "num_output: 2 kernel_size: 2 stride: 3", "Deconvolution") +
                 layer("p_gap", "Pooling", "x4", params="pooling_param { pool: MAX kernel_size: 2 stride: 3 }") +
                 layer("elu1", "ELU", "x") +
                 layer("sce_ign", "SigmoidCrossEntropyLoss", "a t",
                       params="loss_param { ignore_label: -1 normalization: VALID }"),
                 {"t": np.array([[1, 0, -1], [0.5, -1, 1]])}, {}),
    "forward_only_spatial": (inputs(s=(2, 4, 3, 2), l=(2, 3, 2)) +
                             layer("acc_sp", "Accuracy", "s l", "acc_sp acc_sp_class",
                                   "accuracy_param { ignore_label: 3 }") +
                             layer("acc_sp2", "Accuracy", "s l", params="accuracy_param { top_k: 2 }") +
                             layer("argmax_last", "ArgMax", "s", params="argmax_param { axis: -1 }"),
                             {"l": "i4"}, {"backward": False}),
    "indexing": (inputs(idx=(4,), sel=(3,)) +
                 layer("p", "Parameter", "", params="parameter_param { shape { dim: 3 dim: 2 dim: 2 } }") +
                 layer("reindex", "BatchReindex", "p idx") + layer("filter", "Filter", "p sel"),
                 {"idx": np.array([2, 0, 2, 1]), "sel": np.array([1, 0, 1])},
                 {"force": False, "init": {"p": [np.arange(12) * 0.37 - 2]}}),
}

TINY = (inputs(x=(6, 4), label=(6,)) +
        layer("ip1", "InnerProduct", "x", "h", 'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 } '
              'inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } '
              'bias_filler { type: "constant" value: 0.1 } }') +
        layer("relu", "ReLU", "h", "h") +
        layer("ip2", "InnerProduct", "h", "s", f"inner_product_param {{ num_output: 3 {G} }}") +
        layer("loss", "SoftmaxWithLoss", "s label"))
SOLVERS = {
    "sgd_step": 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 2',
    "nesterov_inv": 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 weight_decay: 0.005 lr_policy: "inv" gamma: 0.1 '
                    'power: 0.75',
    "adagrad": 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.001 lr_policy: "fixed" delta: 1e-6',
    "rmsprop_exp": 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 weight_decay: 0.001 lr_policy: "exp" gamma: 0.9',
    "adadelta": 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 delta: 1e-6 weight_decay: 0.001 lr_policy: "fixed"',
    "adam_poly": 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 delta: 1e-8 lr_policy: "poly" power: 2',
    "sgd_iter2_l1_clip": 'type: "SGD" iter_size: 2 base_lr: 0.05 momentum: 0.8 lr_policy: "multistep" gamma: 0.3 '
                         'stepvalue: 1 stepvalue: 3 regularization_type: "L1" weight_decay: 0.01 clip_gradients: 0.5',
    "sgd_sigmoid": 'type: "SGD" base_lr: 0.1 momentum: 0.5 lr_policy: "sigmoid" gamma: 0.5 stepsize: 2',
}


def fill(rng, blob, kind):
    shape = blob.data.shape
    if isinstance(kind, np.ndarray):
        return kind.reshape(shape)
    if kind == "u":
        return rng.uniform(0.05, 1, shape)
    if kind.startswith("i"):
        return rng.randint(0, int(kind[1:]), shape)
    return rng.randn(*shape)


def temp_file(text):
    f = tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False)
    f.write(text)
    f.close()
    return f.name


def params(net, prefix):
    return {f"{prefix}/{name}/{i}": b.data.copy() for name, blobs in net.params.items() for i, b in enumerate(blobs)}


def run_net(name, text, kinds, opts):
    proto = ('name: "%s"\n' % name) + ("force_backward: true\n" if opts.get("force", True) else "") + text
    phase = opts.get("phase", "TEST")
    caffe.set_random_seed(SEED)
    net = caffe.Net(temp_file(proto), getattr(caffe, phase))
    rng = np.random.RandomState(SEED)
    out = {"proto": np.array(proto), "phase": np.array(phase), "backward": np.array(opts.get("backward", True)),
           "blob_names": np.array(list(net.blob_loss_weights)),
           "blob_loss_weights": np.array(list(net.blob_loss_weights.values()))}
    for layer_name, arrays in opts.get("init", {}).items():
        for blob, a in zip(net.params[layer_name], arrays):
            blob.data[...] = np.reshape(a, blob.data.shape)
    for b in net.inputs:
        net.blobs[b].data[...] = fill(rng, net.blobs[b], kinds.get(b, "g"))
        out[f"in/{b}"] = net.blobs[b].data.copy()
    out.update(params(net, "param"))
    net.forward()
    if out["backward"]:
        losses = {b for b, w in zip(net._blob_names, net._blob_loss_weights) if w}
        for b in net.outputs:
            if b not in losses:  # a loss top's diff holds its loss weight since setup
                net.blobs[b].diff[...] = out[f"outdiff/{b}"] = np.array(rng.randn(*net.blobs[b].data.shape))
        net.backward()
        out.update({f"pdiff/{n}/{i}": b.diff.copy() for n, blobs in net.params.items() for i, b in enumerate(blobs)})
    for key, a in params(net, "pafter").items():
        if not np.array_equal(a, out["param" + key[6:]]):
            out[key] = a
    for b, blob in net.blobs.items():
        out[f"blob/{b}"] = blob.data.copy()
        if out["backward"]:
            out[f"diff/{b}"] = blob.diff.copy()
    return out


def run_solver(name, rule):
    text = f'{rule}\nmax_iter: 10 display: 0 random_seed: {SEED} solver_mode: CPU\n'
    text += f'net_param {{ name: "tiny"\n{TINY}}}\n'
    solver = caffe.get_solver(temp_file(text))
    rng = np.random.RandomState(SEED)
    solver.net.blobs["x"].data[...] = rng.randn(6, 4)
    solver.net.blobs["label"].data[...] = rng.randint(0, 3, 6)
    out = {"solver": np.array(text), "in/x": solver.net.blobs["x"].data.copy(),
           "in/label": solver.net.blobs["label"].data.copy(), **params(solver.net, "w/0")}
    losses = []
    for k in range(1, STEPS + 1):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
        out.update(params(solver.net, f"w/{k}"))
    out["loss"] = np.array(losses)
    return out


DATA = ('layer { name: "d_mean_value" type: "Data" top: "d_mean_value" data_param { source: "{db}" batch_size: 4 '
        'backend: LMDB } transform_param { crop_size: 6 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5 } }\n'
        'layer { name: "d_mean_file" type: "Data" top: "d_mean_file" top: "label" data_param { source: "{db}" '
        'batch_size: 3 backend: LMDB } transform_param { mean_file: "{mean}" scale: 0.1 } }\n'
        'layer { name: "d_crop_mean_file" type: "Data" top: "d_crop_mean_file" data_param { source: "{db}" '
        'batch_size: 4 backend: LMDB } transform_param { mean_file: "{mean}" crop_size: 5 } }\n')


def write_data(directory, images, labels, mean):
    """The LMDB (keys %08d, uint8 Datum) and mean.binaryproto that DATA reads."""
    import lmdb
    from caffe.proto import caffe_pb2
    with lmdb.open(os.path.join(directory, "db"), map_size=1 << 24).begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(images, labels)):
            datum = caffe_pb2.Datum(channels=image.shape[0], height=image.shape[1], width=image.shape[2],
                                    data=image.tobytes(), label=int(label))
            txn.put(b"%08d" % i, datum.SerializeToString())
    with open(os.path.join(directory, "mean.binaryproto"), "wb") as f:
        f.write(caffe.io.array_to_blobproto(mean).SerializeToString())
    return DATA.replace("{db}", os.path.join(directory, "db")).replace(
        "{mean}", os.path.join(directory, "mean.binaryproto"))


def run_data():
    """The Data layer's reading order (wrapping around) and transforms, three TEST batches."""
    rng = np.random.RandomState(SEED)
    out = {"proto": np.array(DATA), "images": rng.randint(0, 256, (10, 3, 9, 8)).astype(np.uint8),
           "labels": np.arange(10) * 7 % 10, "mean": rng.uniform(0, 255, (1, 3, 9, 8)).astype(np.float32)}
    net = caffe.Net(temp_file(write_data(tempfile.mkdtemp(), out["images"], out["labels"], out["mean"])), caffe.TEST)
    for k in range(3):
        net.forward()
        out.update({f"blob/{b}/{k}": blob.data.copy() for b, blob in net.blobs.items()})
    return out


def run_lenet():
    """Real Caffe's trained LeNet on the first 16 test images of the embedded subset."""
    with gzip.open(os.path.join(ROOT, "espresso/datasets/fmnist_subset/t10k-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, 16 * 784, 16).reshape(16, 1, 28, 28)
    net = caffe.Net(os.path.join(ROOT, "examples/lenet/lenet_deploy.prototxt"), caffe.TEST,
                    weights=os.path.join(ROOT, LENET))
    net.blobs["data"].reshape(*images.shape)
    net.blobs["data"].data[...] = images * np.float32(0.00390625)  # the Data layer's scale
    net.forward()
    return {"images": images, "ip2": net.blobs["ip2"].data.copy(), "prob": net.blobs["prob"].data.copy()}


def main(names):
    os.makedirs(OUT, exist_ok=True)
    caffe.set_mode_cpu()
    jobs = [(os.path.join(OUT, n), lambda n=n: run_net(n, *NETS[n])) for n in NETS]
    jobs += [(os.path.join(OUT, f"solver_{n}"), lambda n=n: run_solver(n, SOLVERS[n])) for n in SOLVERS]
    jobs.append((os.path.join(OUT, "data_layer"), run_data))
    if os.path.exists(os.path.join(ROOT, LENET)):
        jobs.append((os.path.join(ROOT, LENET.replace(".caffemodel", "_outputs")), run_lenet))
    for path, job in jobs:
        name = os.path.basename(path)
        if names and name not in names:
            continue
        out = job()
        out = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in out.items()}
        np.savez_compressed(path + ".npz", **out)
        print(f"{name}: {len(out)} arrays")


if __name__ == "__main__":
    main(sys.argv[1:])
