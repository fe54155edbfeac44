"""espresso bench: the nets, the energy meters, the summaries and ratios, the PyTorch peer and
the report, end to end on a small case."""

import json
import os
import time

import numpy as np
import pytest

import espresso
from espresso import cli
from espresso.bench import energy, models
from espresso.bench.report import ratio, summarize, tables
from espresso.errors import EspressoError


@pytest.mark.parametrize("model, params, classes", [("lenet", 431080, 10), ("lenet300", 266610, 10),
                                                    ("caffenet", 60965224, 1000), ("googlenet", 6998552, 1000)])
def test_the_suites_nets_are_the_zoos(model, params, classes):
    """Parameter counts of Caffe's own nets (CaffeNet 61.0 M, GoogLeNet without its auxiliary heads 7.0 M)."""
    net = espresso.Net(models.net_param(model, 2, train=False), espresso.TEST)
    assert sum(b.count for blobs in net.params.values() for b in blobs) == params
    assert net.blobs["prob"].shape == (2, classes)
    train = espresso.Net(models.net_param(model, 2, train=True), espresso.TRAIN)
    assert train.blobs["loss"].shape == () and train.blobs["label"].shape == (2,)


def test_resnet50_has_its_bottlenecks():
    param = models.net_param("resnet50", 1, train=True)
    types = [lp.type for lp in param.layer]
    assert types.count("Convolution") == 53 and types.count("Eltwise") == 16 and types.count("BatchNorm") == 53
    assert all(lp.batch_norm_param.use_global_stats is False for lp in param.layer if lp.type == "BatchNorm")


def test_cpu_energy_is_an_estimate_said_to_be_one(monkeypatch):
    monkeypatch.setattr(energy, "RAPL", "/nonexistent/energy_uj")
    meter = energy.Meter("cpu", watts_per_core=10.0)
    assert meter.kind == "estimate" and "busy CPU seconds" in meter.describe()["formula"]
    with meter.measure() as m:
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
    assert m.joules == pytest.approx(10.0 * 0.05, abs=0.25) and meter.measure_idle(0.01) == 0.0


def test_rapl_counters_are_read_and_unwrapped(tmp_path, monkeypatch):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("999000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    monkeypatch.setattr(energy, "RAPL", str(tmp_path / "intel-rapl:[0-9]" / "energy_uj"))
    meter = energy.Meter("cpu")
    assert meter.kind == "rapl" and "formula" not in meter.describe()
    with meter.measure() as m:
        (zone / "energy_uj").write_text("2000000\n")  # wrapped past 1000 J: 1 J + 2 J
    assert m.joules == pytest.approx(3.0)


def test_gpu_energy_without_nvml_says_what_is_missing(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(energy.ctypes, "CDLL", missing)
    with pytest.raises(EspressoError, match="GPU energy needs NVML"):
        energy.Meter("gpu")


def _record(framework, seconds, joules, batch=4):
    return {"model": "m", "mode": "train", "batch": batch, "device": "cpu", "framework": framework,
            "blocks": [{"iterations": 10, "seconds": s, "joules": j} for s, j in zip(seconds, joules)],
            "host_peak_bytes": 2**20, "device_peak_bytes": None}


def test_summaries_and_ratios_say_parity_when_repeats_overlap():
    fast = summarize(_record("espresso", [1.0, 1.1, 0.9], [10, 11, 9]), idle_watts=2.0)
    assert fast["images_per_s"] == {"median": 40.0, "min": 40 / 1.1, "max": 40 / 0.9}
    assert fast["j_per_image"]["median"] == 0.25 and fast["j_per_image_above_idle"]["median"] == pytest.approx(0.2)
    slow = summarize(_record("torch eager", [2.0, 2.1, 1.9], [20, 21, 19]), idle_watts=2.0)
    assert ratio(fast["images_per_s"], slow["images_per_s"]) == {"ratio": 2.0, "overlap": False}
    close = summarize(_record("torch eager", [1.05, 1.2, 0.95], [10, 11, 9]), idle_watts=2.0)
    assert ratio(fast["images_per_s"], close["images_per_s"])["overlap"]
    results = {"energy": {"cpu": {"idle_watts": 2.0}},
               "cases": [_record("espresso", [1.0, 1.1, 0.9], [10, 11, 9]),
                         _record("torch eager", [1.05, 1.2, 0.95], [10, 11, 9])]}
    by_title = {title: rows for title, _, rows in tables(results)}
    assert by_title["Espresso against PyTorch (same device, same run)"][0][5].endswith("(repeats overlap: parity)")


def test_the_torch_peer_computes_what_espresso_computes(rng):
    pytest.importorskip("torch")
    from espresso.bench.torch_peer import TorchCase

    for model in ("lenet", "googlenet"):
        param = models.net_param(model, 1, train=False)
        net = espresso.Net(param, espresso.TEST)
        data = rng.standard_normal(net.blobs["data"].shape).astype(np.float32)
        net.blobs["data"].data[...] = data
        expected = net.forward()["prob"].copy()
        peer = TorchCase(param, net, {"data": data}, train=False, device="cpu")
        np.testing.assert_allclose(peer._once().numpy(), expected, rtol=1e-3, atol=1e-6)
    import torch  # the peer computes as Espresso does, in float32 (PyTorch's cuDNN defaults to TF32)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_bench_end_to_end_writes_the_report(tmp_path, capsys):
    """The CLI on one small model: every case measured, the JSON, the pages and the plots."""
    report = tmp_path / "report"
    assert cli.main(["bench", "--model", "lenet300", "--batch", "1,8", "--quick", "--repeats", "2",
                     "--report", str(report)]) == 0
    results = json.loads((report / "bench.json").read_text())
    cases = {(c["mode"], c["batch"]): c for c in results["cases"]}
    assert set(cases) == {("infer", 1), ("infer", 8), ("train", 1), ("train", 8)}
    assert cases[("infer", 1)]["cold_start_s"] > 0 and len(cases[("infer", 1)]["latency_ms"]) > 10
    assert all(len(c["blocks"]) == 2 and c["host_peak_bytes"] > 2**20 for c in cases.values())
    assert cases[("train", 8)]["layers"]["names"][:2] == ["data", "ip1"]
    assert results["energy"]["cpu"]["kind"] in ("estimate", "rapl") and results["machine"]["cores"] >= 1
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "lenet300" in html
    assert {"report.md", "energy.png", "latency.png", "layers.png", "memory.png"} <= set(os.listdir(report))
    assert cli.main(["bench", "--model", "alexnet", "--report", str(report)]) == 1
    assert "unknown model 'alexnet' (known: lenet, lenet300" in capsys.readouterr().err
