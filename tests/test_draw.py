"""espresso.draw: the DOT source holds every layer, blob and edge of a net, styled as Caffe's
draw_net.py; images come from Graphviz's dot where it is installed."""

import re
import shutil
from pathlib import Path

import pytest

import espresso as caffe
from espresso.draw import draw_net_to_file, net_graph
from espresso.errors import EspressoError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text, read_net_text

pytest.importorskip("graphviz", reason="the graphviz package (pip install espresso-nn[draw])")

LENET = Path(__file__).resolve().parents[1] / "examples" / "lenet" / "lenet_train_test.prototxt"
NODE = re.compile(r'^\t(\w+) \[label=("(?:[^"\\]|\\.)*"|\S+) (.*)\]$')
EDGE = re.compile(r"^\t(\w+) -> (\w+)(?: \[label=(.*)\])?$")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed (Debian/Ubuntu: apt install graphviz)")


def parse(source):
    """({node id: (label lines, attributes)}, {(tail id, head id): edge label}) of DOT source."""
    nodes, edges = {}, {}
    for line in source.splitlines():
        if node := NODE.match(line):
            nodes[node[1]] = (node[2].strip('"').split(r"\n"), node[3])
        elif edge := EDGE.match(line):
            edges[(edge[1], edge[2])] = (edge[3] or "").strip('"')
    return nodes, edges


def drawn(source):
    """The layers (by name), the blobs and the edges, as (kind, name) pairs, of DOT source."""
    nodes, edges = parse(source)
    named = {node: ("layer" if node.startswith("layer") else "blob", lines[0]) for node, (lines, _) in nodes.items()}
    layers = [name for kind, name in named.values() if kind == "layer"]
    blobs = {name for kind, name in named.values() if kind == "blob"}
    return layers, blobs, {(named[a], named[b]) for a, b in edges}


def expected(layers):
    """The layer names, blob names and edges that a list of LayerParameters should draw."""
    edges = set()
    for lp in layers:
        edges |= {(("blob", b), ("layer", lp.name)) for b in lp.bottom}
        edges |= {(("layer", lp.name), ("blob", t)) for t in lp.top}
    blobs = {name for lp in layers for name in list(lp.bottom) + list(lp.top)}
    return [lp.name for lp in layers], blobs, edges


def test_lenet_source_has_every_layer_blob_and_edge(tmp_path):
    path = tmp_path / "lenet.dot"
    draw_net_to_file(str(LENET), path)
    source = path.read_text()
    assert source.startswith("digraph LeNet {") and "rankdir=LR" in source
    param, _ = read_net_text(str(LENET))
    assert drawn(source) == expected(param.layer)  # both phases' data layers, as Caffe's default
    nodes, edges = parse(source)
    assert nodes["layer2"][0] == ["conv1", "(Convolution)", "kernel size: 5", "stride: 1", "pad: 0"]
    assert nodes["layer3"][0] == ["pool1", "(Pooling MAX)", "kernel size: 2", "stride: 2", "pad: 0"]
    assert 'fillcolor="#FF5050"' in nodes["layer2"][1] and "shape=octagon" in nodes["blob0"][1]
    assert edges[("layer2", "blob2")] == "20" and edges[("layer0", "blob0")] == "Batch 64"


def test_in_place_layers_are_green_with_edges_both_ways():
    nodes, edges = parse(net_graph(str(LENET)).source)
    relu = next(node for node, (lines, _) in nodes.items() if lines[0] == "relu1")
    blob = next(node for node, (lines, _) in nodes.items() if lines[0] == "ip1" and node.startswith("blob"))
    assert 'fillcolor="#90EE90"' in nodes[relu][1]
    assert (blob, relu) in edges and (relu, blob) in edges


@pytest.mark.parametrize("phase, absent", [(caffe.TRAIN, "accuracy"), (caffe.TEST, None)])
def test_phase_keeps_that_phase_s_layers(phase, absent):
    param, _ = read_net_text(str(LENET))
    param.state.phase = phase
    kept = [lp for lp in param.layer if all(rule.phase == phase for rule in lp.include)]
    layers, blobs, edges = drawn(net_graph(param, phase=phase).source)
    assert (layers, blobs, edges) == expected(kept)
    assert layers.count("mnist") == 1 and absent not in layers


def test_zoo_googlenet(zoo):
    param, _ = read_net_text(str(zoo / "models/bvlc_googlenet/deploy.prototxt"))
    assert drawn(net_graph(param).source) == expected(param.layer)


def test_top_to_bottom_labels_on_one_line_and_learning_rates():
    nodes, _ = parse(net_graph(str(LENET), rankdir="TB", display_lrm=True).source)
    assert nodes["layer2"][0] == ["conv1 (Convolution) kernel size: 5 stride: 1 pad: 0 lr mult: 1.0, 2.0"]


def test_odd_names_and_sizes_are_drawn_as_written():
    text = ('name: "odd" layer { name: "in|put" type: "Input" top: "a\\\\b" input_param { shape { dim: 1 dim: 1 '
            'dim: 8 dim: 8 } } }\n'
            'layer { name: "c" type: "Convolution" bottom: "a\\\\b" top: "c" '
            'convolution_param { num_output: 2 kernel_h: 3 kernel_w: 1 stride: 2 } }\n'
            'layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: AVE global_pooling: true } }')
    nodes, _ = parse(net_graph(parse_text(text, caffe_pb2.NetParameter())).source)
    assert nodes["layer0"][0] == ["in|put", "(Input)"] and nodes["blob0"][0] == ["a\\\\b"]
    assert nodes["layer1"][0][2:] == ["kernel size: 3x1", "stride: 2", "pad: 0"]
    assert nodes["layer2"][0][1:3] == ["(Pooling AVE)", "kernel size: global"]


def test_bad_arguments():
    with pytest.raises(EspressoError, match="rankdir must be one of"):
        net_graph(str(LENET), rankdir="up")
    with pytest.raises(EspressoError, match="phase must be"):
        net_graph(str(LENET), phase="TRAIN")


def test_without_dot_images_fail_clearly_and_source_still_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot there
    with pytest.raises(EspressoError, match=r"lenet.png: .*dot program.*apt install graphviz"):
        draw_net_to_file(str(LENET), tmp_path / "lenet.png")
    assert not (tmp_path / "lenet.png").exists()
    draw_net_to_file(str(LENET), tmp_path / "lenet.dot")
    assert (tmp_path / "lenet.dot").read_text().startswith("digraph")


def test_unknown_image_format(tmp_path):
    with pytest.raises(EspressoError, match=r"no '\.xyz' files"):
        draw_net_to_file(str(LENET), tmp_path / "lenet.xyz")


@needs_dot
@pytest.mark.parametrize("ext, magic", [("png", b"\x89PNG"), ("svg", b"<svg")])
def test_images(tmp_path, ext, magic):
    path = tmp_path / f"lenet.{ext}"
    draw_net_to_file(str(LENET), path, phase=caffe.TEST)
    assert magic in path.read_bytes()[:400]


def test_espresso_draw_writes_the_dot_source(tmp_path):
    from espresso import cli

    assert cli.main(["draw", str(LENET), str(tmp_path / "lenet.dot"), "--phase", "TEST", "--rankdir", "TB"]) == 0
    source = (tmp_path / "lenet.dot").read_text()
    assert "conv1" in source and "accuracy" in source and "rankdir=TB" in source
