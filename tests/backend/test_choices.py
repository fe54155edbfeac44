"""The on-disk cache of timed choices (espresso/backend/cuda/choices.py): plain files, no GPU."""

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

from espresso.backend.cuda import CUDABackend
from espresso.backend.cuda.choices import Choices, cache_dir
from espresso.backend.cuda.cudnn import Cudnn
from espresso.errors import GraphCaptureError
from espresso.layers.vision import _leanest
from espresso.testing import LayerRun

SETUP = {"Device": "GPU 0: NVIDIA H100", "cuDNN": "9.1", "Espresso": "0.1.0"}


def test_a_choice_outlives_the_process_that_made_it(tmp_path):
    Choices(tmp_path, SETUP).put("conv", {"algos": {"Forward": 1}, "engine": "cudnn"})
    assert Choices(tmp_path, SETUP).get("conv") == {"algos": {"Forward": 1}, "engine": "cudnn"}
    assert Choices(tmp_path, SETUP | {"cuDNN": "9.2"}).get("conv") is None  # another set-up: its own file


def test_writers_merge_rather_than_overwrite(tmp_path):
    first, second = Choices(tmp_path, SETUP), Choices(tmp_path, SETUP)  # two ranks, opened together
    first.put("a", 1)
    second.put("b", 2)
    assert Choices(tmp_path, SETUP).known == {"a": 1, "b": 2}
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left


def test_a_damaged_or_unwritable_cache_is_no_cache(tmp_path):
    Choices(tmp_path, SETUP).put("a", 1)
    path = next(tmp_path.iterdir())
    path.write_text("{not json")
    assert Choices(tmp_path, SETUP).get("a") is None
    path.write_text(json.dumps([1, 2]))
    assert Choices(tmp_path, SETUP).get("a") is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    memory_only = Choices(blocked / "below", SETUP)  # a folder that cannot be made
    memory_only.put("a", 1)
    assert memory_only.get("a") == 1 and memory_only.path is None


def test_a_cached_choice_is_taken_only_when_it_is_whole_and_still_offered():
    """The layer's side (espresso/layers/vision.py): a malformed entry, an engine not offered
    now, or an algorithm no longer among the candidates counts as no entry (it is timed anew)."""
    layer = LayerRun('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                     [np.ones((1, 1, 5, 5))]).layer
    layer.plan, layer.engines, layer.cores = types.SimpleNamespace(algo={}), [None, None], None
    options, engines = {"Forward": [(1, 0), (6, 4096)]}, {"cudnn": None}  # engines offered now
    for known in [None, [], {"algos": {"Forward": 6}}, {"engine": "cudnn"}, {"engine": "cudnn", "algos": None},
                  {"engine": "cudnn", "algos": {}}, {"engine": "fast", "algos": {"Forward": 6}},
                  {"engine": "gemm", "algos": {"Forward": 6}},  # no columns to run im2col + GEMM with
                  {"engine": "direct", "algos": {"Forward": 6}},  # (as where the backend has no direct kernel)
                  {"engine": "cudnn", "algos": {"Forward": 7}}]:
        assert not layer._recall(known, options, 0, engines) and layer.plan.algo == {}
        assert layer.engines == [None, None]
    assert layer._recall({"engine": "cudnn", "algos": {"Forward": 6}}, options, 0, engines)
    assert layer.plan.algo == {"Forward": (6, 4096)} and layer.engines == ["cudnn", None]


def test_timing_gives_the_columns_and_workspaces_back_before_cudnns_candidates():
    """The layer's side: im2col + GEMM is timed first, its columns are given back, and only then
    are cuDNN's candidates timed, each direction's and the chosen ones together with cuDNN's
    workspaces emptied first (no workspace tried, here or in other layers, stays on top of the
    next ones in a first run's peak), and the workspaces are as before after; of near-tied
    algorithms the leaner is kept, and where the engine kept is not GEMM, no columns stay."""
    layer = LayerRun('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                     [np.ones((1, 1, 5, 5))]).layer
    layer.plan, layer.engines, layer.cores = types.SimpleNamespace(algo={}), [None, None], None
    held = []  # (what was timed, whether columns were held then), and the workspaces' resizes
    lanes = types.SimpleNamespace(workspace_sizes=lambda: (7, 3), resize_workspaces=held.append)
    layer.backend = types.SimpleNamespace(cudnn=lanes)

    def gemm():
        layer._gemm_cores()  # as _gemm_backward makes them

    def cudnn():
        pass

    def timed(run, *args):  # runs it (so the GEMM engine makes its columns), then a made-up time
        run(*args)
        held.append((args[1][0] if run == layer._with_algo else run.__name__, layer.cores is not None))
        return {"gemm": 2.0, "cudnn": 1.0, 4: 1.04, 6: 1.0, 8: 1.5, 9: 1.0}[held[-1][0]]

    layer._time = timed
    options = {"BackwardFilter": [(4, 0), (6, 4096)], "BackwardData": [(8, 0), (9, 8192)]}
    layer._time_choices(1, list(options), options, {"cudnn": cudnn, "gemm": gemm}, ())
    assert held == [("gemm", True), (0, 0), (4, False), (6, False), (0, 0), (8, False), (9, False),
                    (0, 0), ("cudnn", False), (7, 3)]
    assert layer.engines == [None, "cudnn"] and layer.cores is None
    assert layer.plan.algo == {"BackwardFilter": (4, 0), "BackwardData": (9, 8192)}


def test_of_algorithms_timed_alike_the_one_of_least_workspace_is_kept():
    """Times within 5% of the fastest are timing noise: of those, the least workspace wins (the
    faster at equal workspace); a clearly faster algorithm wins whatever its workspace."""
    options = [(0, 0), (1, 12 << 20), (5, 42 << 20), (6, 4096)]
    assert _leanest(options, [2.0, 1.02, 1.0, 1.3]) == (1, 12 << 20)
    assert _leanest(options, [1.04, 1.02, 1.0, 1.3]) == (0, 0)
    assert _leanest(options, [2.0, 1.2, 1.0, 1.3]) == (5, 42 << 20)
    assert _leanest([(3, 4096), (4, 4096)], [1.01, 1.0]) == (4, 4096)


def test_a_workspace_never_grows_inside_a_capture():
    """A graph being captured holds the workspace its kernels were queued with: growing it (which
    frees the old one) fails the capture instead, and the pass runs eagerly, growing it there."""
    lanes = Cudnn.__new__(Cudnn)  # (its lanes and backend alone: no GPU here)
    lanes.lanes = {False: [None, np.empty(16, np.uint8)], True: [None, np.empty(0, np.uint8)]}
    lanes.backend = types.SimpleNamespace(capturing=True)
    with pytest.raises(GraphCaptureError):
        lanes.grow_workspace(32, side=True)
    lanes.grow_workspace(16)  # (large enough already)
    assert lanes.workspace_sizes() == (16, 0)


def test_the_random_generator_is_made_at_first_use_from_the_last_seed_and_never_inside_a_capture():
    """Its states (megabytes of the device) are made only for a net that draws (Dropout), by a
    kernel that a capture would replay at every step."""
    made = []
    backend = CUDABackend.__new__(CUDABackend)  # (its generator alone: no GPU here)
    backend.device, backend.capturing = contextlib.nullcontext(), True
    backend.xp = types.SimpleNamespace(random=types.SimpleNamespace(default_rng=lambda seed: made.append(seed) or seed))
    backend.seed(5)
    with pytest.raises(GraphCaptureError):
        _ = backend.rng
    backend.capturing = False
    assert backend.rng == 5 and backend.rng == 5 and made == [5]
    backend.seed(6)
    assert made == [5] and backend.rng == 6 and made == [5, 6]


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPRESSO_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("ESPRESSO_CACHE_DIR", "")
    assert cache_dir() is None and Choices(None, SETUP).path is None
    monkeypatch.delenv("ESPRESSO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "espresso"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert cache_dir() is None  # a user with no home directory: no cache, no error
