"""Pictures of nets, as Caffe's python/draw_net.py draws them (python/caffe/draw.py).

Layers are filled boxes labelled with their name, type and, for convolution and pooling, kernel
size, stride and pad (blue; convolutions red, pooling orange, inner products purple); layers
running in place are green, with edges to and from the blob they rewrite; blobs are grey
octagons; a layer's top edges carry its output count (a data layer's: its batch size).

The DOT source (.dot, .gv, or Caffe's .raw) needs only the `graphviz` Python package (the `draw`
extra); images (.png, .svg, .pdf, ...) are rendered by Graphviz's `dot` program.
"""

import os

from espresso.errors import EspressoError
from espresso.net.build import filter_layers, load_net_param
from espresso.proto import caffe_pb2
from espresso.proto.text import atomic_write

SOURCE = ("dot", "gv", "raw")  # extensions written as DOT source, without running dot
RANKDIRS = ("LR", "RL", "TB", "BT")
# Caffe draws layers as 'record' nodes, which would read | { } < > in a name as field syntax: 'box'
# looks the same for one field
LAYER = {"shape": "box", "style": "filled", "fillcolor": "#6495ED"}
COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900", "InnerProduct": "#CC33FF"}
IN_PLACE = {"shape": "box", "style": "filled", "fillcolor": "#90EE90"}
BLOB = {"shape": "octagon", "style": "filled", "fillcolor": "#E0E0E0"}
LEARNED = ("Convolution", "Deconvolution", "InnerProduct")


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """pycaffe's draw_net_to_file: draw a net (a NetParameter or a prototxt path) to `filename`,
    in the format its extension names: .dot/.gv/.raw write the DOT source, any other (.png,
    .svg, .pdf, ...) an image that Graphviz's dot renders.  `phase` (espresso.TRAIN or TEST)
    keeps the layers a net of that phase has (Caffe's include/exclude rules, at level 0 with no
    stages); None draws them all.  `display_lrm` adds the lr_mult of convolutions and inner
    products."""
    ext = os.path.splitext(os.fspath(filename))[1][1:].lower()
    data = _drawing(caffe_net, rankdir, ext, phase, display_lrm, filename)
    atomic_write(filename, lambda f: f.write(data))


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """pycaffe's draw_net: the drawing as bytes in format `ext` (png, svg, ...; dot, gv and raw
    are the DOT source)."""
    return _drawing(caffe_net, rankdir, ext, phase, display_lrm, f"draw_net(ext={ext!r})")


def _drawing(caffe_net, rankdir, ext, phase, display_lrm, where):
    graph = net_graph(caffe_net, rankdir, phase, display_lrm)
    return graph.source.encode() if ext in SOURCE else _render(graph, ext, where)


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """pycaffe's get_pydot_graph: the drawing as a pydot.Dot (needs pydot, in the `draw` extra)."""
    try:
        import pydot
    except ImportError:
        raise EspressoError("get_pydot_graph needs the pydot package: pip install espresso-nn[draw]") from None
    graph = net_graph(caffe_net, rankdir, phase, display_lrm, label_edges)
    return pydot.graph_from_dot_data(graph.source)[0]


def net_graph(net_param, rankdir="LR", phase=None, display_lrm=False, label_edges=True):
    """The net as a graphviz.Digraph; label_edges False leaves the top edges unlabelled."""
    graphviz = _graphviz()
    if rankdir not in RANKDIRS:
        raise EspressoError(f"rankdir must be one of {', '.join(RANKDIRS)}, got {rankdir!r}")
    name, layers = _layers(net_param, phase)
    graph = graphviz.Digraph(name or "Net", graph_attr={"rankdir": rankdir})
    # vertical layouts have room across: words go on one line, horizontal ones stack them
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    blobs = {}  # name -> node id, in order of first use
    for i, lp in enumerate(layers):
        node = f"layer{i}"
        in_place = len(lp.bottom) == len(lp.top) == 1 and lp.bottom[0] == lp.top[0]
        style = IN_PLACE if in_place else dict(LAYER, fillcolor=COLORS.get(lp.type, LAYER["fillcolor"]))
        graph.node(node, separator.join(_label(lp, display_lrm)), **style)
        for blob in lp.bottom:
            graph.edge(_blob(graph, blobs, blob), node)
        for blob in lp.top:
            graph.edge(node, _blob(graph, blobs, blob), label=_edge_label(lp) if label_edges else None)
    return graph


def _graphviz():
    try:
        import graphviz
    except ImportError:
        raise EspressoError("drawing nets needs the graphviz package: pip install espresso-nn[draw]") from None
    return graphviz


def _layers(net_param, phase):
    """(net name, its layers, those of `phase` only unless None)."""
    if phase not in (None, caffe_pb2.TRAIN, caffe_pb2.TEST):
        raise EspressoError(f"phase must be espresso.TRAIN, espresso.TEST or None, got {phase!r}")
    param, lines, source = load_net_param(net_param)  # V0/V1 nets upgraded, as Net reads them
    if phase is None:
        return param.name, list(param.layer)
    param.state.phase = phase
    return param.name, [lp for lp, _ in filter_layers(param, lines, source)]


def _blob(graph, blobs, name):
    """The node id of blob `name`, its node added on first use."""
    if name not in blobs:
        blobs[name] = f"blob{len(blobs)}"
        graph.node(blobs[name], _literal(name), **BLOB)
    return blobs[name]


def _literal(text):
    """`text` shown as written: DOT reads a backslash in a label as an escape (\\n, \\l)."""
    return text.replace("\\", "\\\\")


def _label(lp, display_lrm):
    """Caffe's layer label lines: name, (type), kernel size/stride/pad, lr mult."""
    kind = lp.type
    if kind == "Pooling":
        kind += " " + caffe_pb2.PoolingParameter.PoolMethod.Name(lp.pooling_param.pool)
    lines = [_literal(lp.name), f"({_literal(kind)})"]
    if lp.type in ("Convolution", "Deconvolution", "Pooling"):
        p = lp.pooling_param if lp.type == "Pooling" else lp.convolution_param
        kernel = "global" if lp.type == "Pooling" and p.global_pooling else _size(p, "kernel", "kernel_size", "")
        lines += [f"kernel size: {kernel}", f"stride: {_size(p, 'stride', 'stride', 1)}",
                  f"pad: {_size(p, 'pad', 'pad', 0)}"]
    if display_lrm and lp.type in LEARNED:
        mults = [spec.lr_mult for spec in lp.param[:2]] + [1.0, 1.0][len(lp.param):]
        if any(mults):
            lines.append("lr mult: {:.1f}, {:.1f}".format(*mults))
    return lines


def _size(p, short, field, default):
    """A convolution or pooling size in either of Caffe's spellings: field (repeated for
    convolutions, single for pooling) or short_h/short_w; "3" or "3x1"."""
    if p.HasField(f"{short}_h") or p.HasField(f"{short}_w"):
        return f"{getattr(p, f'{short}_h')}x{getattr(p, f'{short}_w')}"
    value = getattr(p, field)
    values = [value] * p.HasField(field) if isinstance(value, int) else list(value)
    return "x".join(map(str, values)) if values else str(default)


def _edge_label(lp):
    """Caffe's top edge labels: a data layer's batch size, a learned layer's output count."""
    if lp.type == "Data":
        return f"Batch {lp.data_param.batch_size}"
    if lp.type in LEARNED:
        p = lp.inner_product_param if lp.type == "InnerProduct" else lp.convolution_param
        return str(p.num_output)
    return None


def _render(graph, ext, path):
    graphviz = _graphviz()
    if ext not in graphviz.FORMATS:
        raise EspressoError(f"{path}: Graphviz draws no '.{ext}' files; name a .png, .svg or .pdf "
                            f"(or .dot for the source)")
    try:
        return graph.pipe(format=ext)
    except graphviz.ExecutableNotFound:
        raise EspressoError(f"{path}: drawing a .{ext} needs Graphviz's dot program, which is not on PATH: "
                            "install Graphviz (apt install graphviz; brew install graphviz on macOS), "
                            "or draw to a .dot file, which needs no program") from None
    except graphviz.CalledProcessError as e:
        message = (e.stderr or b"").decode(errors="replace").strip()
        raise EspressoError(f"{path}: Graphviz's dot failed: {message or e}") from None
