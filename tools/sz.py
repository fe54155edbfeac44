"""Count lines of code per package (docstrings, comments and blank lines excluded) and fail
when the total passes the budget.  The budget is raised on purpose, never dodged by packing code."""

import ast
import io
import sys
import tokenize
from collections import Counter
from pathlib import Path

# 9260 -> 9400 with the explicit backend contract (its members and capability defaults written out),
# espresso/net/ as four modules (their headers, imports and the pycaffe file-method wrappers) and
# cuBLAS/cuDNN status texts
# 9400 -> 9550 for the newcomer's path: the CLI's argument checks, the progress display, the
# plots module and the CPU thread setting
# 9550 -> 9700 for the hardening of inputs: sizes checked before allocating, bounded readers
# 9700 -> 9900 for resume that continues the data: the cursors of Data, ImageData and HDF5Data,
# their checks when read back, the snapshot field; and LMDB environments shared between readers
# 9900 -> 11200 for ONNX in and out (espresso/interop: some 60 ONNX ops mapped onto Caffe's
# layers, every Caffe deploy layer onto ONNX) and the three layers Caffe lacks (Permute, Pad, Upsample)
# 11200 -> 12200 for the rest of the interop issue: Core ML export (ML Program and updatable
# NeuralNetwork), espresso compare, optimize (BatchNorm/Scale folding) and draw
# 12200 -> 12900 for espresso demo (espresso/demo: the server and its API, the classifier that
# learns new classes, the photo preprocessing, the exports)
# 12900 -> 13900 for the rest of pycaffe and Caffe's tools (Caffe parity II): Classifier, Detector,
# coord_map, glog-format logs and flags, espresso.as_caffe, LevelDB, WindowData, the converters
# and tools Caffe ships (extract_features, upgrade_*, convert_cifar_data, the siamese converter)
# 13900 -> 14600 for espresso bench (espresso/bench: the nets of the standard suite written with
# NetSpec, NVML/RAPL energy meters, the per-group measuring process, the PyTorch peer, the report)
# 14600 -> 15000 for low-rank compression (espresso/compress/lowrank.py: EVBMF, Tucker-2, SVD, the
# net rewrite, its fine-tuning and per-layer report; `espresso compress --tucker/--svd`)
# 15000 -> 16000 for the rest of compression II: fixed-point training (espresso/compress/fixed_point.py),
# post-training int8 (int8.py: calibration, the int8 layer; int8_kernels.py: the VNNI GEMM, im2col of
# quantized images), the model file's version 2 (scaled integers, int8 inputs), QDQ ONNX export, and
# what is still to come for it (fp16/bf16 and int8 on the GPU)
# 16000 -> 16600 for data-parallel training (espresso/parallel.py: MPI ranks, NCCL, the sharded data
# layers, rank 0's duties, the overlapped buckets) and the memory work of performance II (lazy
# diffs, chunked fillers and loads)
# 16600 -> 16750 for the GPU's per-channel kernels (BatchNorm, Scale, Bias: channels.cu's callers),
# the layers' two paths around them, and the copies kept only for a backward that runs (shared
# between an in-place BatchNorm and Scale)
# 16750 -> 16800 for the folds into BatchNorm's forward kernel: the net pairing a BatchNorm with the
# in-place Scale and ReLU after it, the per-call decision in Net.forward_layers, replace_layer's undo
# 16800 -> 16850 for the GPU's small products (small_gemm, sum_parts: their dispatch and argument
# passing in kernels.py)
# 16850 -> 16870 for the graphed SGD update started early (graphed.early_update, the arena's segments)
# 16870 -> 16880 for the InnerProduct's in-place ReLU folded into its bias kernel (matmul_bias_relu:
# cuBLASLt's ReLU epilogue, the ReLU argument of small_gemm and sum_parts)
# 16880 -> 17120 for the CPU's batch split: the backend's over_ranges and its threads
# (batch_threads.py), the parts' own buffers in Convolution, Deconvolution and pooling, and the
# net's chains of such layers (one split per chain: Layer.batch_parts, net/core.py's _Chain)
# 17120 -> 17140 for the review's mends of those threads: a forked child's, a Ctrl-C's, a user's
# BLAS limit kept
# 17140 -> 17200 for the CPU's pixel-rows column layout (im2row and row2im, the convolution products
# written once per layout)
# 17200 -> 17250 for the CPU's fused SoftmaxWithLoss kernels (Numba's forward and backward, their
# contract wrappers)
# 17250 -> 17280 for unpadded max pooling's vectorized kernel on the CPU (Numba)
# 17280 -> 17290 for the review's mends: the fused loss's passes along rows and its size limit, a
# bad label ignored to the end of the pass, the weights' copy only where a bottom gradient runs
# 17290 -> 17330 for InnerProduct's parts in the CPU's chains (its gradients as three helpers the
# two paths share) and a chain of one layer run as the layer alone
# 17330 -> 17355 for a first run's GPU memory: cuDNN's workspaces emptied for a layer's timing and
# put back after (Cudnn.resize_workspaces), never grown inside a capture, and, of near-tied
# algorithms, the one of least workspace
# 17355 -> 17365 for the CUDA backend's random generator made at first use (never in a capture)
BUDGET = 17365
ROOT = Path(__file__).resolve().parents[1] / "espresso"
SKIP = {"caffe_pb2.py"}


def code_lines(path):
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def main():
    per_package = Counter()
    for path in sorted(ROOT.rglob("*.py")):
        if path.name not in SKIP:
            per_package[str(path.parent.relative_to(ROOT.parent))] += code_lines(path)
    total = sum(per_package.values())
    for package, n in sorted(per_package.items()):
        print(f"{package:40s} {n:6d}")
    print(f"{'total':40s} {total:6d} / {BUDGET}")
    if total > BUDGET:
        sys.exit(f"line budget exceeded: {total} > {BUDGET}")


if __name__ == "__main__":
    main()
