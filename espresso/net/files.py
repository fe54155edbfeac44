"""A Net's weight files: Caffe's .caffemodel (a binary NetParameter, read at the wire level by
espresso/proto/weights.py) and HDF5 layouts, and the formats add-ons register by their magic
bytes (espresso/compress registers its compressed models).  Weights are copied by layer name,
as Caffe's CopyTrainedLayersFrom does: layers the net lacks are skipped."""

import os

from espresso.errors import ModelFileError, ShapeError
from espresso.proto import caffe_pb2
from espresso.proto.text import require_regular
from espresso.proto.upgrade import upgrade_net
from espresso.proto.weights import read_weights, release, write_weights

_FORMATS = {}  # magic bytes -> load(net, path)


def register_format(magic, load):
    """Files that start with the bytes `magic` are read into a net by `load(net, path)` (in
    Net.copy_from, so also Net(proto, weights, ...) and --weights)."""
    _FORMATS[bytes(magic)] = load


def _registered_loader(path):
    try:
        with open(path, "rb") as f:
            head = f.read(max(len(magic) for magic in _FORMATS))
    except OSError:
        return None  # the caffemodel reader reports it
    return next((load for magic, load in _FORMATS.items() if head.startswith(magic)), None)


def copy_from(net, path):
    """Caffe's CopyTrainedLayersFrom; a registered format by its magic bytes, HDF5 included
    (load_hdf5: Caffe asks H5Fis_hdf5, whatever the file's name)."""
    require_regular(path)
    net.sync()
    load = _registered_loader(path)
    if load is not None:
        return load(net, path)
    param, layer_blobs = read_weights(path)
    upgrade_net(param, layer_blobs)  # V0/V1 files: the blob lists follow their layers
    index = _layer_index(net)
    name = os.path.basename(os.fspath(path))
    for source, arrays in zip(param.layer, layer_blobs):
        target = index.get(source.name)
        if target is not None and arrays is not None:
            _copy_layer(net, name, net.engine_layers[target], arrays)
            release(arrays)  # drop the copied file pages: the peak stays near 1x the weights


def _layer_index(net):
    """Layer name -> index; where names repeat, the first such layer takes the weights, as Caffe
    searches from layer 0."""
    index = {}
    for i, name in enumerate(net._layer_names):
        index.setdefault(name, i)
    return index


def _copy_layer(net, path, layer, arrays):
    if len(arrays) != len(layer.blobs):
        raise ModelFileError(f"{path}: layer '{layer.name}': {len(arrays)} blobs in file, "
                             f"{len(layer.blobs)} in net")
    for k, ((array, legacy), blob) in enumerate(zip(arrays, layer.blobs)):
        if not _shape_matches(array.shape, legacy, blob.shape):
            raise ShapeError(f"{path}: layer '{layer.name}': param {k} shape {tuple(array.shape)} "
                             f"does not match net {blob.shape}; rename the layer to learn it from scratch")
        _copy_released(net, array.reshape(blob.shape), blob.data)


COPY_BYTES = 16 << 20  # a file's pages copied, then released, at a time


def _copy_released(net, source, target):
    """target = source (a view of the mapped file), row blocks of about COPY_BYTES at a time,
    each block's file pages released once copied: the peak stays near 1x the weights even for
    one layer as large as VGG-16's fc6 (411 MB)."""
    if source.ndim == 0 or source.nbytes <= COPY_BYTES:
        target[...] = net.backend.to_device(source, net.dtype)
        return
    step = max(1, COPY_BYTES * len(source) // source.nbytes)
    for start in range(0, len(source), step):
        target[start:start + step] = net.backend.to_device(source[start:start + step], net.dtype)
        release([source[start:start + step]])


def _shape_matches(file_shape, legacy, net_shape):
    """Caffe's Blob::ShapeEquals: legacy 4-D blobs match counting axes from the end."""
    if not legacy:
        return tuple(file_shape) == tuple(net_shape)
    if len(net_shape) > 4:
        return False
    return tuple(file_shape) == (1,) * (4 - len(net_shape)) + tuple(net_shape)


def save(net, path, diff=False):
    """The weights (and with `diff`, their gradients) as a binary .caffemodel (Caffe's
    Net::ToProto + WriteProtoToBinaryFile)."""
    net.sync()
    param = caffe_pb2.NetParameter(name=net.name)
    blobs = []
    for layer in net.engine_layers:
        lp = param.layer.add()
        lp.CopyFrom(layer.lp)
        del lp.blobs[:]
        blobs.append([(b.host_data(), b.host_diff() if diff else None) for b in layer.blobs])
    write_weights(path, param, blobs)


def save_hdf5(net, path, diff=False):
    """Caffe's Net::ToHDF5 (pycaffe's save_hdf5 writes the data only): group "data" holds a
    group per layer, named after it, with a dataset "0", "1", ... per param blob; `diff` adds a
    "diff" group laid out alike.  As in Caffe, every layer gets its group (empty without params)
    and a param shared from another layer has no data dataset, only a diff."""
    from espresso import hdf5

    net.sync()

    def fill(f):
        data, diffs = f.create_group("data"), f.create_group("diff") if diff else None
        for layer in net.engine_layers:
            if layer.name in data:
                raise ModelFileError(f"{path}: two layers named '{layer.name}'; HDF5 weights are "
                                     "keyed by layer name (Caffe fails there too)")
            group = data.create_group(layer.name)
            diff_group = diffs.create_group(layer.name) if diff else None
            for k, blob in enumerate(layer.blobs):
                if _owns(net, blob):
                    group.create_dataset(str(k), data=blob.host_data())
                if diff:
                    diff_group.create_dataset(str(k), data=blob.host_diff())

    check_hdf5_names(net, path)
    hdf5.write_file(path, fill)


def check_hdf5_names(net, path):
    """HDF5 weights are keyed by layer name, and h5py reads "/" as a path (Caffe's ToHDF5 fails
    there): such a name would be lost without a word on loading, so it is refused."""
    for layer in net.engine_layers:
        if not layer.name or "/" in layer.name:
            raise ModelFileError(f"{path}: layer name {layer.name!r} cannot key HDF5 weights (empty or "
                                 "holding '/'); rename the layer or use snapshot_format: BINARYPROTO")


def load_hdf5(net, path):
    """Caffe's CopyTrainedLayersFromHDF5: copy "data/<layer>/<k>" into each net layer of that name
    (all of them, where names repeat), skipping layers the file lacks.  A layer may hold fewer
    datasets than the net's layer has blobs only where the missing ones are shared from another
    layer; shapes must match exactly."""
    from espresso import hdf5

    net.sync()
    name = os.path.basename(os.fspath(path))
    with hdf5.open_file(path) as f:
        if f.get("data", getlink=True) is None:
            raise ModelFileError(f"{path}: no 'data' group; not a Caffe HDF5 weights file")
        data = hdf5.member(f, "data", "group", path)
        for layer in net.engine_layers:
            if layer.name in data:
                group = hdf5.member(data, layer.name, "group", f"{path}: data")
                _copy_layer_hdf5(net, name, layer, group)


def _copy_layer_hdf5(net, path, layer, group):
    from espresso import hdf5

    where = f"{path}: layer '{layer.name}'"
    if len(group) > len(layer.blobs):
        raise ModelFileError(f"{where}: {len(group)} blobs in file, {len(layer.blobs)} in net")
    for k, blob in enumerate(layer.blobs):
        if str(k) not in group:
            if _owns(net, blob):
                raise ModelFileError(f"{where}: no dataset '{k}' for param {k} "
                                     f"({len(group)} blobs in file, {len(layer.blobs)} in net)")
            continue  # shared from another layer, which carries it
        array = hdf5.load_array(group, str(k), where)
        if array.shape != blob.shape:
            raise ShapeError(f"{where}: param {k} shape {tuple(array.shape)} does not match "
                             f"net {blob.shape}; rename the layer to learn it from scratch")
        blob.data[...] = net.backend.to_device(array, net.dtype)


def _owns(net, blob):
    """False for a param shared from an earlier layer (Caffe: param_owners_ != -1)."""
    return net._owner(blob) is blob


register_format(b"\x89HDF\r\n\x1a\n", load_hdf5)  # HDF5's signature, at byte 0 as h5py writes it
