"""The layers that read datasets: Data (LMDB, LevelDB), ImageData, MemoryData, HDF5Data, HDF5Output.

Caffe's prefetching data layers reshape and fill their tops in forward; reshape() does nothing.
Random choices (crops, mirrors, shuffles, rand_skip) use generators seeded from
espresso.runtime.host_rng() at setup, so set_random_seed reproduces a run.  In data-parallel
training (espresso/parallel.py) a TRAIN-phase Data or HDF5Data layer of rank r among N reads
records r, r + N, r + 2N, ... of the combined batch of N x batch_size consecutive records, as
Caffe's readers skip; its position (and cursor) is the combined one.  Data, ImageData and
HDF5Data give a cursor() (the position of the next batch and the generators' states) that a
snapshot saves and seek() takes back, so a resumed run reads what a straight run would.
"""

import os
import warnings
import weakref

import numpy as np

from espresso import cursor as saved
from espresso.data import DatasetError, require
from espresso.data.db import decode_datum, decode_datums, open_db
from espresso.data.image import read_image, read_image_list
from espresso.data.prefetch import Prefetcher
from espresso.data.transformer import DataTransformer
from espresso.errors import NetError, ShapeError
from espresso.layer import Layer, register
from espresso.proto import caffe_pb2
from espresso.runtime import host_rng, solver_count, solver_rank

CACHE_LIMIT_BYTES = 2 << 30  # a Data layer decodes datasets up to this size once, at setup
# old fields of the data params, moved to transform_param long ago: field -> its replacement
_DEPRECATED = {name: name for name in ("scale", "mean_file", "crop_size", "mirror")}


def _seeded_rng():
    return np.random.default_rng(int(host_rng().integers(2**63)))


class _DataLayerBase(Layer):
    """Shared by the layers that read a dataset: no bottoms, no backward, tops set in forward."""

    exact_bottoms = 0
    capturable = False  # reads host data per batch (Data overrides this when it can)
    prefetcher = None

    def reject_deprecated(self, fields=_DEPRECATED):
        for name, replacement in fields.items():
            if self.p.HasField(name):
                self.fail(f"{self.param}.{name} is deprecated and unused by Caffe; use transform_param.{replacement}")

    def positive_batch_size(self):
        if self.p.batch_size <= 0:
            self.fail(f"{self.param}.batch_size: must be > 0, got {self.p.batch_size}")
        return self.p.batch_size

    @property
    def shard(self):
        """(rank, ranks): this layer reads record rank of every ranks (TEST nets read all)."""
        return (solver_rank(), solver_count()) if self.phase == caffe_pb2.TRAIN else (0, 1)

    def make_transformer(self):
        return DataTransformer(self.lp.transform_param, self.phase, self.backend, self.dtype, self.fail)

    def start_prefetch(self, fill, buffers, *closing):
        """Run `fill` in a thread, in place of the one running (which read ahead from where a
        seek has moved us); stop it, and close `closing`, when this layer is collected."""
        if self.prefetcher is None:
            self._running = []  # the thread that the finalizer stops
            weakref.finalize(self, _shutdown, self._running, *closing)
        else:
            self.prefetcher.close()  # first: the new thread fills the same buffers
        self.prefetcher = Prefetcher(fill, buffers, name=f"espresso-{self.type}-{self.name}")
        self._running[:] = [self.prefetcher]

    def next_batch(self):
        try:
            return self.prefetcher.get()
        except DatasetError as e:
            self.fail(str(e), DatasetError)

    def reshape(self, bottom, top):
        pass

    def seek(self, cursor):
        """Continue from a snapshot's cursor(); one saved on a dataset of another size is set
        aside with a warning, the data starting over (as it always does in Caffe)."""
        if saved.mapping(cursor).get("n") != self.dataset_size():
            warnings.warn(f"{self.where}: the snapshot was read from a dataset of {cursor.get('n')!r} items, "
                          f"this one has {self.dataset_size()}: its data starts over", stacklevel=2)
            return
        self.go_to(cursor)


def _shutdown(running, *closing):
    running[0].close()
    for thing in closing:
        thing.close()


# *** Data: Datum records from an LMDB or LevelDB ***
class _DatumDecoder:
    """(item, label) of one record; every item must have the first one's shape and type."""

    def __init__(self, source, color):
        self.source, self.color, self.expected = source, color, None

    def __call__(self, key, value):
        what = f"{self.source}: record {key.decode(errors='replace')}"
        array, label = decode_datum(value, self.color, what)
        if self.expected is None:
            self.expected = (array.shape, array.dtype)
        elif (array.shape, array.dtype) != self.expected:
            raise DatasetError(f"{what}: shape {array.shape} {array.dtype}, but the first record is "
                               f"{self.expected[0]} {self.expected[1]}; every record must have the same shape")
        return array, label


class _DatumBatches:
    """Fills (data, labels) host buffers with record rank of every ranks, wrapping around (in the
    thread); the others are passed over undecoded."""

    def __init__(self, reader, skip, decode, shard):
        self.records, self.decode, (self.rank, self.ranks) = reader.cycle(skip), decode, shard

    def __call__(self, buffer):
        data, labels = buffer
        for i in range(len(data)):
            for _ in range(self.rank):
                next(self.records)
            data[i], labels[i] = self.decode(*next(self.records))
            for _ in range(self.ranks - 1 - self.rank):
                next(self.records)


@register
class DataLayer(_DataLayerBase):
    """Datum records of an LMDB or LevelDB in key order, wrapping around at the end.  Honors
    data_param: source, batch_size, backend (LEVELDB, Caffe's default, or LMDB), rand_skip, prefetch; and
    transform_param.  Tops: data (batch_size, C, H, W after the crop) and optionally label.

    A dataset decoding to at most CACHE_LIMIT_BYTES is decoded once at setup and kept on the
    device, each batch then being a slice and a vectorized transform; larger ones stream from a
    prefetch thread through pinned host buffers (on a GPU, copied on a side stream).  Differs
    from Caffe 1.0: rand_skip is honored (a random 0..rand_skip-1 records are skipped at the
    start, as ImageData does); Caffe 1.0's Data layer ignores it.
    """

    type = "Data"
    param = "data_param"
    legacy = "DATA"
    min_tops, max_tops = 1, 2

    def setup(self, bottom, top):
        self.reject_deprecated({**_DEPRECATED, "force_encoded_color": "force_color"})
        batch_size = self.positive_batch_size()
        self.transformer = self.make_transformer()
        reader = self._open()
        self.decode = _DatumDecoder(self.p.source, self.transformer.color)
        try:
            first, _ = self.decode(*reader.first())
        except DatasetError as e:
            self.fail(str(e), DatasetError)
        skip = int(host_rng().integers(self.p.rand_skip)) if self.p.rand_skip else 0
        self.size = len(reader)
        if self.size * first.nbytes <= CACHE_LIMIT_BYTES:
            with reader:
                self._load_all(reader, skip)
        else:
            self.cache, self.reader, self.pos = None, reader, skip % self.size
            pinned = self.backend.pinned_empty  # on a GPU: copied on a side stream (_forward_prefetched)
            self.buffers = [(pinned((batch_size,) + first.shape, first.dtype), pinned(batch_size, np.float64))
                            for _ in range(max(2, self.p.prefetch))]
            self.uploader = self.backend.uploader(self.buffers[0])
            self.start_prefetch(_DatumBatches(reader, self.pos, self.decode, self.shard), self.buffers, reader)
        top[0].reshape((batch_size,) + self.transformer.out_shape(first.shape))
        if len(top) > 1:
            top[1].reshape(batch_size)

    def _open(self):
        try:
            return open_db(self.p.source, caffe_pb2.DataParameter.DB.Name(self.p.backend))
        except DatasetError as e:
            self.fail(f"data_param.source: {e}", DatasetError)

    def _load_all(self, reader, skip):
        decoded = decode_datums((value for _, value in reader.items()), len(reader))
        data, labels = decoded if decoded is not None else self._decode_each(reader)
        self.cache = self.backend.to_device(data)  # uint8 stays uint8: 1 byte per pixel on the device
        self.cache_labels = self.backend.to_device(labels, self.dtype)
        self.pos = skip % len(data)
        if not self.backend.host_arrays:  # on a GPU the cursor lives on the device, so a graph can advance it
            batch, (rank, ranks) = self.p.batch_size, self.shard
            self.pos = self.xp.full((1,), self.pos, np.int64)
            self.batch_offsets, self.rows = self.xp.arange(batch) * ranks + rank, self.xp.empty(batch, np.int64)
            self.flat_mean = None  # the transform's mean, one value per value of an item

    def _decode_each(self, reader):
        shape, dtype = self.decode.expected
        data, labels = np.empty((len(reader),) + shape, dtype), np.empty(len(reader))
        try:
            for i, (key, value) in enumerate(reader.items()):
                data[i], labels[i] = self.decode(key, value)
        except DatasetError as e:
            self.fail(str(e), DatasetError)
        return data, labels

    @property
    def capturable(self):
        """On a GPU with the dataset on the device and no random crop/mirror: a batch is then a
        few kernels with no host input."""
        return self.cache is not None and not self.backend.host_arrays and self.transformer.rng is None

    def forward(self, bottom, top):
        if self.cache is None:
            return self._forward_prefetched(top)
        if not self.backend.host_arrays:
            return self._forward_device_cursor(top)
        n, batch_size, (rank, ranks) = len(self.cache), top[0].shape[0], self.shard
        if ranks == 1 and self.pos + batch_size <= n:  # a view: no gather needed
            rows = slice(self.pos, self.pos + batch_size)
        else:
            rows = self.xp.asarray((self.pos + np.arange(batch_size) * ranks + rank) % n)
        self.pos = (self.pos + batch_size * ranks) % n
        self.transformer(self.cache[rows], top[0].data)
        if len(top) > 1:
            top[1].data[...] = self.cache_labels[rows]

    def _forward_device_cursor(self, top):
        """The host path's rows (pos, pos+1, ... mod n) from a device cursor, as one gather."""
        xp, n, t = self.xp, len(self.cache), self.transformer
        if not t.p.crop_size and t.rng is None:  # (x - mean) * scale per value: gathered in one kernel
            if self.flat_mean is None and t.mean is not None:
                self.flat_mean = xp.broadcast_to(t.mean, self.cache.shape[1:]).ravel()  # a copy, once
            self.k.gather_batch(self.cache, self.cache_labels, self.pos, self.flat_mean, t.scale, top[0].data,
                                top[1].data if len(top) > 1 else None, self.shard)
            return
        rows = xp.remainder(xp.add(self.batch_offsets, self.pos, out=self.rows), n, out=self.rows)
        xp.remainder(self.pos + top[0].shape[0] * self.shard[1], n, out=self.pos)
        self.transformer(self.cache[rows], top[0].data)
        if len(top) > 1:
            xp.take(self.cache_labels, rows, out=top[1].data)

    def _forward_prefetched(self, top):
        buffer = self.next_batch()
        # on a GPU: copied from pinned memory on the copy stream, while the GPU works on the last batch
        data, labels = self.uploader(buffer)
        self.transformer(data, top[0].data)
        if len(top) > 1:
            top[1].data[...] = labels
        self.uploader.done()  # (on a GPU: once the copy is done) the thread may refill the host buffer
        self.prefetcher.release(buffer)
        self.pos = (self.pos + len(data) * self.shard[1]) % self.size  # the thread reads ahead; this is where we are

    def dataset_size(self):
        return self.size

    def cursor(self):
        on_device = self.cache is not None and not self.backend.host_arrays
        pos = int(self.backend.to_host(self.pos)[0]) if on_device else int(self.pos)
        return {"n": self.size, "pos": pos, "transform": saved.generator_state(self.transformer.rng)}

    def go_to(self, cursor):
        pos = saved.index(cursor, "pos", self.size)
        saved.set_generator(self.transformer.rng, cursor.get("transform"), "transform")
        if self.cache is None:
            self.pos = pos
            self.start_prefetch(_DatumBatches(self.reader, pos, self.decode, self.shard), self.buffers)
        elif self.backend.host_arrays:
            self.pos = pos
        else:
            self.pos.fill(pos)  # in place: a captured graph reads this array


# *** ImageData: image files listed in a text file ***
class _ImageBatches:
    """Reads batches of listed images (in the thread) in `order`, reshuffled at each epoch's
    end; each batch carries the cursor of the one after it."""

    def __init__(self, entries, order, pos, p, rng):
        self.entries, self.order, self.pos, self.p, self.rng = entries, order, pos, p, rng

    def read(self, index):
        name = self.entries[self.order[index]][0]
        return read_image(self.p.root_folder + name, self.p.new_height, self.p.new_width, self.p.is_color)

    def cursor(self):
        return {"n": len(self.entries), "pos": self.pos, "order": self.order,
                "rng": saved.generator_state(self.rng)}

    def __call__(self, buffer):
        labels, images = buffer[1], []
        for i in range(len(labels)):
            images.append(self.read(self.pos))
            labels[i] = self.entries[self.order[self.pos]][1]
            self.pos += 1
            if self.pos == len(self.entries):
                self.pos = 0
                if self.p.shuffle:  # a new array: the cursors handed out keep theirs
                    self.order = self.rng.permutation(self.order)
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DatasetError(f"{self.p.source}: images of one batch differ in size {sorted(shapes)}; "
                               "set image_data_param.new_height and new_width")
        buffer[0], buffer[2] = np.stack(images), self.cursor()


@register
class ImageDataLayer(_DataLayerBase):
    """Images listed as "<file> <label>" lines, read by a prefetch thread in list order
    (shuffled at setup and every epoch with shuffle).  Honors image_data_param: source,
    root_folder (prefixed to each name), batch_size, rand_skip, shuffle, new_height, new_width,
    is_color; and transform_param.  Colour images are BGR, as OpenCV reads them.  Tops: data
    (reshaped to each batch's images) and label.  Differs from Caffe: images of one batch must
    share a size (Caffe also accepts differing sizes when the crop makes outputs equal).
    """

    type = "ImageData"
    param = "image_data_param"
    legacy = "IMAGE_DATA"
    exact_tops = 2

    def setup(self, bottom, top):
        self.reject_deprecated()
        batch_size = self.positive_batch_size()
        if (self.p.new_height == 0) != (self.p.new_width == 0):
            self.fail("image_data_param: new_height and new_width must be set together")
        self.transformer = self.make_transformer()
        try:
            entries = read_image_list(self.p.source)
        except DatasetError as e:
            self.fail(f"image_data_param.source: {e}", DatasetError)
        rng, order = _seeded_rng(), np.arange(len(entries))
        if self.p.shuffle:
            rng.shuffle(order)
        skip = int(host_rng().integers(self.p.rand_skip)) if self.p.rand_skip else 0
        if skip >= len(entries):
            self.fail(f"image_data_param.rand_skip: skipping {skip} of only {len(entries)} images")
        lister = _ImageBatches(entries, order, skip, self.p, rng)
        try:
            first = lister.read(skip)
        except DatasetError as e:
            self.fail(str(e), DatasetError)
        top[0].reshape((batch_size,) + self.transformer.out_shape(first.shape))
        top[1].reshape(batch_size)
        self.entries, self.buffers = entries, [[None, np.empty(batch_size), None] for _ in range(2)]
        self._start(lister)

    def _start(self, lister):
        self.position = lister.cursor()  # of the next batch forward takes
        self.start_prefetch(lister, self.buffers)

    def forward(self, bottom, top):
        buffer = self.next_batch()
        data, labels, self.position = buffer
        top[0].reshape((len(data),) + self.transformer.out_shape(data.shape[1:]))
        self.transformer(self.backend.to_device(data), top[0].data)
        top[1].data[...] = self.backend.to_device(labels, self.dtype)
        self.prefetcher.release(buffer)

    def dataset_size(self):
        return len(self.entries)

    def cursor(self):
        return {**self.position, "transform": saved.generator_state(self.transformer.rng)}

    def go_to(self, cursor):
        n, rng = len(self.entries), np.random.default_rng()
        pos, order = saved.index(cursor, "pos", n), saved.permutation(cursor, "order", n)
        saved.set_generator(rng, cursor.get("rng"))
        saved.set_generator(self.transformer.rng, cursor.get("transform"), "transform")
        self._start(_ImageBatches(self.entries, order, pos, self.p, rng))


# *** MemoryData: arrays handed over by the user ***
@register
class MemoryDataLayer(_DataLayerBase):
    """Batches taken in order, wrapping around, from arrays given to set_input_arrays(data, labels)
    (pycaffe's net.set_input_arrays).  Honors memory_data_param: batch_size, channels, height,
    width.  Tops: data (batch_size, channels, height, width) and label (batch_size,), which
    (as in Caffe) becomes (batch_size, 1, 1, 1) from the first forward on.
    Differs from pycaffe: arrays of any float type are accepted (converted to the net's dtype)."""

    type = "MemoryData"
    param = "memory_data_param"
    legacy = "MEMORY_DATA"
    exact_tops = 2

    def setup(self, bottom, top):
        for field in ("batch_size", "channels", "height", "width"):
            if getattr(self.p, field) <= 0:
                self.fail(f"memory_data_param.{field}: must be specified and > 0, got {getattr(self.p, field)}")
        p = self.p
        top[0].reshape(p.batch_size, p.channels, p.height, p.width)
        top[1].reshape(p.batch_size)
        self.data = self.labels = None
        self.pos = 0

    def set_input_arrays(self, data, labels):
        """Caffe's MemoryDataLayer::Reset: data (N, channels, height, width), labels (N,) or
        (N, 1, 1, 1), N a positive multiple of batch_size."""
        data, labels = np.asarray(data), np.asarray(labels)
        p, n = self.p, len(data)
        if data.shape[1:] != (p.channels, p.height, p.width) or data.ndim != 4:
            self.fail(f"data array must be N x {p.channels} x {p.height} x {p.width}, got {data.shape}", ShapeError)
        if labels.reshape(len(labels), -1).shape[1:] != (1,) or labels.ndim not in (1, 4):
            self.fail(f"labels array must be N or N x 1 x 1 x 1, got {labels.shape}", ShapeError)
        if len(labels) != n:
            self.fail(f"data and labels must have the same first dimension, got {n} and {len(labels)}", ShapeError)
        if n == 0 or n % p.batch_size:
            self.fail(f"the first dimension of the input arrays ({n}) must be a positive multiple of "
                      f"batch_size ({p.batch_size})", ShapeError)
        if self.lp.HasField("transform_param"):  # Caffe warns likewise
            warnings.warn(f"{self.where}: MemoryData does not transform arrays given to set_input_arrays",
                          stacklevel=2)
        self.data = self.backend.to_device(data, self.dtype)
        self.labels = self.backend.to_device(labels.reshape(n, 1, 1, 1), self.dtype)
        self.pos = 0

    def forward(self, bottom, top):
        if self.data is None:
            self.fail("no input arrays: call set_input_arrays(data, labels) first", NetError)
        rows = slice(self.pos, self.pos + self.p.batch_size)
        top[1].reshape(self.p.batch_size, 1, 1, 1)  # Caffe's Forward does; its setup gives (batch_size,)
        top[0].data[...] = self.data[rows]
        top[1].data[...] = self.labels[rows]
        self.pos = (self.pos + self.p.batch_size) % len(self.data)


def set_input_arrays(net, data, labels):
    """pycaffe's Net.set_input_arrays: feed the net's first MemoryData layer."""
    for layer in net.engine_layers:
        if isinstance(layer, MemoryDataLayer):
            return layer.set_input_arrays(data, labels)
    raise NetError("set_input_arrays may only be called on a net with a MemoryData layer")


# *** HDF5 ***
def _h5py():
    return require("h5py", "HDF5Data and HDF5Output")


def _hdf5_file_list(source):
    """The HDF5 files named in `source` (whitespace-separated, as Caffe reads them); a relative
    name missing from the working directory is looked up beside the list file."""
    try:
        with open(source) as f:
            names = f.read().split()
    except OSError as e:
        raise DatasetError(f"{source}: cannot read the HDF5 file list: {e.strerror}") from None
    if not names:
        raise DatasetError(f"{source}: must list at least 1 HDF5 file")
    beside = os.path.dirname(os.path.abspath(source))
    return [n if os.path.isabs(n) or os.path.exists(n) else os.path.join(beside, n) for n in names]


@register
class HDF5DataLayer(_DataLayerBase):
    """Rows of HDF5 datasets, one top per dataset (named after it), file after file, wrapping
    around.  Honors hdf5_data_param: source (a text file listing .h5 files), batch_size, shuffle
    (file order each epoch and rows within each file).  Tops: (batch_size, *dataset.shape[1:])."""

    type = "HDF5Data"
    param = "hdf5_data_param"
    legacy = "HDF5_DATA"
    min_tops = 1

    def setup(self, bottom, top):
        batch_size = self.positive_batch_size()
        if self.lp.HasField("transform_param"):
            self.fail("HDF5Data does not transform its data: remove transform_param")
        try:
            self.files = _hdf5_file_list(self.p.source)
        except DatasetError as e:
            self.fail(f"hdf5_data_param.source: {e}", DatasetError)
        self.rng = _seeded_rng()
        self.file_order = np.arange(len(self.files))
        if self.p.shuffle:
            self.rng.shuffle(self.file_order)
        self.current_file, self.row_shapes = 0, None
        self._load(self.files[self.file_order[0]])
        self.row_shapes = [a.shape[1:] for a in self.arrays]
        for blob, shape in zip(top, self.row_shapes):
            blob.reshape((batch_size,) + shape)

    def _load(self, path):
        """Caffe's LoadHDF5FileData: every top's dataset, converted to the net's dtype."""
        h5py = _h5py()
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            self.fail(f"cannot open HDF5 file {path}: {e}", DatasetError)
        with f:
            arrays = [self._dataset(f, path, name) for name in self.lp.top]
        rows = {len(a) for a in arrays}
        if len(rows) != 1 or 0 in rows:
            self.fail(f"{path}: datasets {list(self.lp.top)} must have the same, non-zero number of rows, "
                      f"got {[len(a) for a in arrays]}", DatasetError)
        if self.row_shapes is not None and [a.shape[1:] for a in arrays] != self.row_shapes:
            self.fail(f"{path}: row shapes {[a.shape[1:] for a in arrays]} differ from the first "
                      f"file's {self.row_shapes}", DatasetError)
        self.arrays = [self.backend.to_device(a, self.dtype) for a in arrays]
        self.perm, self.row = np.arange(len(arrays[0])), 0
        if self.p.shuffle:
            self.rng.shuffle(self.perm)

    def _dataset(self, f, path, name):
        if name not in f:
            self.fail(f"{path}: no dataset '{name}' for top '{name}' (datasets: {sorted(f)})", DatasetError)
        ds = f[name]
        if ds.ndim < 1 or ds.dtype.kind not in "fiu":
            self.fail(f"{path}: dataset '{name}' must be numeric with at least 1 axis, got "
                      f"{ds.dtype} of shape {ds.shape}", DatasetError)
        return np.asarray(ds[()], dtype=self.dtype)

    def _next_rows(self):
        """Caffe's HDF5DataLayer::Next at the end of a file: the next file (or a wrap), reshuffled."""
        if len(self.files) > 1:
            self.current_file += 1
            if self.current_file == len(self.files):
                self.current_file = 0
                if self.p.shuffle:
                    self.rng.shuffle(self.file_order)
            self._load(self.files[self.file_order[self.current_file]])
        self.row = 0
        if self.p.shuffle:
            self.rng.shuffle(self.perm)

    def dataset_size(self):
        return len(self.files)

    def cursor(self):
        return {"n": len(self.files), "file_order": self.file_order, "current_file": self.current_file,
                "perm": self.perm, "row": self.row, "rng": saved.generator_state(self.rng)}

    def go_to(self, cursor):
        n = len(self.files)
        file_order, current = saved.permutation(cursor, "file_order", n), saved.index(cursor, "current_file", n)
        if file_order[current] != self.file_order[self.current_file]:
            self._load(self.files[file_order[current]])
        self.file_order, self.current_file = file_order, current
        self.perm = saved.permutation(cursor, "perm", len(self.perm))
        self.row = saved.index(cursor, "row", len(self.perm))
        saved.set_generator(self.rng, cursor.get("rng"))

    def forward(self, bottom, top):
        """The combined batch's rows (N x batch_size of them) in order, keeping row rank of every N."""
        (rank, ranks), walked, filled = self.shard, 0, 0
        combined = top[0].shape[0] * ranks
        while walked < combined:  # one gather per file (or epoch) the batch spans
            n = min(combined - walked, len(self.perm) - self.row)
            kept = np.arange((rank - walked) % ranks, n, ranks)
            rows = self.xp.asarray(self.perm[self.row + kept])
            for blob, array in zip(top, self.arrays):
                blob.data[filled:filled + len(kept)] = array[rows]
            filled, walked, self.row = filled + len(kept), walked + n, self.row + n
            if self.row == len(self.perm):
                self._next_rows()


@register
class HDF5OutputLayer(Layer):
    """Writes its bottoms to hdf5_output_param.file_name as datasets "data" and "label", in the
    net's float type and Caffe's 4-D (num, channels, height, width) shapes; the file is created
    at setup.  Differs from Caffe: each forward rewrites the file with the current batch (Caffe
    fails on a second forward, the datasets already existing)."""

    type = "HDF5Output"
    capturable = False
    param = "hdf5_output_param"
    legacy = "HDF5_OUTPUT"
    exact_bottoms = 2
    exact_tops = 0

    def setup(self, bottom, top):
        if not self.p.file_name:
            self.fail("hdf5_output_param.file_name: must be given")
        self._write({})

    def _write(self, datasets):
        h5py = _h5py()
        try:
            with h5py.File(self.p.file_name, "w") as f:
                for name, array in datasets.items():
                    f.create_dataset(name, data=array)
        except OSError as e:
            self.fail(f"cannot write HDF5 file {self.p.file_name}: {e}", DatasetError)

    def reshape(self, bottom, top):
        if bottom[0].num != bottom[1].num:
            self.fail(f"data and label must have the same batch size, got {bottom[0].num} and "
                      f"{bottom[1].num}", ShapeError)
        for blob in bottom:
            if blob.num_axes > 4:
                self.fail(f"bottoms must have at most 4 axes, got shape {blob.shape}", ShapeError)

    def forward(self, bottom, top):
        legacy = [(b.num, b.channels, b.height, b.width) for b in bottom]
        self._write({name: blob.host_data().reshape(shape)
                     for name, blob, shape in zip(("data", "label"), bottom, legacy)})

    def backward(self, top, propagate_down, bottom):
        pass  # Caffe's HDF5OutputLayer::Backward does nothing
