"""Caffe's dataset tools as plain functions: convert_mnist_data, convert_imageset and
compute_image_mean, writing and reading LMDB databases of Datum records.

Each takes an optional `progress(done, total)` callback, called every COMMIT_EVERY records
and at the end.
"""

import os

import numpy as np

from espresso.data import DatasetError
from espresso.data.db import COMMIT_EVERY, LMDBReader, LMDBWriter, decode_datum, encoded_datum, make_datum
from espresso.data.idx import read_mnist
from espresso.data.image import encode_image, read_image, read_image_list
from espresso.proto import caffe_pb2
from espresso.proto.text import write_binary
from espresso.runtime import host_rng


def _report(progress, done, total):
    if progress is not None and (done % COMMIT_EVERY == 0 or done == total):
        progress(done, total)


def convert_mnist(images_idx, labels_idx, db_path, progress=None):
    """Caffe's convert_mnist_data: an LMDB of 1 x rows x cols uint8 Datums keyed %08d.
    Returns the number of records written."""
    images, labels = read_mnist(images_idx, labels_idx)
    with LMDBWriter(db_path) as db:
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
        return make_datum(chw, label)
    ext = _extension(path)
    if not height and not width and (ext == encoding or (encoding == "jpg" and ext == "jpeg")):
        with open(path, "rb") as f:
            return encoded_datum(f.read(), label)
    return encoded_datum(encode_image(chw, encoding), label)


def convert_imageset(root_folder, list_file, db_path, resize_height=0, resize_width=0, gray=False,
                     shuffle=False, encoded=False, encode_type="", seed=None, progress=None):
    """Caffe's convert_imageset: the images of `list_file` ("<file> <label>" lines; paths are
    root_folder + file, concatenated as in Caffe) into an LMDB keyed "%08d_<file>".

    Images that cannot be read are skipped, as in Caffe.  `seed` fixes the shuffle (default: the
    global seed).  Returns (records written, [skipped file names]).
    """
    entries = read_image_list(list_file)
    if shuffle:
        rng = np.random.default_rng(seed) if seed is not None else host_rng()
        entries = [entries[i] for i in rng.permutation(len(entries))]
    written, skipped = 0, []
    with LMDBWriter(db_path) as db:
        for line_id, (name, label) in enumerate(entries):
            encoding = (encode_type or _extension(name)).lower() if encoded else ""
            try:
                datum = _image_datum(root_folder + name, label, resize_height, resize_width, not gray, encoding)
            except DatasetError:
                skipped.append(name)
                continue
            db.put(f"{line_id:08d}_{name}", datum)
            written += 1
            _report(progress, line_id + 1, len(entries))
    return written, skipped


def compute_image_mean(db_path, output=None, progress=None):
    """Caffe's compute_image_mean: the mean Datum of an LMDB as a float32 1 x C x H x W array,
    written to `output` (a .binaryproto with legacy num/channels/height/width) when given."""
    with LMDBReader(db_path) as reader:
        total, count, shape = None, 0, None
        for key, value in reader.items():
            array, _ = decode_datum(value, None, f"{db_path}: record {key.decode(errors='replace')}")
            if shape is None:
                shape, total = array.shape, np.zeros(array.shape, np.float64)
            elif array.shape != shape:
                raise DatasetError(f"{db_path}: record {key!r} has shape {array.shape}, the first {shape}")
            total += array
            count += 1
            _report(progress, count, len(reader))
    # Caffe sums in float and divides by the count in float: exact sums for uint8 data
    mean = (total.astype(np.float32) / np.float32(count)).reshape((1,) + shape)
    if output is not None:
        blob = caffe_pb2.BlobProto(num=1, channels=shape[0], height=shape[1], width=shape[2])
        blob.data.extend(mean.ravel().tolist())
        write_binary(output, blob)
    return mean
