"""The `espresso` command: train, test, time, device-query (Caffe's `caffe` tool).

Caffe's single-dash gflags spellings work too (`-solver x`, `-weights=x`), so existing scripts
run unchanged.  Bad input ends with one line on stderr and exit status 1, never a traceback.
"""

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

import espresso
from espresso import caffe_tools, glog
from espresso.errors import EspressoError
from espresso.plot import plot_curves, pyplot
from espresso.proto.text import require_regular

log = logging.getLogger("espresso")


def _gflags_to_argparse(argv):
    """`-solver x` / `-solver=x` (gflags) -> `--solver x` / `--solver=x`."""
    return ["-" + a if re.match(r"^-[a-z_]{2,}(=|$)", a) else a for a in argv]


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors end as one line and exit status 1, as every other error."""

    def error(self, message):
        raise EspressoError(f"{message} (see {self.prog} --help)")


def _positive_int(text):
    value = int(text)  # argparse reports a ValueError as "invalid _positive_int value"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _gpus(text):
    """Caffe's --gpu: 'all' or comma-separated device ids (the first is used)."""
    if text == "all" or re.fullmatch(r"\d+(,\d+)*", text):
        return text
    raise argparse.ArgumentTypeError(f"give a GPU id (0), ids (0,1) or 'all', got '{text}'")


def _output(path):
    """A path to write, checked before any work: its folder must exist and be writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: folder {folder} is not writable")
    return path


def _input(path):
    """A file to read, checked before any work."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return path


def _set_device(args, group=None):
    """--threads and --gpu; a data-parallel rank takes its machine's share of the cores, or the
    GPU of its place among the machine's ranks."""
    local = (group.local_rank, group.local_size) if group is not None else (0, 1)
    if args.threads:
        espresso.set_num_threads(args.threads)
    elif local[1] > 1 and not os.environ.get("ESPRESSO_NUM_THREADS"):
        espresso.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local[1]))
    gpu = args.gpu
    if gpu is None:
        espresso.set_mode_cpu()
        return
    if gpu == "all":
        espresso.set_device(local[0])
    else:
        ids = [int(i) for i in gpu.split(",")]
        if len(ids) > 1 and group is None:
            log.warning("--gpu %s: one process trains on GPU %d; start one rank per GPU with mpiexec -n %d",
                        gpu, ids[0], len(ids))
        espresso.set_device(ids[local[0] % len(ids)])
    espresso.set_mode_gpu()


def _phase(name):
    return {"TRAIN": espresso.TRAIN, "TEST": espresso.TEST}[name.upper()]


def _stages(args):
    """--stage, repeatable and comma-separated, as Caffe's."""
    return [stage for value in args.stage or () for stage in value.split(",") if stage]


def _net(args, phase):
    return espresso.Net(args.model, phase, level=args.level, stages=_stages(args),
                        weights=getattr(args, "weights", None) or None, allow_python=args.allow_python)


class Progress:
    """A one-line progress display on a terminal: iterations done of the total, the smoothed
    train loss, the last test scores with their iteration, an ETA from the recent rate.  It is
    redrawn at the solver's display and test events and cleared before each log line, so the
    log reads as without it; on a pipe it stays silent and the log tells the story.  It also
    records the curves (an observer, not a pycaffe callback, so a GPU solver keeps replaying its
    CUDA graph between events)."""

    RECENT = 4  # the ETA's rate: over the last RECENT events, never the first (compiling, a first test)

    def __init__(self, solver, stream=sys.stderr, live=None):
        self.solver, self.stream = solver, stream
        self.live = stream.isatty() if live is None else live
        self.total = max(solver.param.max_iter, 1)
        self.samples = [(time.perf_counter(), solver.iter)]  # (time, iteration) at each event
        self.losses, self.tests = [], []  # (iteration, smoothed loss), (iteration, {name: value})
        self.shown = False
        solver.observers.append(self.notify)
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is stream:
                handler.addFilter(self._clear)

    def notify(self, event):
        s = self.solver
        if event == "test":
            scores = {}
            for net_scores in s.test_scores:
                scores.update({k: float(np.mean(v)) for k, v in (net_scores or {}).items()})
            self.tests.append((s.iter, scores))
        else:
            self.losses.append((s.iter, float(s.smoothed_loss)))
        self.samples.append((time.perf_counter(), s.iter))
        if self.live:
            self.draw()

    def eta(self):
        """Seconds left at the rate of the last RECENT events (None before there is a rate)."""
        (t0, i0), (t1, i1) = self.samples[max(1, len(self.samples) - self.RECENT - 1)], self.samples[-1]
        return None if i1 <= i0 else (t1 - t0) / (i1 - i0) * (self.total - i1)

    def line(self):
        s = self.solver
        filled = 30 * min(s.iter, self.total) // self.total
        parts = [f"[{'#' * filled}{'.' * (30 - filled)}] {s.iter}/{self.total}"]
        if self.losses:
            parts.append(f"train loss {self.losses[-1][1]:.4f}")
        if self.tests:
            it, scores = self.tests[-1]
            parts.append(f"test @{it}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        eta = self.eta()
        parts.append("ETA --" if eta is None else f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def draw(self):
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self.shown = True

    def _clear(self, record):
        """(A logging filter on the stream's handlers) the bar goes before a log line is written."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.shown = False
        return True

    def close(self):
        """The last state stays on the terminal, on its own line."""
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._clear)
        if self.live:
            self.draw()
            self.stream.write("\n")

    def summary(self):
        """The run's last line: where it ended and the last test, with its iteration."""
        s = self.solver
        ended = "interrupted" if s.requested_early_exit else "finished"
        if not self.tests:
            return f"{ended} at iteration {s.iter}; no test ran"
        it, scores = self.tests[-1]
        return f"{ended} at iteration {s.iter}; test at iteration {it}: " + \
            " ".join(f"{k} = {v:.4f}" for k, v in scores.items())


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def cmd_train(args):
    """Train from a solver prototxt, optionally fine-tuning from weights or resuming a snapshot."""
    if args.snapshot and args.weights:
        raise EspressoError("give --snapshot or --weights, not both (as Caffe)")
    if args.plot:
        pyplot()  # matplotlib's absence said now, not after the training
    group = _data_parallel()
    try:
        return _train(args, group)
    except Exception as e:
        if group is None:
            raise
        # the other ranks wait in a collective: end the whole job now, saying which rank and why
        group.abort(f"rank {group.rank} of {group.size}: {type(e).__name__}: {e}; aborting the job")


def _train(args, group):
    _set_device(args, group)
    param = espresso.solver.read_solver_param(args.solver)
    param.train_state.level = args.level  # Caffe's train: the flag's level (default 0) always wins
    param.train_state.stage.extend(_stages(args))
    if args.snapshot or args.weights:  # Caffe's train: a resume or the flag's weights replace the file's
        del param.weights[:]
        param.weights.extend(args.weights.split(",") if args.weights else ())
    if args.gpu:
        log.info("Use GPU with device ID %s", 0 if args.gpu == "all" else args.gpu.split(",")[0])
    else:
        log.info("Use CPU.")
    solver = espresso.get_solver(param, allow_python=args.allow_python)
    if group is not None:
        group.attach(solver)
    if args.fixed_point:
        _train_in_fixed_point(solver, args)
    if args.snapshot:
        log.info("Resuming from %s", args.snapshot)
    log.info("Starting Optimization")
    progress = Progress(solver, live=None if solver.root else False)
    effects = {"stop": espresso.solver.SolverAction.STOP, "snapshot": espresso.solver.SolverAction.SNAPSHOT,
               "none": espresso.solver.SolverAction.NONE}
    with espresso.solver.SignalHandler(effects[args.sigint_effect], effects[args.sighup_effect]) as handler:
        solver.set_action_function(handler.check)
        try:
            start = time.perf_counter()
            solver.solve(args.snapshot or None)
            solver.net.backend.synchronize()
            log.info("Training took %.2f s (tests and snapshots included)", time.perf_counter() - start)
        finally:
            progress.close()
            if args.plot and solver.root:
                plot_curves(progress.losses, progress.tests, args.plot, f"{solver.net.name or 'Net'}: training curves")
    if solver.root:
        print(progress.summary())
    return 0


def _data_parallel():
    """The data-parallel Group when mpiexec started this process among several (its log then
    quiet below warnings on ranks other than 0, as Caffe's LOG_IF(root_solver)), else None."""
    if espresso.parallel.launched_ranks() == 1:
        return None
    group = espresso.parallel.start()
    if group.rank > 0:
        log.setLevel(logging.WARNING)
    return group


def _train_in_fixed_point(solver, args):
    """--fixed-point IL,FL: the solver trains in that format (espresso/compress/fixed_point.py)."""
    from espresso.compress.fixed_point import FixedPoint, parse_format

    il, fl = parse_format(args.fixed_point)
    log.info("Training in %sfixed point <%d,%d>, %s rounding", "dynamic " if args.dynamic_fixed_point else "", il, fl,
             args.rounding)
    return FixedPoint(solver.net, il, fl, args.rounding, dynamic=args.dynamic_fixed_point).attach(solver)


def _fixed_point_flags(p):
    p.add_argument("--fixed-point", default="", metavar="IL,FL", help="train in fixed point: IL integer bits (the "
                   "sign included) and FL fraction bits for weights, activations and gradients (Gupta et al. 2015)")
    p.add_argument("--rounding", default="stochastic", choices=["stochastic", "nearest"], help="with --fixed-point")
    p.add_argument("--dynamic-fixed-point", action="store_true", help="with --fixed-point: each tensor's FL follows "
                   "its overflow rate (Courbariaux et al. 2014)")


_TRAIN_LOSS = re.compile(r"Iteration (\d+).*?, loss = ([-+\w.]+)")
_TEST_ITER = re.compile(r"Iteration (\d+), Testing net")
_TEST_OUT = re.compile(r"Test net output #\d+: (\S+) = ([-+\w.]+)")


def parse_log(lines):
    """(losses, tests) from a Caffe- or Espresso-style training log."""
    losses, tests, current = [], [], None
    for line in lines:
        if m := _TEST_ITER.search(line):
            current = (int(m.group(1)), {})
            tests.append(current)
        elif (m := _TEST_OUT.search(line)) and current is not None:
            current[1][m.group(1)] = float(m.group(2))
        elif m := _TRAIN_LOSS.search(line):
            losses.append((int(m.group(1)), float(m.group(2))))
    return losses, [t for t in tests if t[1]]


def cmd_plot(args):
    require_regular(args.log, EspressoError)
    try:
        with open(args.log, encoding="utf-8") as f:
            losses, tests = parse_log(f)
    except OSError as e:
        raise EspressoError(f"{args.log}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise EspressoError(f"{args.log}: not a text log (binary data)") from None
    plot_curves(losses, tests, args.output, f"Training curves ({os.path.basename(args.log)})")
    return 0


def cmd_test(args):
    """Score a model: run `iterations` forward passes and average every net output."""
    _set_device(args)
    net = _net(args, _phase(args.phase))  # Caffe's test -phase (TEST unless told)
    totals, loss = {}, 0.0
    for i in range(args.iterations):
        loss += float(net.run_forward())
        net.check_problems()
        for name in net.outputs:
            values = np.atleast_1d(net.blobs[name].host_data()).ravel()
            for k, v in enumerate(values):
                log.info("Batch %d, %s = %g", i, name, v)
                totals[name, k] = totals.get((name, k), 0.0) + float(v)
    log.info("Loss: %g", loss / args.iterations)
    for (name, _index), total in totals.items():
        weight = _loss_weight(net, name)
        note = f" (* {weight:g} = {weight * total / args.iterations:g} loss)" if weight else ""
        log.info("%s = %g%s", name, total / args.iterations, note)
    return 0


def _loss_weight(net, blob_name):
    for layer, tops in zip(net.engine_layers, net.top_names.values()):
        if blob_name in tops:
            return layer.loss_weights[tops.index(blob_name)]
    return 0.0


def cmd_time(args):
    """Per-layer forward and backward milliseconds, averaged over `iterations` (Caffe's `caffe time`)."""
    _set_device(args)
    net = _net(args, _phase(args.phase))
    net.forward_backward()  # warm-up: first-touch allocations, kernel compilation
    if net.eager_reason() is None:
        return _time_graphs(net, args.iterations)
    from espresso.bench.measure import layer_times

    start = time.perf_counter()
    forward_ms, backward_ms = layer_times(net, args.iterations)  # eager, layer by layer; on a GPU, CUDA events
    total_ms = (time.perf_counter() - start) * 1e3 / args.iterations
    _report_times(net, forward_ms, backward_ms, total_ms)
    return 0


def _time_graphs(net, iterations):
    """GPU times without Python's launch cost: each layer's forward and backward captured as its
    own CUDA graph and replayed `iterations` times between two CUDA events; the whole
    forward+backward likewise."""
    backend, n = net.backend, len(net.engine_layers)

    def replay_ms(fn):
        graph = backend.capture(fn)
        start = backend.mark()
        for _ in range(iterations):
            backend.launch(graph)
        return backend.elapsed_ms(start, backend.mark()) / iterations

    forward = [replay_ms(lambda i=i: net.forward_layers(i, i)) for i in range(n)]
    backward = [replay_ms(lambda i=i: net.backward_range(i, i)) for i in range(n)]
    whole = replay_ms(lambda: (net.forward_layers(0, n - 1), net.backward_range(n - 1, 0)))
    log.info("GPU times of CUDA graph replays (ESPRESSO_CUDA_GRAPHS=0 times eager launches instead)")
    _report_times(net, np.array(forward), np.array(backward), whole)
    return 0


def _report_times(net, forward_ms, backward_ms, total_ms):
    """Caffe's `caffe time` lines: each layer's name right-aligned in 10, a tab, %g ms."""
    for name, f, b in zip(net._layer_names, forward_ms, backward_ms):
        log.info("%10s\tforward: %g ms.", name, f)
        log.info("%10s\tbackward: %g ms.", name, b)
    log.info("Average Forward pass: %g ms.", forward_ms.sum())
    log.info("Average Backward pass: %g ms.", backward_ms.sum())
    log.info("Average Forward-Backward: %g ms.", total_ms)


def cmd_prepare_fmnist(args):
    """Fashion-MNIST (full set when installed, else the embedded subset) -> the LeNet LMDBs."""
    from espresso.data.fmnist import make_fmnist_lmdbs

    train, test, source = make_fmnist_lmdbs(args.output, args.source or None, overwrite=True)
    log.info("Data: %s", source.description)
    log.info("Wrote %s and %s", train, test)
    return 0


def cmd_device_query(args):
    """Print what the chosen device is: the CPU's BLAS, or the GPU's name, memory and driver."""
    _set_device(args)
    backend = espresso.runtime.current_backend()
    for key, value in backend.describe().items():
        log.info("%s: %s", key, value)
    return 0


def cmd_compress(args):
    """Deep Compression: prune (with retraining), quantize and Huffman-code a trained model."""
    _set_device(args)
    alone = {"--tucker/--svd": args.tucker or args.svd, "--hash": args.hash, "--fixed-point": args.fixed_point,
             "--fp16/--bf16": args.fp16 or args.bf16, "--int8": args.int8}
    given = [flag for flag, on in alone.items() if on]
    # each writes a net or a precision of its own; --int8 also goes after --tucker/--svd and --prune/--bits
    if len(given) > 1 and given != ["--tucker/--svd", "--int8"]:
        raise EspressoError(f"{' and '.join(given)} do not combine in one run: compress what one writes in a "
                            "second run")
    if args.tucker or args.svd or args.hash:
        return _lowrank(args)
    if args.fixed_point:
        return _fixed_point(args)
    if args.fp16 or args.bf16:
        return _half(args)
    from espresso.compress.pipeline import compress

    report = compress(args.model, args.weights, args.solver, prune=args.prune or None, bits=args.bits or None,
                      output=args.output, huffman=not args.no_huffman, init=args.init, prune_steps=args.prune_steps,
                      retrain_iters=args.retrain_iters, quant_iters=args.quant_iters,
                      index_bits=args.index_bits or None, report=args.report or None, plot=args.plot or None,
                      centroid_grad=args.centroid_grad, int8=_int8_options(args))
    acc = " ".join(f"{k} = {v:.4f}" for k, v in report["accuracy"].items())
    print(f"{report['original_bytes']} -> {report['compressed_bytes']} bytes ({report['ratio']:.1f}x); {acc}")
    return 0


def _int8_options(args):
    """compress()'s int8 argument from --int8, --calibration-iters, --calibration, --keep-float."""
    if not args.int8:
        if args.calibration or args.keep_float:
            raise EspressoError("--calibration and --keep-float go with --int8")
        return None
    inputs = None
    if args.calibration:
        import numpy as np

        try:
            inputs = np.load(args.calibration, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EspressoError(f"--calibration {args.calibration}: not a readable .npy array ({e})") from None
    keep = [name for name in args.keep_float.split(",") if name]
    return {"iterations": args.calibration_iters, "keep_float": keep, "inputs": inputs}


def _lowrank(args):
    """Low rank (Tucker-2 convolutions, SVD inner products, fine-tuned) or HashedNets (hashed inner
    products trained with the solver): a net and its .caffemodel out."""
    from espresso.compress.lowrank import lowrank, parse
    from espresso.compress.pipeline import hash_compress

    if args.hash and (args.prune or args.bits):
        raise EspressoError("--hash and --prune/--bits do not combine: a hashed layer's weights are shared already")
    if not args.output_model:
        raise EspressoError("--tucker/--svd/--hash write a net: give --output-model for its prototxt "
                            "(--output is its .caffemodel)")
    if args.hash:
        report = hash_compress(args.model, args.weights, args.solver, args.hash, args.output, args.output_model,
                               iterations=args.retrain_iters)
        return _print_report(report, args)
    then_compress = args.prune or args.bits or args.int8
    # decomposed and fine-tuned first: its weights beside the final model file when stages follow
    weights = str(Path(args.output).with_suffix(".lowrank.caffemodel")) if then_compress else args.output
    report = lowrank(args.model, args.weights, args.solver, tucker=parse(args.tucker, "tucker"),
                     svd=parse(args.svd, "svd"), output=weights, output_model=args.output_model,
                     finetune_iters=args.retrain_iters)
    for row in report["stages"]:
        device = "cpu" if "cpu_ms_before" in row else "gpu"
        log.info("%s %s: ranks %s, weights %d -> %d, multiply-adds %d -> %d, %s %.3f -> %.3f ms (%.2fx)",
                 row["stage"], row["layer"], row["ranks"], row["weights_before"], row["weights_after"],
                 row["macs_before"], row["macs_after"], device.upper(), row[f"{device}_ms_before"],
                 row[f"{device}_ms_after"], row["speedup"])
    if then_compress:
        report = _compress_decomposed(args, weights, report)
    return _print_report(report, args)


def _compress_decomposed(args, weights, lowrank_report):
    """--prune/--bits/--int8 after --tucker/--svd in one run: Deep Compression (and int8) of the
    decomposed net; the report's sizes and accuracies run from the original net to the file."""
    from espresso.compress.pipeline import compress

    solver = espresso.solver.read_solver_param(args.solver)
    for field in ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param"):
        solver.ClearField(field)
    solver.net = args.output_model
    report = compress(args.output_model, weights, solver, prune=args.prune or None, bits=args.bits or None,
                      output=args.output, huffman=not args.no_huffman, init=args.init, prune_steps=args.prune_steps,
                      retrain_iters=args.retrain_iters, quant_iters=args.quant_iters,
                      index_bits=args.index_bits or None, centroid_grad=args.centroid_grad, int8=_int8_options(args))
    accuracy = {f"low rank {k}": v for k, v in lowrank_report["accuracy"].items()}
    accuracy.update({f"compressed {k}": v for k, v in report["accuracy"].items() if k != "original"})
    original = lowrank_report["original_bytes"]
    return {**report, "ratio": original / report["compressed_bytes"], "original_bytes": original,
            "accuracy_before": lowrank_report["accuracy_before"], "accuracy": accuracy,
            "stages": lowrank_report["stages"] + report.get("stages", [])}


def _print_report(report, args):
    import json

    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    acc = " -> ".join(f"{k} {v:.4f}" for k, v in report["accuracy"].items() if v is not None)
    print(f"{report['original_bytes']} -> {report['compressed_bytes']} bytes ({report['ratio']:.1f}x); {acc}")
    return 0


def _fixed_point(args):
    """Fine-tuning in fixed point (Gupta et al.): the model file of IL+FL-bit weights out."""
    from espresso.compress.fixed_point import parse_format
    from espresso.compress.pipeline import fixed_point_compress

    if args.prune or args.bits:
        raise EspressoError("--fixed-point and --prune/--bits do not combine in one run: their weights are "
                            "a codebook's or a grid's")
    report = fixed_point_compress(args.model, args.weights, args.solver, parse_format(args.fixed_point),
                                  args.rounding, args.output, args.retrain_iters, args.dynamic_fixed_point)
    return _print_report(report, args)


def _half(args):
    """Weights as 16-bit floats (run with 16-bit operands on a GPU): the model file out."""
    from espresso.compress.pipeline import half_compress

    if args.fp16 and args.bf16 or args.prune or args.bits:
        raise EspressoError("--fp16 / --bf16 go alone: one precision per file, and Deep Compression's weights are "
                            "a codebook's")
    report = half_compress(args.model, args.weights, args.solver, "float16" if args.fp16 else "bfloat16",
                           args.output)
    return _print_report(report, args)


def cmd_decompress(args):
    """A compressed model back to a .caffemodel (dense weights, pruned ones zero)."""
    from espresso.compress.model_file import to_caffemodel

    to_caffemodel(args.input, args.output)
    log.info("Wrote %s", args.output)
    return 0


def cmd_convert(args):
    """An .onnx model in (a Caffe prototxt and .caffemodel out), or a Caffe net out to ONNX."""
    from espresso.proto.text import atomic_write, to_text

    if args.input.endswith(".onnx"):
        from espresso.interop.onnx_import import import_onnx, set_weights

        if not (args.output or args.weights):
            raise EspressoError("give -o net.prototxt and/or --weights net.caffemodel to write")
        param, weights = import_onnx(args.input, batch=args.batch)  # all converted before anything is written
        net = espresso.Net(param, espresso.TEST)
        set_weights(net, weights)
        if args.output:
            atomic_write(args.output, lambda f: f.write(to_text(param).encode()))
        if args.weights:
            net.save(args.weights)
        log.info("Wrote %s", " and ".join(p for p in (args.output, args.weights) if p))
        return 0
    if not (args.onnx or args.coreml):
        raise EspressoError("give --onnx out.onnx or --coreml out.mlpackage to write "
                            "(or an .onnx model to convert into Caffe's files)")
    net = espresso.Net(args.input, espresso.TEST, weights=args.weights or None)
    if args.onnx:
        from espresso.interop.onnx_export import export_onnx

        export_onnx(net, args.onnx, opset=args.opset)
    if args.coreml:
        _export_coreml(net, args)
    log.info("Wrote %s", " and ".join(p for p in (args.onnx, args.coreml) if p))
    return 0


def _export_coreml(net, args):
    from espresso.interop.coreml_export import export_coreml

    image = None
    if args.image_scale is not None or args.image_mean:
        image = {"scale": 1.0 if args.image_scale is None else args.image_scale, "channel_order": args.channel_order}
        if args.image_mean:
            image["mean"] = [float(v) for v in args.image_mean.split(",")]
    labels = None
    if args.labels:
        with open(args.labels) as f:
            labels = [line.strip() for line in f if line.strip()]
    export_coreml(net, args.coreml, precision="float16" if args.float16 else "float32", image_input=image,
                  class_labels=labels, updatable=args.updatable, solver=args.solver or None, epochs=args.epochs)


def cmd_optimize(args):
    """Fold BatchNorm/Scale into convolutions, drop Dropout, run layers in place; the same outputs."""
    from espresso.deploy import measure, optimize
    from espresso.proto.text import atomic_write, to_text

    _set_device(args)
    net = _net(args, espresso.TEST)
    result = optimize(net)
    atomic_write(args.output, lambda f: f.write(to_text(result.param).encode()))
    result.net.save(args.output_weights)
    report = result.report
    folds = "; ".join(f"{', '.join(into)} into {layer}" for layer, into in report["folded"].items()) or "none"
    print(f"layers {report['layers'][0]} -> {report['layers'][1]}, parameters {report['params'][0]} -> "
          f"{report['params'][1]}; folded: {folds}; removed: {', '.join(report['removed']) or 'none'}; "
          f"in place: {', '.join(report['in_place']) or 'none'}")
    if args.time:
        timing = measure(net, result.net, runs=args.time)
        print(f"forward {timing['before_ms']:.3f} -> {timing['after_ms']:.3f} ms ({timing['speedup']:.2f}x), "
              f"largest output difference {timing['max_error']:.2g} of its magnitude")
    return 0


def cmd_draw(args):
    """Caffe's draw_net.py: the net as a graph (.png, .svg, ... through Graphviz; .dot needs none)."""
    from espresso.draw import draw_net_to_file

    phase = None if args.phase == "ALL" else _phase(args.phase)
    draw_net_to_file(args.input, args.output, rankdir=args.rankdir, phase=phase, display_lrm=args.display_lrm)
    log.info("Wrote %s", args.output)
    return 0


def cmd_bench(args):
    """Speed, memory and energy of the standard nets (or --model ones), CPU and GPU, Espresso beside PyTorch."""
    from espresso import bench

    devices = (["cpu"] if args.cpu or args.gpu is None else []) + (["gpu"] if args.gpu is not None else [])
    frameworks = ["espresso"] + (["torch eager", "torch graph"] if args.compare == "torch" else [])
    modes = [m for m, on in (("infer", args.infer or not args.train), ("train", args.train or not args.infer)) if on]
    batches = [int(b) for b in args.batch.split(",")] if args.batch else (bench.QUICK["batches"] if args.quick
                                                                          else [1, 64, 256])
    names = args.model or bench.STANDARD
    gpu = int(args.gpu.split(",")[0]) if args.gpu not in (None, "all") else 0

    def progress(done, total, what):
        filled = 30 * done // max(total, 1)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {what}"
        sys.stderr.write("\r\x1b[K" + line if sys.stderr.isatty() else line + "\n")
        sys.stderr.flush()

    results = bench.run(names, devices, batches, modes, frameworks, args.report, quick=args.quick, gpu=gpu,
                        repeats=args.repeats, watts_per_core=args.watts_per_core, progress=progress)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    log.info("Measured %d cases in %.0f s; the report is %s", len(results["cases"]), results["seconds"],
             os.path.join(args.report, "report.html"))
    return 0


def cmd_demo(args):
    """The local web app: a classifier (the shipped Fashion-MNIST LeNet by default) that learns new classes."""
    from espresso.demo.app import serve
    from espresso.demo.classifier import Classifier

    if args.threads:
        espresso.set_num_threads(args.threads)
    gpu = None if args.gpu is None else (0 if args.gpu == "all" else int(args.gpu.split(",")[0]))
    serve(Classifier(args.model or None, args.weights or None, args.labels or None, gpu), args.host, args.port)
    return 0


def cmd_compare(args):
    """Two models on one input, tensor by tensor, up to the first that differs beyond the tolerance."""
    import numpy as np

    from espresso.interop.compare import compare, model_tensors, report

    try:
        loaded = np.load(args.input)  # no pickles: nothing runs from the file
        inputs = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except ValueError as e:
        raise EspressoError(f"{args.input}: not a .npy or .npz file of arrays ({e})") from None
    first = model_tensors(args.a, inputs, args.model or None)
    second = model_tensors(args.b, inputs, args.model or None)
    rows, diverged = compare(first, second, args.tolerance)
    print(report(rows, diverged, args.tolerance))
    return 0 if diverged is None else 1


def _parser():
    parser = _Parser(prog="espresso", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"espresso {espresso.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, model=True):
        if model:
            p.add_argument("--model", required=True, help="net prototxt")
        p.add_argument("--gpu", type=_gpus, default=None, help="GPU id, ids (the first is used) or 'all'; "
                                                               "the CPU when omitted")
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU (BLAS) threads; default ESPRESSO_NUM_THREADS, else the physical cores")
        p.add_argument("--level", type=int, default=0, help="the net state's level (NetState.level)")
        p.add_argument("--stage", action="append", help="a net state stage (repeatable)")
        p.add_argument("--allow-python", action="store_true",
                       help="let Python layers import and run the code the net names (trusted files only)")
        return p

    def iterations(p, what):
        p.add_argument("--iterations", type=_positive_int, default=50, help=f"{what} (default 50)")

    p = common(sub.add_parser("train", help="train a model from a solver prototxt"), model=False)
    p.add_argument("--solver", required=True, help="solver prototxt")
    p.add_argument("--weights", default="", help="comma-separated .caffemodel (or .caffemodel.h5) files to start from")
    p.add_argument("--snapshot", default="", help=".solverstate (or .solverstate.h5) to resume from")
    p.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"],
                   help="what Ctrl-C does (stop: snapshot if snapshots are on, then stop)")
    p.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"],
                   help="what SIGHUP does")
    p.add_argument("--plot", type=_output, default="", help="write loss/accuracy curves to this PNG")
    _fixed_point_flags(p)
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("plot", help="draw loss/accuracy curves from a training log")
    p.add_argument("log", help="a Caffe or Espresso training log")
    p.add_argument("--output", "-o", type=_output, default="curves.png", help="the PNG to write")
    p.set_defaults(run=cmd_plot)
    p = common(sub.add_parser("test", help="score a model"))
    p.add_argument("--weights", required=True, help=".caffemodel (.h5, .espz) to score")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST", "train", "test"], help="the net's phase")
    iterations(p, "test batches")
    p.set_defaults(run=cmd_test)
    p = common(sub.add_parser("time", help="per-layer timing"))
    iterations(p, "timed forward-backward passes")
    p.add_argument("--phase", default="TRAIN", choices=["TRAIN", "TEST", "train", "test"], help="the net's phase")
    p.add_argument("--weights", default="", help="weights to time with (Caffe's time -weights; default: the fillers')")
    p.set_defaults(run=cmd_time)
    p = sub.add_parser("prepare-fmnist", help="Fashion-MNIST -> the LMDBs the LeNet examples read")
    p.add_argument("output", nargs="?", default="examples/lenet", help="folder for the two LMDBs")
    p.add_argument("--source", default="", help="folder with the IDX files (default: best available)")
    p.set_defaults(run=cmd_prepare_fmnist)
    caffe_tools.add_parsers(sub)  # Caffe's dataset and upgrade tools
    p = common(sub.add_parser("device-query", aliases=["device_query"], help="describe the device"), model=False)
    p.set_defaults(run=cmd_device_query)
    p = common(sub.add_parser("compress", help="Deep Compression (prune, quantize, Huffman-code) or low rank "
                              "(--tucker, --svd) of a model"))
    p.add_argument("--weights", type=_input, required=True, help=".caffemodel to compress")
    p.add_argument("--solver", type=_input, required=True, help="solver prototxt for the retraining")
    p.add_argument("--prune", default="", help="target sparsity per layer, e.g. '*=0.92,ip3=0.75' (q1.5: 1.5 x std); "
                                               "with neither --prune nor --bits, the paper's recipe")
    p.add_argument("--bits", default="", help="weight bits per layer, e.g. '*=5' or 'paper' (conv 8, fc 5)")
    p.add_argument("--index-bits", default="", help="relative-index bits per layer (default: conv 8, fc 5)")
    p.add_argument("--init", default="linear", choices=["linear", "density", "random"], help="k-means init")
    p.add_argument("--prune-steps", type=_positive_int, default=3, help="prune/retrain rounds")
    p.add_argument("--retrain-iters", type=int, default=1000, help="solver iterations after each pruning round")
    p.add_argument("--quant-iters", type=int, default=1000, help="centroid fine-tuning iterations")
    p.add_argument("--centroid-grad", default="mean", choices=["mean", "sum"],
                   help="a cluster's summed gradient, its step scaled by 1/size (mean) or not (sum, the paper)")
    p.add_argument("--no-huffman", action="store_true", help="fixed-width codes instead of Huffman codes")
    p.add_argument("--tucker", default="", help="low rank: Tucker-2 of these convolutions, 'auto' (every k>1 one) or "
                   "'conv1,conv2=16:12' (R_out:R_in; a name alone: ranks by EVBMF); fine-tuned --retrain-iters")
    p.add_argument("--svd", default="", help="low rank: SVD of these inner products, e.g. 'ip1=40' "
                   "(a name alone: EVBMF)")
    p.add_argument("--hash", type=float, default=0, help="HashedNets: every inner product keeps 1/FACTOR of its "
                   "weights as real ones, trained from the fillers for --retrain-iters iterations")
    p.add_argument("--output-model", type=_output, default="", help="with --tucker/--svd/--hash: the new net's "
                   "prototxt (--output is then its .caffemodel)")
    _fixed_point_flags(p)  # with --fixed-point: fine-tuned --retrain-iters in it
    p.add_argument("--int8", action="store_true", help="post-training int8 (per-channel weights, calibrated "
                   "activations), run in int8 where the file is loaded on the CPU; alone or after --prune/--bits")
    p.add_argument("--calibration-iters", type=int, default=10, help="with --int8: test-net batches to calibrate on")
    p.add_argument("--calibration", type=_input, default=None, help="with --int8: a .npy of input samples (N, C, H, W) "
                   "for --model (a deploy net) to calibrate on instead")
    p.add_argument("--keep-float", default="", help="with --int8: layers left in float ('first', 'last' or names)")
    p.add_argument("--fp16", action="store_true", help="weights as IEEE half floats, run with 16-bit operands and "
                   "float32 accumulation where the file is loaded on a GPU")
    p.add_argument("--bf16", action="store_true", help="as --fp16, in bfloat16")
    p.add_argument("--output", "-o", type=_output, required=True, help="the compressed model file to write")
    p.add_argument("--report", type=_output, default="", help="write the per-layer report as JSON")
    p.add_argument("--plot", type=_output, default="", help="write the weight distributions before/after as a PNG")
    p.set_defaults(run=cmd_compress)
    p = sub.add_parser("convert", help="ONNX -> Caffe prototxt + .caffemodel, or a Caffe net -> ONNX")
    p.add_argument("input", type=_input, help="an .onnx model, or a net prototxt (deploy, TEST phase)")
    p.add_argument("--output", "-o", type=_output, default="", help="the net prototxt to write (from ONNX)")
    p.add_argument("--weights", default="", help="from ONNX: the .caffemodel to write; from a prototxt: its "
                                                 "weights (.caffemodel, .h5 or .espz)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="the batch size of the net's inputs where the ONNX model leaves it open (default 1)")
    p.add_argument("--onnx", type=_output, default="", help="the .onnx file to write (from a prototxt)")
    p.add_argument("--opset", type=_positive_int, default=17, help="the ONNX opset to write (default 17)")
    p.add_argument("--coreml", type=_output, default="", help="the Core ML model to write (.mlpackage; "
                                                             ".mlmodel too with --updatable)")
    p.add_argument("--float16", action="store_true", help="Core ML: float16 weights and arithmetic")
    p.add_argument("--image-scale", type=float, default=None,
                   help="Core ML: the input is an image, its pixels times this (Caffe's transform scale)")
    p.add_argument("--image-mean", default="", help="Core ML: per-channel means subtracted first, e.g. 104,117,123")
    p.add_argument("--channel-order", default="BGR", choices=["BGR", "RGB"], help="Core ML: the image's channels")
    p.add_argument("--labels", type=_input, default=None, help="Core ML: a file of class labels, one per line: "
                                                             "a classifier")
    p.add_argument("--updatable", action="store_true",
                   help="Core ML: the last InnerProduct layers train on the device (needs --solver)")
    p.add_argument("--solver", type=_input, default=None, help="Core ML: the solver whose optimizer --updatable takes")
    p.add_argument("--epochs", type=_positive_int, default=1, help="Core ML: on-device training epochs")
    p.set_defaults(run=cmd_convert)
    p = common(sub.add_parser("optimize", help="a deploy net for speed: BatchNorm/Scale folded, Dropout gone, "
                                                 "layers in place (the same outputs)"))
    p.add_argument("--weights", type=_input, required=True, help="its .caffemodel (.h5, .espz)")
    p.add_argument("--output", "-o", type=_output, required=True, help="the optimized net prototxt to write")
    p.add_argument("--output-weights", type=_output, required=True, help="the optimized .caffemodel to write")
    p.add_argument("--time", type=int, default=0, help="also time N forward passes before and after (0: no)")
    p.set_defaults(run=cmd_optimize)
    p = sub.add_parser("draw", aliases=["draw_net"], help="the net as a graph, as Caffe's draw_net.py")
    p.add_argument("input", type=_input, help="the net prototxt")
    p.add_argument("output", type=_output, help="the image (.png, .svg, .pdf: needs Graphviz's dot) or .dot")
    p.add_argument("--rankdir", default="LR", choices=["LR", "TB", "BT", "RL"], help="the graph's direction")
    p.add_argument("--phase", default="ALL", choices=["TRAIN", "TEST", "ALL"], help="the layers of one phase, or all")
    p.add_argument("--display-lrm", action="store_true", help="show the layers' learning-rate multipliers")
    p.set_defaults(run=cmd_draw)
    p = common(sub.add_parser("demo", help="a local web app that recognizes things and learns yours"), model=False)
    p.add_argument("--model", default="", help="deploy prototxt or .onnx (default: the shipped Fashion-MNIST LeNet)")
    p.add_argument("--weights", default="", help="its weights (.caffemodel, .h5, .espz)")
    p.add_argument("--labels", default="", help="a file of class labels, one per line")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000, help="the port (default 8000)")
    p.set_defaults(run=cmd_demo)
    p = sub.add_parser("bench", help="speed, memory and energy, CPU against GPU, Espresso beside PyTorch")
    p.add_argument("--model", action="append", help="a model to measure (repeatable; default the standard suite: "
                   "lenet, lenet300, lenet_dc, lenet300_dc, caffenet, googlenet, resnet50)")
    p.add_argument("--suite", default="standard", choices=["standard"], help="the set of models (default standard)")
    p.add_argument("--cpu", action="store_true", help="measure the CPU too when --gpu is given")
    p.add_argument("--gpu", type=_gpus, default=None, help="measure this GPU")
    p.add_argument("--batch", default="", help="batch sizes, e.g. 1,64,256 (the default; --quick: 1,64)")
    p.add_argument("--train", action="store_true", help="training only (default: training and inference)")
    p.add_argument("--infer", action="store_true", help="inference only")
    p.add_argument("--compare", default="", choices=["", "torch"], help="measure PyTorch beside (eager; on a GPU "
                   "its CUDA graph too)")
    p.add_argument("--quick", action="store_true", help="3 short repeats; the big nets at batch 1 and 2 only")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timed blocks per case (default 5; --quick 3)")
    p.add_argument("--watts-per-core", type=float, default=5.0,
                   help="the CPU energy estimate's input where no RAPL counter is readable (default 5 W)")
    p.add_argument("--report", required=True, help="the folder for bench.json, report.md, report.html, plots")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("compare", help="two models on one input, tensor by tensor (exit 1 where they differ)")
    p.add_argument("a", help="model.onnx (ONNX Runtime), espresso:model.onnx (imported), net.prototxt:weights, "
                             "or weights (.caffemodel, .h5, .espz) of --model")
    p.add_argument("b", help="the model to compare with, given the same way")
    p.add_argument("--input", type=_input, required=True, help="the input: .npy, or .npz with one array per input")
    p.add_argument("--model", default="", help="the net prototxt of models given as weights alone")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference relative to the first model's largest magnitude (default 1e-4)")
    p.set_defaults(run=cmd_compare)
    p = sub.add_parser("decompress", help="a compressed model -> .caffemodel")
    p.add_argument("input", type=_input, help="the compressed model (.espz)")
    p.add_argument("output", type=_output, help="the .caffemodel to write")
    p.set_defaults(run=cmd_decompress)
    return parser


def main(argv=None):
    """Run one verb; every failure ends as one line on stderr and exit status 1 (Ctrl-C: 130)."""
    logging.getLogger("coremltools").setLevel(logging.WARNING)  # its passes' notes are not ours to print
    argv = sys.argv[1:] if argv is None else argv
    prog = " ".join(["espresso"] + [a for a in argv if not a.startswith("-")][:1])
    try:
        argv, log_flags = glog.split_flags(argv)
        glog.install(log_flags)
        argv = caffe_tools.gflags_booleans(_gflags_to_argparse(argv))
        if "--version" in argv:  # gflags' --version, after a verb too
            print(f"espresso {espresso.__version__}")
            return 0
        args = _parser().parse_args(["--help" if a == "--helpfull" else a for a in argv])
        return args.run(args)
    except EspressoError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:  # a file the verb writes or reads outside the checks
        print(f"{prog}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
