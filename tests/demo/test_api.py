"""The demo's web API (espresso/demo/app.py) through Starlette's TestClient: classify, the 4xx
answers to bad requests, teaching a class over HTTP, the downloads loading back, reset."""

import base64
import concurrent.futures
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx2")  # what starlette.testclient runs on (plain httpx is deprecated there)

from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_classifier import lenet, one_blas_thread  # noqa: E402, F401  (fixtures)

import espresso  # noqa: E402
from espresso.demo import app as demo_app  # noqa: E402
from espresso.demo import classifier as demo  # noqa: E402


@pytest.fixture(scope="module")
def classifier(lenet):  # noqa: F811
    return demo.Classifier(*lenet)


@pytest.fixture
def client(classifier, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>demo</title>")
    (static / "style.css").write_text("body {}")
    (tmp_path / "secret.txt").write_text("not to be served")
    with TestClient(demo_app.create_app(classifier, static)) as client:
        yield client
    classifier.reset()


def encode(pixels, format="PNG"):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format)
    return out.getvalue()


def checkers_photo(rng):
    """A photo-like PNG of a dark checkerboard card on a light, noisy table, placed at random."""
    size = int(rng.integers(28, 44))
    y, x = np.mgrid[:size, :size]
    photo = np.full((64, 64), 200.0) + rng.normal(0, 4, (64, 64))
    top, left = rng.integers(0, 64 - size, 2)
    photo[top:top + size, left:left + size] = np.where((y // (size // 6) + x // (size // 6)) % 2, 230, 30)
    return encode(np.repeat(np.clip(photo, 0, 255).astype(np.uint8)[..., None], 3, axis=2))


def fmnist_png(i):
    return encode(demo.fmnist_subset("test")[0][i])


def png_declaring(width, height):
    """A small PNG whose header declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def assert_error(response, status, text):
    assert response.status_code == status, response.text
    assert text in response.json()["error"]


def wait_for(client, job, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/teach/{job}").json()
        if status["done"]:
            return status
        time.sleep(0.05)
    raise AssertionError(f"teaching job {job} not done in {timeout} s")


# *** classifying ***
@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "BMP"])
def test_classify_a_raw_image(client, classifier, format):
    response = client.post("/api/classify", content=encode(demo.fmnist_subset("test")[0][0], format))
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["top"]) == 5 and result["backend"] == "cpu" and result["model"]["bytes"] > 0
    seen = Image.open(io.BytesIO(base64.b64decode(result["input"])))
    assert seen.format == "PNG" and seen.size == (28, 28)


def test_classify_multipart_gives_what_raw_gives(client):
    raw = client.post("/api/classify", content=fmnist_png(1)).json()
    multipart = client.post("/api/classify", files={"image": ("x.png", fmnist_png(1), "image/png")}).json()
    assert multipart["top"] == raw["top"] and multipart["input"] == raw["input"]
    assert client.get("/api/classes").json() == {"classes": client.app.state.classifier.labels, "backend": "cpu",
                                                 "teaching": False}


def test_concurrent_classifications_agree(client):
    images = [fmnist_png(i) for i in range(8)]
    serial = [client.post("/api/classify", content=image).json()["top"] for image in images]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.post("/api/classify", content=images[i % 8]), range(64)))
    assert all(answer.status_code == 200 for answer in answers)
    assert [answer.json()["top"] for answer in answers] == [serial[i % 8] for i in range(64)]


# *** refused requests ***
def test_bodies_over_the_limit_are_refused(client):
    assert_error(client.post("/api/classify", content=b"\0" * (demo_app.MAX_BODY + 1)), 413, "the limit is")

    def chunks(megabytes):  # no Content-Length: counted while read
        for _ in range(megabytes):
            yield b"\0" * (1 << 20)

    assert_error(client.post("/api/classify", content=chunks(11)), 413, "over the limit of 10485760 bytes")
    assert_error(client.post("/api/teach", content=chunks(33)), 413, "over the limit of 33554432 bytes")


@pytest.mark.parametrize("width, height", [(6000, 6000), (100_000, 100_000)])
def test_decompression_bombs_are_refused_before_decoding(client, width, height):
    assert_error(client.post("/api/classify", content=png_declaring(width, height)), 413, "pixels")


def test_bad_images_are_refused(client):
    assert_error(client.post("/api/classify", content=b"not an image at all" * 10), 415, "PNG, JPEG, WEBP, BMP")
    gif = io.BytesIO()
    Image.new("L", (32, 32)).save(gif, "GIF")
    assert_error(client.post("/api/classify", content=gif.getvalue()), 415, "not an image in a known format")
    noise = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    assert_error(client.post("/api/classify", content=noise[:len(noise) // 2]), 400, "cannot be decoded")
    assert_error(client.post("/api/classify", content=encode(np.zeros((4, 40), np.uint8))), 400, "8 pixels or more")
    assert_error(client.post("/api/classify", content=b""), 400, "no image")
    wrong_field = {"picture": ("x.png", fmnist_png(0))}
    assert_error(client.post("/api/classify", files=wrong_field), 400, "'image' must be a file")
    assert_error(client.post("/api/classify", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
                 400, "boundary")


def test_bad_teach_requests_are_refused(client, classifier):
    photos = [base64.b64encode(fmnist_png(i)).decode() for i in range(5)]
    json_type = {"content-type": "application/json"}
    assert_error(client.post("/api/teach", content=b'{"name": "x", ', headers=json_type), 400, "not JSON")
    assert_error(client.post("/api/teach", json=["x"]), 400, "expected {")
    assert_error(client.post("/api/teach", json={"name": "x", "images": ["%%%"] * 5}), 400, "not valid base64")
    assert_error(client.post("/api/teach", json={"name": "x", "images": [5] * 5}), 400, "base64 string")
    assert_error(client.post("/api/teach", json={"images": photos}), 400, '"name"')
    assert_error(client.post("/api/teach", json={"name": "x", "images": photos[:4]}), 400, "5 to 20 images, got 4")
    for name in ("", "a\tb", "x" * 41, classifier.labels[0]):
        assert_error(client.post("/api/teach", json={"name": name, "images": photos}), 400, "class")
    bad = [base64.b64encode(b"GIF89a nonsense").decode()] * 5
    assert_error(client.post("/api/teach", json={"name": "x", "images": bad}), 415, "known format")
    files = [("images", (f"{i}.png", fmnist_png(i))) for i in range(21)]
    assert_error(client.post("/api/teach", data={"name": "x"}, files=files), 400, "Too many files")
    assert len(classifier.labels) == 10


def test_other_errors_are_json(client, classifier, monkeypatch):
    assert_error(client.get("/api/model?format=pdf"), 400, "unknown format 'pdf'")
    assert_error(client.get("/api/teach/0123"), 404, "no such teaching job")
    assert_error(client.get("/api/nothing"), 404, "Not Found")
    assert_error(client.get("/api/classify"), 405, "Method Not Allowed")
    for path in ("/static/../secret.txt", "/static/..%2Fsecret.txt", "/static/%2E%2E/secret.txt"):
        assert_error(client.get(path), 404, "Not Found")
    monkeypatch.setattr(classifier, "classify", lambda x: 1 / 0)
    with TestClient(client.app, raise_server_exceptions=False) as other:
        assert_error(other.post("/api/classify", content=fmnist_png(0)), 500, "internal error (ZeroDivisionError)")
    monkeypatch.undo()
    assert client.post("/api/classify", content=fmnist_png(0)).status_code == 200  # still serving


def test_the_page_and_its_files(client, classifier, tmp_path):
    assert client.get("/").text == "<!doctype html><title>demo</title>"
    assert client.get("/static/style.css").text == "body {}"
    with TestClient(demo_app.create_app(classifier, tmp_path / "missing")) as bare:
        assert_error(bare.get("/"), 404, "page is missing")
        assert bare.post("/api/classify", content=fmnist_png(0)).status_code == 200


# *** teaching, downloads, reset ***
def test_teach_over_http_then_download_and_reset(client, classifier, tmp_path):
    rng = np.random.default_rng(7)
    photos = [base64.b64encode(checkers_photo(rng)).decode() for _ in range(10)]
    response = client.post("/api/teach", json={"name": "checkers", "images": photos})
    assert response.status_code == 202, response.text
    status = wait_for(client, response.json()["id"])
    assert status["error"] is None and status["iteration"] == status["iterations"] == demo.ITERATIONS
    accuracy = status["accuracy"]
    assert accuracy["new"] == 1.0 and accuracy["old_after"] >= accuracy["old_before"] - 0.03
    assert client.get("/api/classes").json()["classes"][-1] == "checkers"
    for _ in range(5):
        assert client.post("/api/classify", content=checkers_photo(rng)).json()["top"][0]["label"] == "checkers"
    downloads = {}
    for format in ("caffemodel", "prototxt", "onnx"):
        response = client.get(f"/api/model?format={format}")
        assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
        downloads[format] = tmp_path / f"m.{format}"
        downloads[format].write_bytes(response.content)
    net = espresso.Net(str(downloads["prototxt"]), str(downloads["caffemodel"]), espresso.TEST)
    assert net.blobs["prob"].shape == (1, 11)
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(downloads["onnx"]), full_check=True)
    assert client.post("/api/reset").json()["classes"] == classifier.labels
    assert len(classifier.labels) == 10 and "checkers" not in client.get("/api/classes").json()["classes"]


def test_teach_multipart(client, classifier):
    rng = np.random.default_rng(8)
    files = [("images", (f"{i}.png", checkers_photo(rng), "image/png")) for i in range(5)]
    response = client.post("/api/teach", data={"name": "board"}, files=files)
    assert response.status_code == 202, response.text
    assert wait_for(client, response.json()["id"])["error"] is None
    assert classifier.labels[-1] == "board"


def test_one_teaching_at_a_time(client, classifier, monkeypatch):
    release = threading.Event()

    def slow_teach(name, inputs, progress):
        with classifier._teaching:  # as a real teaching holds it
            release.wait(10)
        return {"iterations": 0, "loss": None, "accuracy": None}

    monkeypatch.setattr(classifier, "teach", slow_teach)
    photos = [base64.b64encode(fmnist_png(i)).decode() for i in range(5)]
    job = client.post("/api/teach", json={"name": "first", "images": photos}).json()["id"]
    assert_error(client.post("/api/teach", json={"name": "second", "images": photos}), 409, "being taught")
    assert client.get(f"/api/teach/{job}").json()["done"] is False
    while not classifier.teaching:
        time.sleep(0.01)
    assert_error(client.post("/api/reset"), 409, "being taught")
    assert client.post("/api/classify", content=fmnist_png(0)).status_code == 200  # (a real teaching: after it)
    release.set()
    assert wait_for(client, job)["error"] is None


def test_a_failed_teaching_is_reported(client, classifier, monkeypatch):
    def failing_teach(name, inputs, progress):
        progress(10, 2.5)
        raise RuntimeError("out of luck")

    monkeypatch.setattr(classifier, "teach", failing_teach)
    photos = [base64.b64encode(fmnist_png(i)).decode() for i in range(5)]
    status = wait_for(client, client.post("/api/teach", json={"name": "x", "images": photos}).json()["id"])
    assert status["error"] == "internal error (RuntimeError: out of luck)"
    assert (status["iteration"], status["loss"], status["accuracy"]) == (10, 2.5, None)
    assert client.post("/api/classify", content=fmnist_png(0)).status_code == 200
