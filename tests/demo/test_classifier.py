"""The demo's Classifier (espresso/demo/classifier.py): classify, teach a new class while the old
ones keep their accuracy, reset, and the exported files loading back."""

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from devices import gpu_test

import espresso
from espresso import backend
from espresso.backend.cpu import blas_threads
from espresso.demo import classifier as demo
from espresso.demo.classifier import Busy, Classifier, DemoError

DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "lenet" / "lenet_deploy.prototxt"
SHIPPED = tuple(demo.MODEL_DIR / name for name in ("lenet_fmnist.prototxt", "lenet_fmnist.espz", "labels.txt"))


def random_lenet(directory, prototxt=DEPLOY):
    """(prototxt, weights, labels) of a LeNet with random (He) weights, saved in `directory`."""
    net = espresso.Net(str(prototxt), espresso.TEST)
    rng = np.random.default_rng(0)
    for params in net.params.values():
        w = params[0].data
        w[...] = rng.normal(0, np.sqrt(2 / w[0].size), w.shape)
    net.save(str(directory / "lenet.caffemodel"))
    return prototxt, directory / "lenet.caffemodel", None


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """As the demo's server runs: batch-1 forwards are fastest on one thread, and two BLAS threads
    stall when another program holds a core of this 2-core machine."""
    backend.get("cpu")  # made first: making it sets the default
    before = blas_threads()
    espresso.set_num_threads(1)
    yield
    espresso.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """The Fashion-MNIST LeNet the demo ships, else a LeNet with random weights."""
    if all(path.is_file() for path in SHIPPED):
        return SHIPPED
    return random_lenet(tmp_path_factory.mktemp("lenet"))


def checkers(rng, count):
    """`count` inputs (1, 28, 28) of a pattern no Fashion-MNIST class looks like: noisy checkerboards."""
    y, x = np.mgrid[:28, :28]
    board = ((y // 4 + x // 4) % 2).astype(np.float32)
    images = board * rng.uniform(0.7, 1, (count, 1, 1)) + rng.normal(0, 0.05, (count, 28, 28))
    return np.clip(images, 0, 255 / 256).astype(np.float32)[:, None]


def test_classify_gives_the_top_five(lenet):
    c = Classifier(*lenet)
    x = demo.as_input(demo.fmnist_subset("test")[0][:1])[0]
    result = c.classify(x)
    probs = [entry["prob"] for entry in result["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert {entry["label"] for entry in result["top"]} <= set(c.labels)
    assert result["backend"] == "cpu" and result["ms"] > 0
    kind = "compressed" if str(lenet[1]).endswith(".espz") else "dense"
    assert result["model"] == {"kind": kind, "bytes": Path(lenet[1]).stat().st_size}
    assert c.classify(x[0])["top"] == result["top"]  # (H, W) is (1, H, W)


def test_scores_become_probabilities(tmp_path):
    """A net whose output is not a probability distribution gets a softmax."""
    prototxt = tmp_path / "scores.prototxt"
    prototxt.write_text(DEPLOY.read_text().replace('layer { name: "prob"', '# layer { name: "prob"'))
    c = Classifier(*random_lenet(tmp_path, prototxt))
    x = np.random.default_rng(0).random((1, 28, 28), np.float32)
    net = espresso.Net(str(prototxt), str(tmp_path / "lenet.caffemodel"), espresso.TEST)
    scores = net.forward(data=x[None])["ip2"].ravel().astype(np.float64)
    expected = np.sort(np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum())[::-1][:5]
    assert [entry["prob"] for entry in c.classify(x)["top"]] == pytest.approx(expected, rel=1e-5)


def test_bad_models_and_inputs_are_refused(lenet, tmp_path):
    with pytest.raises(DemoError, match="9 labels for a model of 10 classes"):
        Classifier(lenet[0], lenet[1], [f"l{i}" for i in range(9)])
    with pytest.raises(DemoError, match="give the weights"):
        Classifier(lenet[0])
    c = Classifier(*lenet)
    with pytest.raises(DemoError, match=r"shape \(1, 27, 28\); the model takes \(1, 28, 28\)"):
        c.classify(np.zeros((1, 27, 28)))
    with pytest.raises(DemoError, match="not finite"):
        c.classify(np.full((1, 28, 28), np.nan))
    with pytest.raises(DemoError, match="unknown format 'pdf'"):
        c.export("pdf")


def test_teach_learns_a_new_class_and_keeps_the_old(lenet):
    c = Classifier(*lenet)
    rng = np.random.default_rng(1)
    steps = []
    result = c.teach("  checkers ", list(checkers(rng, 10)), progress=lambda i, loss: steps.append((i, loss)))
    assert result["name"] == "checkers" and c.labels == Classifier(*lenet).labels + ["checkers"]
    assert [i for i, _ in steps] == list(range(10, demo.ITERATIONS + 1, 10))
    assert all(np.isfinite(loss) for _, loss in steps) and steps[-1][1] < steps[0][1]
    accuracy = result["accuracy"]
    assert accuracy["new"] == 1.0
    assert accuracy["old_after"] >= accuracy["old_before"] - 0.03
    assert all(c.classify(x)["top"][0]["label"] == "checkers" for x in checkers(rng, 10))
    assert c.accuracy_on_old_classes() == accuracy["old_after"] == pytest.approx(net_accuracy(c), abs=0.002)


def net_accuracy(c):
    """The accuracy on the held-out images of a Net built from the classifier's exported files."""
    with tempfile.TemporaryDirectory() as tmp:
        for format in ("prototxt", "caffemodel"):
            (Path(tmp) / format).write_bytes(c.export(format))
        net = espresso.Net(str(Path(tmp) / "prototxt"), str(Path(tmp) / "caffemodel"), espresso.TEST)
    images, labels = demo.fmnist_subset("test")
    net.blobs["data"].reshape(100, 1, 28, 28)
    net.reshape()
    return np.mean(net.forward_all(data=demo.as_input(images))["prob"].argmax(1) == labels)


def test_teach_refuses_bad_requests(lenet, tmp_path):
    c = Classifier(*lenet)
    examples = list(checkers(np.random.default_rng(2), 10))
    for name in ("", "   ", "x" * 41, "two\nlines", c.labels[3].upper(), 7):
        with pytest.raises(DemoError, match="class name|a class already"):
            c.teach(name, examples)
    for count in (4, 21):
        with pytest.raises(DemoError, match=f"give 5 to 20 examples, got {count}"):
            c.teach("checkers", examples[:1] * count)
    with pytest.raises(DemoError, match="shape"):
        c.teach("checkers", [np.zeros((3, 28, 28))] * 5)
    wide = tmp_path / "wide.prototxt"
    wide.write_text(DEPLOY.read_text().replace("dim: 28 dim: 28", "dim: 32 dim: 32"))
    with pytest.raises(DemoError, match="needs a Fashion-MNIST model"):
        Classifier(*random_lenet(tmp_path, wide)).teach("checkers", [np.zeros((1, 32, 32))] * 5)
    assert len(c.labels) == 10 and not c.teaching


def test_one_teaching_at_a_time_and_reset(lenet):
    c = Classifier(*lenet)
    rng = np.random.default_rng(3)
    refused = []

    def progress(iteration, loss):
        for attempt in (lambda: c.teach("stripes", list(checkers(rng, 5))), c.reset):
            with pytest.raises(Busy) as e:
                attempt()
            refused.append(str(e.value))

    c.teach("checkers", list(checkers(rng, 5)), iterations=20, progress=progress)
    assert len(refused) == 4 and all("being taught" in message for message in refused)
    assert c.labels[-1] == "checkers"
    c.reset()
    assert c.labels == Classifier(*lenet).labels and c.classify(checkers(rng, 1)[0])["top"][0]["label"] != "checkers"


@pytest.fixture(scope="module")
def taught(lenet):
    """A classifier that learned "checkers"."""
    c = Classifier(*lenet)
    c.teach("checkers", list(checkers(np.random.default_rng(4), 10)))
    return c


def _probabilities(net, x):
    return net.forward(**{net.inputs[0]: x[None]})[net.outputs[-1]].ravel()


def test_caffemodel_and_prototxt_exports_load_back(taught, tmp_path):
    for format, name in (("caffemodel", "m.caffemodel"), ("prototxt", "m.prototxt"), ("labels", "labels.txt")):
        (tmp_path / name).write_bytes(taught.export(format))
    assert (tmp_path / "labels.txt").read_text().splitlines() == taught.labels
    net = espresso.Net(str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), espresso.TEST)
    x = checkers(np.random.default_rng(5), 1)[0]
    top = taught.classify(x)["top"][0]
    assert _probabilities(net, x).max() == pytest.approx(top["prob"], rel=1e-5)
    assert taught.labels[_probabilities(net, x).argmax()] == top["label"] == "checkers"


def test_espz_export_loads_back_compressed(taught, tmp_path):
    (tmp_path / "m.prototxt").write_bytes(taught.export("prototxt"))
    (tmp_path / "m.espz").write_bytes(taught.export("espz"))
    c = Classifier(tmp_path / "m.prototxt", tmp_path / "m.espz", taught.labels)
    images = demo.as_input(demo.fmnist_subset("test")[0][:50])
    agree = [c.classify(x)["top"][0]["label"] == taught.classify(x)["top"][0]["label"] for x in images]
    assert np.mean(agree) >= 0.96  # 8-bit weights, not retrained
    assert c.classify(images[0])["model"] == {"kind": "compressed", "bytes": (tmp_path / "m.espz").stat().st_size}
    assert (tmp_path / "m.espz").stat().st_size < len(taught.export("caffemodel")) / 3


def test_onnx_export_checks_and_serves(taught, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(taught.export("onnx"))
    onnx.checker.check_model(model, full_check=True)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    c = Classifier(tmp_path / "m.onnx", labels=taught.labels)
    x = checkers(np.random.default_rng(6), 1)[0]
    assert c.classify(x)["top"][0]["label"] == "checkers"
    assert c.classify(x)["top"][0]["prob"] == pytest.approx(taught.classify(x)["top"][0]["prob"], rel=1e-4)
    with pytest.raises(DemoError, match="ONNX file holds its weights"):
        Classifier(tmp_path / "m.onnx", tmp_path / "m.onnx")


def test_coreml_export_is_a_zipped_package(taught):
    pytest.importorskip("coremltools")
    with zipfile.ZipFile(io.BytesIO(taught.export("coreml"))) as z:
        names = z.namelist()
    assert "model.mlpackage/Manifest.json" in names
    assert any(name.startswith("model.mlpackage/Data/com.apple.CoreML/") for name in names)


@gpu_test
def test_on_a_gpu_it_classifies_as_the_cpu_and_learns_from_another_thread(lenet):
    """The server runs nets from its request threads: on a GPU the classifier makes its stream
    current there (a CUDA graph captures it).  Probabilities as the CPU's; a class taught."""
    import threading

    cpu, gpu = Classifier(*lenet), Classifier(*lenet, gpu=0)
    x = demo.as_input(demo.fmnist_subset("test")[0][:1])[0]
    want = {e["label"]: e["prob"] for e in cpu.classify(x)["top"]}
    found = {}
    worker = threading.Thread(target=lambda: found.update(gpu.classify(x)))
    worker.start()
    worker.join()
    assert found["backend"].startswith("cuda")
    for entry in found["top"]:
        assert abs(entry["prob"] - want[entry["label"]]) < 1e-4
    examples = checkers(np.random.default_rng(0), 10)
    result = gpu.teach("checkers", list(examples))
    assert result["accuracy"]["new"] >= 0.9 and gpu.classify(examples[0])["top"][0]["label"] == "checkers"
