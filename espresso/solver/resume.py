"""What a snapshot saves beyond Caffe's SolverState so that a resumed run goes on as if it had
never stopped: every data layer's cursor (train and test nets), the states of the host and
device random generators, and the solver's `extras` (state of what trains with it, such as the
formats of fixed-point training: {name: (save() -> JSON values, restore(values))}).  Caffe
restarts each database from its first record on resume, so the first batches after it differ
from a straight run's; with this, N iterations straight and N/2, snapshot, restore, N/2 give
the same weights bit for bit (on the CPU; a GPU's generator is not saved, and its sums may be
ordered differently run to run).

Stored as JSON (no code can come from a file) in SolverState field 1000 `espresso_resume`, or in
a .solverstate.h5 as the dataset of that name: real Caffe skips both and reads the file as ever.
"""

import json

import numpy as np

from espresso import cursor as saved
from espresso.errors import ModelFileError
from espresso.runtime import host_rng

VERSION = 1


def save_cursors(solver):
    """The solver's nets' cursors and the generators' states, as UTF-8 JSON."""
    state = {"version": VERSION,
             "host_rng": saved.generator_state(host_rng()),
             "device_rng": solver.net.backend.rng_state(),
             "cursors": [net.data_cursors() for net in _nets(solver)],
             "extras": {name: save() for name, (save, _) in solver.extras.items()}}
    return json.dumps(state, separators=(",", ":"), default=_plain).encode()


def restore_cursors(solver, payload, path):
    """Move the solver's data layers and generators to where `payload` (from save_cursors) says; a
    layer the snapshot did not see starts at its beginning."""
    try:
        state = saved.mapping(_decode(payload), "espresso_resume")
        if state.get("version") != VERSION:
            raise saved.CursorError(f"version {state.get('version')!r}; this Espresso reads version {VERSION}")
        cursors, nets = state.get("cursors"), _nets(solver)
        # a data-parallel rank other than 0 has no test nets: it takes the train net's cursors
        if not isinstance(cursors, list) or len(cursors) < len(nets) or (solver.root and len(cursors) != len(nets)):
            raise saved.CursorError(f"cursors: expected a list of {len(nets)} nets' cursors")
        for net, net_cursors in zip(nets, cursors):
            saved.mapping(net_cursors, "a net's cursors")
            for layer in net.engine_layers:
                if layer.name in net_cursors:
                    _seek(layer, net_cursors[layer.name])
        extras = saved.mapping(state.get("extras", {}), "extras")
        for name, (_, restore) in solver.extras.items():
            if name in extras:  # (a snapshot without it: the extra starts afresh)
                restore(extras[name])
        if not solver.root:  # its generators stay its own (seeded by rank): the states saved are rank 0's
            return
        saved.set_generator(host_rng(), state.get("host_rng"), "host_rng")
        if state.get("device_rng") is not None:
            solver.net.backend.set_rng_state(state["device_rng"])
    except saved.CursorError as e:
        raise ModelFileError(f"{path}: espresso_resume: {e}") from None


def _seek(layer, cursor):
    try:
        layer.seek(cursor)
    except saved.CursorError as e:
        raise saved.CursorError(f"layer '{layer.name}': {e}") from None


def _decode(payload):
    try:
        return json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise saved.CursorError(f"not JSON ({type(e).__name__}: {str(e)[:80]})") from None


def _nets(solver):
    return [solver.net, *solver.test_nets]


def _plain(value):
    """JSON for the NumPy values in cursors."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"a cursor holds a {type(value).__name__}, which JSON cannot hold")
