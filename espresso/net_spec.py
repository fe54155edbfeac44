"""pycaffe's net specification: write a net in Python, get a NetParameter.

    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[64, 1, 28, 28]))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    net_param = n.to_proto()

As BVLC Caffe 1.0's python/caffe/net_spec.py: layers come out in topological order (depth first
from each named top, in assignment order); a layer and its first top take the NetSpec name
they were assigned, others get `<Type><count>` names; keyword arguments go to the layer's
`<type>_param` when that message has the field, else to LayerParameter itself (loss_weight,
include, param...); arguments ending in `param` always go to LayerParameter.  Lists fill
repeated fields, dicts fill sub-messages, and a scalar given for a repeated field becomes a
one-element list.  Differences, deliberate: an unknown field or a bad value raises
LayerParamError naming the layer and the field path (pycaffe raised a bare AttributeError or
TypeError, sometimes after half-assigning), enum fields also accept their value names
("MAX"), and building the proto does not recurse, so very deep nets do not hit Python's
recursion limit.
"""

import collections

from espresso.errors import LayerParamError, NetError, did_you_mean
from espresso.proto import caffe_pb2


def param_name_dict():
    """Layer type name -> `<x>` of its `<x>_param` field, by Caffe's naming rule.

    Every LayerParameter field `<x>_param` of message type `<T>Parameter` gives T -> x, e.g.
    InnerProduct -> inner_product.  Types whose parameters live under another name (Deconvolution
    uses convolution_param) are not in it and need `convolution_param=dict(...)` spelled out.
    """
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            names[field.message_type.name[:-len("Parameter")]] = field.name[:-len("_param")]
    return names


_PARAM_NAMES = param_name_dict()


# *** assigning Python values to protobuf fields ***
def _field(message, name, path):
    field = message.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        hint = did_you_mean(name, message.DESCRIPTOR.fields_by_name)
        raise LayerParamError(f"{path}: {message.DESCRIPTOR.name} has no field '{name}'{hint}")
    return field


def _is_repeated(field):
    # protobuf >= 6 has is_repeated and later ones drop `label`; older ones only have `label`
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def assign_proto(message, name, value, path=""):
    """Set field `name` of `message` from a Python value: list -> repeated, dict -> message."""
    path = f"{path}.{name}" if path else name
    field = _field(message, name, path)
    is_message = field.type == field.TYPE_MESSAGE
    if _is_repeated(field):
        # a NumPy array counts as a list too (dim=arr.shape is common); pycaffe wrapped it whole
        is_seq = isinstance(value, (list, tuple, range)) or getattr(value, "ndim", 0) > 0
        items = list(value) if is_seq else [value]
        container = getattr(message, name)
        for k, item in enumerate(items):
            if is_message:
                _fill_message(container.add(), item, f"{path}[{k}]")
            else:
                _set(lambda v: container.append(v), item, path)
    elif is_message:
        _fill_message(getattr(message, name), value, path)
    else:
        _set(lambda v: setattr(message, name, v), value, path)


def _fill_message(message, value, path):
    if isinstance(value, type(message)):
        message.CopyFrom(value)
        return
    if not isinstance(value, dict):
        raise LayerParamError(f"{path}: expected a dict for {message.DESCRIPTOR.name}, got {value!r}")
    for key, item in value.items():
        assign_proto(message, key, item, path)


def _set(setter, value, path):
    try:
        setter(value)
    except (TypeError, ValueError) as e:
        raise LayerParamError(f"{path}: cannot assign {value!r}: {e}") from None


# *** the graph: Top (one output blob) and Function (one layer) ***
class BottomTypeError(NetError, TypeError):
    """A layer's input that is not a Top (pycaffe raises TypeError)."""


class Top:
    """Output `n` of a layer-to-be; pass it as a bottom, or assign it to a NetSpec to name it."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter with every layer needed to compute this top (auto names)."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)

    def __repr__(self):
        return f"<Top {self.n} of L.{self.fn.type_name}>"


class Function:
    """One layer: its type, its bottoms (Tops) and the keyword arguments that fill its fields."""

    def __init__(self, type_name, inputs, params):
        self.type_name = type_name
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        for k, inp in enumerate(inputs):
            if not isinstance(inp, Top):  # pycaffe's words, which its tests match
                raise BottomTypeError(f"{type_name} input {k} is not a Top (type is {type(inp)})")
        self.inputs = tuple(inputs)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames):
        """The layer's name: its NetSpec name, else its first top's name, else `<Type><count>`."""
        if self not in names:
            if self.ntop > 0:
                names[self] = self._get_top_name(self.tops[0], names, autonames)
            else:
                names[self] = _autoname(self.type_name, autonames)
        return names[self]

    def _get_top_name(self, top, names, autonames):
        if top not in names:
            names[top] = _autoname(top.fn.type_name, autonames)
        return names[top]

    def _to_proto(self, layers, names, autonames):
        """Add this layer, after every layer it depends on, to `layers` (fn -> LayerParameter)."""
        # an explicit stack does the depth-first post-order walk pycaffe did recursively
        stack = [(self, 0)]
        while stack:
            fn, k = stack.pop()
            if fn in layers:
                continue
            if k < len(fn.inputs):
                stack.append((fn, k + 1))
                stack.append((fn.inputs[k].fn, 0))
            else:
                layers[fn] = fn._layer(layers, names, autonames)

    def _layer(self, layers, names, autonames):
        """This layer's LayerParameter; its bottoms' layers are already in `layers`."""
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(layers[inp.fn].top[inp.n] for inp in self.inputs)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._get_top_name(top, names, autonames) for top in self.tops)
        layer.name = self._get_name(names, autonames)
        for key, value in self.params.items():
            self._assign(layer, key, value)
        return layer

    def _assign(self, layer, key, value):
        where = f"layer '{layer.name}' (L.{self.type_name})"
        param = _PARAM_NAMES.get(self.type_name)
        target, path = layer, ""
        if not key.endswith("param") and param is not None:
            sub = getattr(layer, param + "_param")
            if key in sub.DESCRIPTOR.fields_by_name:
                target, path = sub, param + "_param"
        if target is layer and key not in layer.DESCRIPTOR.fields_by_name:
            home = f"{param}_param or LayerParameter" if param else "LayerParameter"
            known = list(layer.DESCRIPTOR.fields_by_name)
            if param:
                known += list(getattr(layer, param + "_param").DESCRIPTOR.fields_by_name)
            raise LayerParamError(f"{where}: no field '{key}' in {home}{did_you_mean(key, known)}")
        try:
            assign_proto(target, key, value, path)
        except LayerParamError as e:
            raise LayerParamError(f"{where}: {e}") from None


def _autoname(type_name, autonames):
    autonames[type_name] += 1
    return f"{type_name}{autonames[type_name]}"


def to_proto(*tops):
    """A NetParameter with every layer needed to compute `tops`, all blobs and layers auto-named."""
    layers = collections.OrderedDict()
    autonames = collections.Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops, assigned as attributes (`n.conv1 = L.Convolution(...)`) or items (`n["conv1"]`).

    to_proto() gives the layers needed for all of them, named by their attribute names.
    """

    def __init__(self):
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top '{name}'{did_you_mean(name, self.tops)}") from None

    def __setitem__(self, name, value):
        self.tops[name] = value

    def __getitem__(self, name):
        return self.tops[name]

    def to_proto(self):
        names = {value: name for name, value in self.tops.items()}
        autonames = collections.Counter()
        layers = collections.OrderedDict()
        for name, value in self.tops.items():
            if not isinstance(value, (Top, Function)):
                multi = isinstance(value, tuple)
                hint = "; unpack several outputs: n.a, n.b = L.X(..., ntop=2)" if multi else ""
                raise NetError(f"NetSpec top '{name}' must be a layer output, "
                               f"got {type(value).__name__}{hint}")
            value._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """`L.<Type>(*bottoms, **fields)`: a Top (ntop=1), a tuple of Tops, or the layer itself (ntop=0)."""

    def __getattr__(self, type_name):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer_fn(*args, **kwargs):
            fn = Function(type_name, args, kwargs)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops

        return layer_fn


class Parameters:
    """`P.<Type>.<NAME>`: the enum value NAME of `<Type>Parameter`, e.g. P.Pooling.MAX == 0."""

    def __getattr__(self, type_name):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        return _EnumValues(type_name)


class _EnumValues:
    def __init__(self, type_name):
        self._message = getattr(caffe_pb2, type_name + "Parameter", None)
        if self._message is None:
            known = [n[:-len("Parameter")] for n in dir(caffe_pb2) if n.endswith("Parameter")]
            hint = did_you_mean(type_name, known)
            raise AttributeError(f"no message {type_name}Parameter in caffe.proto{hint}")
        self._type_name = type_name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        for enum in self._message.DESCRIPTOR.enum_types:
            if name in enum.values_by_name:
                return enum.values_by_name[name].number
        if hasattr(self._message, name):  # e.g. the enum type itself, as pycaffe's getattr gave
            return getattr(self._message, name)
        raise AttributeError(f"{self._type_name}Parameter has no enum value '{name}'")


layers = Layers()
params = Parameters()
