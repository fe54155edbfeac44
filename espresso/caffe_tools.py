"""Caffe's tool binaries as `espresso` verbs, under their own names and arguments:
convert_mnist_data, convert_imageset, compute_image_mean, convert_cifar_data,
convert_mnist_siamese_data, extract_features, upgrade_net_proto_text, upgrade_net_proto_binary
and upgrade_solver_proto_text.  Databases are LMDB unless --backend=leveldb (Caffe's default for
the converters, and its flag)."""

import logging

import espresso
from espresso.data import convert
from espresso.data.db import BACKENDS
from espresso.proto import caffe_pb2
from espresso.proto.text import read_binary, read_text, write_binary, write_text
from espresso.proto.upgrade import upgrade_net, upgrade_solver

log = logging.getLogger("espresso")


BOOLEANS = ("gray", "shuffle", "encoded", "check_size")  # gflags booleans of the converters


def gflags_booleans(argv):
    """gflags' spellings of a boolean: --x alone (never taking the next word), --x=true/false,
    --nox; argparse's store_true gets --x or nothing."""
    out = []
    for word in argv:
        name, eq, value = word.lstrip("-").partition("=")
        if word.startswith("-") and name.removeprefix("no") in BOOLEANS and name not in BOOLEANS and not eq:
            continue  # --nox
        if word.startswith("-") and name in BOOLEANS and eq:
            if value.lower() in ("1", "true", "t", "yes", "y"):
                out.append(f"--{name}")
            elif value.lower() not in ("0", "false", "f", "no", "n"):
                out.append(word)  # argparse says what is wrong with it
            continue
        out.append(word)
    return out


def _bool(p, name, help):
    p.add_argument(name, action="store_true", help=help)


def _backend(p, default="lmdb"):
    p.add_argument("--backend", default=default, choices=BACKENDS, help=f"the database format (default {default})")


def add_parsers(sub):
    from espresso.cli import _input, _output

    p = sub.add_parser("convert-mnist", aliases=["convert_mnist_data"], help="IDX files -> a database")
    p.add_argument("images", type=_input, help="IDX images file (may be .gz)")
    p.add_argument("labels", type=_input, help="IDX labels file (may be .gz)")
    p.add_argument("db", help="the database folder to write")
    _backend(p)
    p.set_defaults(run=cmd_convert_mnist)

    p = sub.add_parser("convert-imageset", aliases=["convert_imageset"], help="image list -> a database")
    p.add_argument("root_folder", help="folder the listed image paths are relative to")
    p.add_argument("listfile", type=_input, help="text file of 'path label' lines")
    p.add_argument("db", help="the database folder to write")
    p.add_argument("--resize_height", type=int, default=0, help="resize images to this height (0: keep)")
    p.add_argument("--resize_width", type=int, default=0, help="resize images to this width (0: keep)")
    _bool(p, "--gray", "read images as one grey channel")
    _bool(p, "--shuffle", "shuffle the list's order")
    _bool(p, "--encoded", "store the encoded image bytes (decoded when read)")
    p.add_argument("--encode_type", default="", help="re-encode as this format (png, jpg) with --encoded")
    _bool(p, "--check_size", "refuse images whose size differs from the first's")
    _backend(p)
    p.set_defaults(run=cmd_convert_imageset)

    p = sub.add_parser("compute-image-mean", aliases=["compute_image_mean"], help="mean image of a database")
    p.add_argument("db", help="the database of Datums")
    p.add_argument("output", nargs="?", type=_output, default="", help="the .binaryproto to write")
    _backend(p)
    p.set_defaults(run=cmd_compute_image_mean)

    p = sub.add_parser("convert-cifar-data", aliases=["convert_cifar_data"],
                       help="CIFAR-10 binary batches -> cifar10_train_<db> and cifar10_test_<db>")
    p.add_argument("input_folder", help="the folder of data_batch_1..5.bin and test_batch.bin")
    p.add_argument("output_folder", help="where the two databases go")
    p.add_argument("db_type", choices=BACKENDS, help="lmdb or leveldb")
    p.set_defaults(run=cmd_convert_cifar)

    p = sub.add_parser("convert-mnist-siamese-data", aliases=["convert_mnist_siamese_data"],
                       help="IDX files -> a database of random image pairs (Caffe's siamese example)")
    p.add_argument("images", type=_input, help="IDX images file")
    p.add_argument("labels", type=_input, help="IDX labels file")
    p.add_argument("db", help="the database folder to write")
    _backend(p, "leveldb")
    p.set_defaults(run=cmd_convert_mnist_siamese)

    p = sub.add_parser("extract-features", aliases=["extract_features"],
                       help="blobs of a net, item by item, into databases of float Datums")
    p.add_argument("weights", type=_input, help="the pretrained .caffemodel")
    p.add_argument("model", type=_input, help="the net prototxt (TEST phase; its data layer feeds it)")
    p.add_argument("blobs", help="blob names, comma-separated")
    p.add_argument("datasets", help="the databases to write, one per blob, comma-separated")
    p.add_argument("batches", type=int, help="forward passes to run")
    p.add_argument("db_type", choices=BACKENDS, help="lmdb or leveldb")
    p.add_argument("device", nargs="*", help="CPU, or GPU and a device id (default CPU)")
    p.set_defaults(run=cmd_extract_features)

    for name, what, run in (("upgrade_net_proto_text", "a net prototxt", cmd_upgrade_net_text),
                            ("upgrade_net_proto_binary", "a binary net (.caffemodel)", cmd_upgrade_net_binary),
                            ("upgrade_solver_proto_text", "a solver prototxt", cmd_upgrade_solver_text)):
        p = sub.add_parser(name.replace("_", "-"), aliases=[name], help=f"{what} in Caffe's current format")
        p.add_argument("input", type=_input, help=f"{what} in any older format")
        p.add_argument("output", type=_output, help="the upgraded file to write")
        p.set_defaults(run=run)


def _progress(what):
    return lambda done, total: log.info("Processed %d of %d %s.", done, total, what)


def _processed(done, total):
    log.info("Processed %d files.", done)  # Caffe's line, every 1000 records written and at the end


def cmd_convert_mnist(args):
    n = convert.convert_mnist(args.images, args.labels, args.db, backend=args.backend)
    log.info("Wrote %s records to %s", n, args.db)
    return 0


def cmd_convert_imageset(args):
    written, skipped = convert.convert_imageset(
        args.root_folder, args.listfile, args.db, args.resize_height, args.resize_width, args.gray, args.shuffle,
        args.encoded, args.encode_type, progress=_processed, backend=args.backend, check_size=args.check_size)
    for name in skipped:
        log.error("Could not open or find file %s", args.root_folder + name)
    return 0


def cmd_compute_image_mean(args):
    mean = convert.compute_image_mean(args.db, args.output or None, backend=args.backend)
    for c, value in enumerate(mean.reshape(mean.shape[1], -1).mean(axis=1)):
        log.info("mean_value channel [%d]: %g", c, value)
    return 0


def cmd_convert_cifar(args):
    train, test = convert.convert_cifar(args.input_folder, args.output_folder, args.db_type)
    log.info("Wrote %d training and %d test records to %s", train, test, args.output_folder)
    return 0


def cmd_convert_mnist_siamese(args):
    n = convert.convert_mnist_siamese(args.images, args.labels, args.db, backend=args.backend)
    log.info("Wrote %d pairs to %s", n, args.db)
    return 0


def cmd_extract_features(args):
    if args.device and args.device[0] == "GPU":
        espresso.set_device(int(args.device[1]) if len(args.device) > 1 else 0)
        espresso.set_mode_gpu()
    else:
        espresso.set_mode_cpu()
    net = espresso.Net(args.model, espresso.TEST, weights=args.weights)
    blobs, datasets = args.blobs.split(","), args.datasets.split(",")
    written = convert.extract_features(net, blobs, datasets, args.batches, args.db_type,
                                       progress=_progress("mini-batches"))
    for name, count in zip(blobs, written):
        log.info("Extracted features of %d query images for feature blob %s", count, name)
    log.info("Successfully extracted the features!")
    return 0


def _report_upgrade(changed, path, output, what):
    if not changed:
        log.error("File already in latest proto format: %s", path)  # an ERROR line, as Caffe's
    log.info("Wrote upgraded %s to %s", what, output)
    return 0


def cmd_upgrade_net_text(args):
    param = read_text(args.input, caffe_pb2.NetParameter())
    before = param.SerializeToString()
    write_text(args.output, upgrade_net(param))
    return _report_upgrade(param.SerializeToString() != before, args.input, args.output, "NetParameter text proto")


def cmd_upgrade_net_binary(args):
    param = read_binary(args.input, caffe_pb2.NetParameter())
    before = param.SerializeToString()
    write_binary(args.output, upgrade_net(param))
    return _report_upgrade(param.SerializeToString() != before, args.input, args.output, "NetParameter binary proto")


def cmd_upgrade_solver_text(args):
    param = read_text(args.input, caffe_pb2.SolverParameter())
    before = param.SerializeToString()
    write_text(args.output, upgrade_solver(param))
    return _report_upgrade(param.SerializeToString() != before, args.input, args.output,
                           "SolverParameter text proto")
