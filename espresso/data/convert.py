"""Caffe's dataset tools as plain functions: convert_mnist_data, convert_imageset,
compute_image_mean, convert_cifar_data, convert_mnist_siamese_data and extract_features, writing
and reading databases of Datum records (backend "lmdb", the converters' default, or "leveldb").

Each takes an optional `progress(done, total)` callback, called every COMMIT_EVERY records
and at the end.
"""

import os

import numpy as np

from espresso.data import DatasetError
from espresso.data.db import COMMIT_EVERY, decode_datum, encoded_datum, make_datum, new_db, open_db
from espresso.data.idx import read_mnist
from espresso.data.image import encode_image, read_image, read_image_list
from espresso.proto import caffe_pb2
from espresso.proto.text import write_binary
from espresso.runtime import host_rng


def _report(progress, done, total):
    if progress is not None and (done % COMMIT_EVERY == 0 or done == total):
        progress(done, total)


def convert_mnist(images_idx, labels_idx, db_path, progress=None, backend="lmdb"):
    """Caffe's convert_mnist_data: a database of 1 x rows x cols uint8 Datums keyed %08d.
    Returns the number of records written."""
    images, labels = read_mnist(images_idx, labels_idx)
    with new_db(db_path, backend) as db:
        for i, (image, label) in enumerate(zip(images, labels)):
            db.put(f"{i:08d}", make_datum(image[np.newaxis], label))
            _report(progress, i + 1, len(images))
    return len(images)


def _extension(name):
    return os.path.splitext(name)[1][1:].lower()


def _image_datum(path, label, height, width, is_color, encoding):
    """Caffe's ReadImageToDatum: raw pixels, or with `encoding` the file's own bytes when they
    already have that format and need no resize, else the image re-encoded."""
    chw = read_image(path, height, width, is_color)
    if not encoding:
        datum = make_datum(chw, label)
        datum.encoded = False  # written, as Caffe's CVMatToDatum writes it
        return datum
    ext = _extension(path)
    if not height and not width and (ext == encoding or (encoding == "jpg" and ext == "jpeg")):
        with open(path, "rb") as f:
            return encoded_datum(f.read(), label)
    return encoded_datum(encode_image(chw, encoding), label)


def convert_imageset(root_folder, list_file, db_path, resize_height=0, resize_width=0, gray=False,
                     shuffle=False, encoded=False, encode_type="", seed=None, progress=None, backend="lmdb",
                     check_size=False):
    """Caffe's convert_imageset: the images of `list_file` ("<file> <label>" lines; paths are
    root_folder + file, concatenated as in Caffe) into a database keyed "%08d_<file>".

    Images that cannot be read are skipped, as in Caffe.  `seed` fixes the shuffle (default: the
    global seed).  `check_size` refuses a raw image whose pixel count differs from the first's.
    Returns (records written, [skipped file names]).
    """
    entries = read_image_list(list_file, keep_blank=True)  # a blank line takes a key, as in Caffe
    encoded = encoded or bool(encode_type)  # Caffe: "encode_type specified, assuming encoded=true"
    if shuffle:
        rng = np.random.default_rng(seed) if seed is not None else host_rng()
        entries = [entries[i] for i in rng.permutation(len(entries))]
    written, skipped, size = 0, [], None
    with new_db(db_path, backend) as db:
        for line_id, (name, label) in enumerate(entries):
            encoding = (encode_type or _extension(name)).lower() if encoded else ""
            try:
                datum = _image_datum(root_folder + name, label, resize_height, resize_width, not gray, encoding)
            except DatasetError:
                skipped.append(name)
                continue
            if check_size and not encoding:  # Caffe's check: the data field's size, against the first's
                size = size or datum.channels * datum.height * datum.width
                if len(datum.data) != size:
                    raise DatasetError(f"{name}: Incorrect data field size {len(datum.data)} (the first image's "
                                       f"is {size}); resize with --resize_height/--resize_width")
            db.put(f"{line_id:08d}_{name}", datum)
            written += 1
            if progress is not None and written % COMMIT_EVERY == 0:
                progress(written, len(entries))
    if progress is not None and written % COMMIT_EVERY:  # Caffe's count: the records written
        progress(written, len(entries))
    return written, skipped


def compute_image_mean(db_path, output=None, progress=None, backend="lmdb"):
    """Caffe's compute_image_mean: the mean Datum of a database as a float32 1 x C x H x W array,
    written to `output` (a .binaryproto with legacy num/channels/height/width) when given."""
    with open_db(db_path, backend) as reader:
        total, count, shape = None, 0, None
        for key, value in reader.items():
            array, _ = decode_datum(value, None, f"{db_path}: record {key.decode(errors='replace')}")
            if shape is None:
                shape, total = array.shape, np.zeros(array.shape, np.float32)  # Caffe sums in float
            elif array.shape != shape:
                raise DatasetError(f"{db_path}: record {key!r} has shape {array.shape}, the first {shape}")
            total += array.astype(np.float32)
            count += 1
            _report(progress, count, len(reader))
    mean = (total / np.float32(count)).reshape((1,) + shape)  # in float, as Caffe
    if output is not None:
        blob = caffe_pb2.BlobProto(num=1, channels=shape[0], height=shape[1], width=shape[2])
        blob.data.extend(mean.ravel().tolist())
        write_binary(output, blob)
    return mean


CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the R, G and B planes of 32 x 32


def convert_cifar(input_folder, output_folder, backend="lmdb", progress=None):
    """Caffe's convert_cifar_data: CIFAR-10's binary batches (data_batch_1..5.bin, test_batch.bin)
    into <output_folder>/cifar10_train_<backend> (50,000 records keyed %05d) and
    cifar10_test_<backend> (10,000); the pixels stay in the file's RGB plane order, as Caffe's.
    Returns (train records, test records)."""
    counts = []
    for split, files in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        with new_db(os.path.join(output_folder, f"cifar10_{split}_{backend}"), backend) as db:
            index = 0
            for name in files:
                for label, pixels in _cifar_records(os.path.join(input_folder, name)):
                    db.put(f"{index:05d}", make_datum(pixels.reshape(3, 32, 32), label))
                    index += 1
                    _report(progress, index, 10000 * len(files))
        counts.append(index)
    return tuple(counts)


def _cifar_records(path):
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the CIFAR-10 batch: {e.strerror}") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DatasetError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                           f"({CIFAR_RECORD} bytes each)")
    records = raw.reshape(-1, CIFAR_RECORD)
    return zip(records[:, 0].astype(np.int8).tolist(), records[:, 1:])  # Caffe reads the label as a char


def convert_mnist_siamese(images_idx, labels_idx, db_path, seed=None, backend="leveldb", progress=None):
    """Caffe's convert_mnist_siamese_data: as many records as images, each a random pair (i, j)
    as one 2 x rows x cols Datum, labelled 1 when both images show the same class, keyed %08d;
    LevelDB, as Caffe writes it.  Pairs come from NumPy's generator (Caffe's differ).  Returns
    the number of records."""
    images, labels = read_mnist(images_idx, labels_idx)
    rng = np.random.default_rng(seed) if seed is not None else host_rng()
    pairs = rng.integers(0, len(images), (len(images), 2))
    with new_db(db_path, backend) as db:
        for item, (i, j) in enumerate(pairs):
            db.put(f"{item:08d}", make_datum(np.stack([images[i], images[j]]), int(labels[i] == labels[j])))
            _report(progress, item + 1, len(images))
    return len(images)


def extract_features(net, blob_names, db_paths, batches, backend="lmdb", progress=None):
    """Caffe's extract_features: run `batches` forward passes of `net` and store each item of each
    named blob as a float Datum (channels, height, width of the blob's legacy 4-D axes) in the
    database of the same position, keyed %010d.  Returns the items written, per blob."""
    if len(blob_names) != len(db_paths):
        raise DatasetError(f"the number of blob names and dataset names must be equal: "
                           f"{len(blob_names)} and {len(db_paths)}")
    for name in blob_names:
        if name not in net.blobs:
            raise DatasetError(f"Unknown feature blob name {name} in the network")
    dbs, written = [new_db(path, backend) for path in db_paths], [0] * len(blob_names)
    try:
        for batch in range(batches):
            net.forward()
            for k, (name, db) in enumerate(zip(blob_names, dbs)):
                blob = net.blobs[name]
                for item in blob.data.reshape(blob.num, -1):
                    datum = caffe_pb2.Datum(channels=blob.channels, height=blob.height, width=blob.width)
                    datum.float_data.extend(item.tolist())
                    db.put(f"{written[k]:010d}", datum)
                    written[k] += 1
            if progress is not None:
                progress(batch + 1, batches)
    finally:
        for db in dbs:
            db.close()
    return written
