"""Two models on one input, tensor by tensor: where does a conversion start to differ?

A model is an .onnx file (run by ONNX Runtime, every intermediate tensor made an output), an
.onnx file imported into Espresso ("espresso:model.onnx"), or an Espresso net: "net.prototxt:
weights" or, with a shared net, a weights file alone (.caffemodel, .h5 or .espz).  Espresso's
tensors are each layer's tops as that layer leaves them (a blob written in place is compared
after its last writer).  Tensors are matched by name, in the first model's order; differences are
relative to the first model's largest magnitude, and the first beyond the tolerance is named.
"""


import numpy as np

from espresso.errors import EspressoError


def model_tensors(spec, inputs, prototxt=None):
    """{tensor name: array} of the model `spec` run on `inputs` ({input name: array}, or one
    array for the single input), in the order they are computed."""
    if spec.endswith(".onnx") and not spec.startswith("espresso:"):
        return _runtime_tensors(spec, inputs)
    return _espresso_tensors(_espresso_net(spec, prototxt), inputs)


def compare(first, second, tolerance=1e-4):
    """Rows (name, shape, max |a - b|, relative difference) of the tensors both hold, and the
    index of the first row past `tolerance` (None when none is)."""
    rows, diverged = [], None
    for name, a in first.items():
        b = second.get(name)
        if b is None or np.shape(b) != np.shape(a):
            continue
        difference = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        relative = difference / max(float(np.abs(a).max()), 1e-30) if a.size else 0.0
        rows.append((name, a.shape, difference, relative))
        if diverged is None and relative > tolerance:
            diverged = len(rows) - 1
    if not rows:
        raise EspressoError("the two models have no tensor of the same name and shape to compare")
    return rows, diverged


def report(rows, diverged, tolerance):
    """The table compare's rows make, up to and including the first divergence."""
    width = max(len(name) for name, *_ in rows)
    lines = [f"{'tensor':<{width}}  {'shape':<18} {'max |a-b|':>10} {'relative':>10}"]
    for i, (name, shape, difference, relative) in enumerate(rows):
        mark = "  <- first beyond the tolerance" if i == diverged else ""
        lines.append(f"{name:<{width}}  {str(tuple(shape)):<18} {difference:>10.3g} {relative:>10.3g}{mark}")
        if i == diverged:
            break
    verdict = (f"{len(rows)} tensors agree within {tolerance:g}" if diverged is None
               else f"diverges at '{rows[diverged][0]}' ({rows[diverged][3]:.3g} > {tolerance:g})")
    return "\n".join(lines + [verdict])


def _espresso_net(spec, prototxt):
    import espresso

    if spec.startswith("espresso:"):
        from espresso.interop.onnx_import import load_onnx

        return load_onnx(spec[len("espresso:"):])
    net_file, weights = prototxt, spec
    if ".prototxt:" in spec:
        net_file, weights = spec.split(".prototxt:", 1)
        net_file += ".prototxt"
    if not net_file:
        raise EspressoError(f"'{spec}': give the net too (--model net.prototxt, or net.prototxt:{spec})")
    return espresso.Net(net_file, espresso.TEST, weights=weights)


def _named(inputs, names):
    if isinstance(inputs, dict):
        return inputs
    if len(names) != 1:
        raise EspressoError(f"the model has inputs {names}: give an .npz holding one array for each")
    return {names[0]: inputs}


def _espresso_tensors(net, inputs):
    inputs = _named(inputs, list(net.inputs))
    for name, value in inputs.items():
        net.blobs[name].reshape(*value.shape)
    net.reshape()
    found = {name: np.asarray(value) for name, value in inputs.items()}

    def record(i):  # after layer i: its tops as it leaves them
        for blob in net.top_vecs[i]:
            found.pop(blob.name, None)  # a blob written again moves to where its last writer is
            found[blob.name] = np.array(net.backend.to_host(blob.data))

    net.after_forward(record)
    net.forward(**inputs)
    return found


def _runtime_tensors(path, inputs):
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise EspressoError("comparing with ONNX Runtime needs onnx and onnxruntime: "
                            "pip install onnx onnxruntime") from None
    from espresso.interop.onnx_import import read_model

    read_model(path)  # a damaged file: one clear error
    model = onnx.load(path)  # whole, external data included: ONNX Runtime runs it
    known = {value.name for value in model.graph.output}
    for node in model.graph.node:  # every value an output, so that it can be compared
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in node.output if name and name not in known)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = _named(inputs, [i.name for i in session.get_inputs()])
    names = [output.name for output in session.get_outputs()]
    found = {name: np.asarray(value) for name, value in inputs.items()}
    found.update(zip(names, session.run(names, inputs)))
    order = list(inputs) + [name for node in model.graph.node for name in node.output if name in found]
    return {name: found[name] for name in dict.fromkeys(order)}
