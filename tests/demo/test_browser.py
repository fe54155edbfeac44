"""The demo page in a real headless browser (Debian's Chromium, driven by Selenium through Debian's
chromedriver; tools/test.sh installs both where it can): a Fashion-MNIST test image uploaded and
recognized, a drawing classified, a class taught from files and recognized, and the webcam
(Chromium's fake camera fed from a file).  Each step leaves a screenshot in
$ESPRESSO_SCREENSHOTS (default: the test's tmp_path)."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")
from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from espresso.demo.app import create_app  # noqa: E402
from espresso.demo.classifier import Classifier, fmnist_subset  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt install chromium "
                                       "chromium-driver; tools/test.sh installs them where it can)")


@pytest.fixture(scope="module")
def server():
    """The app with the shipped model on a free loopback port, in a thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(Classifier()), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory):
    """A Y4M video of one Fashion-MNIST trouser, enlarged, for Chromium's fake camera."""
    images, labels = fmnist_subset("test")
    trouser = images[list(labels).index(1)]
    frame = np.asarray(Image.fromarray(trouser).resize((224, 224)), np.uint8)
    path = tmp_path_factory.mktemp("camera") / "trouser.y4m"
    with open(path, "wb") as f:
        f.write(b"YUV4MPEG2 W224 H224 F5:1 Ip A1:1 C420jpeg\n")
        chroma = np.full((112, 112), 128, np.uint8).tobytes()
        for _ in range(10):
            f.write(b"FRAME\n" + frame.tobytes() + chroma + chroma)
    return path


@pytest.fixture(scope="module")
def browser(fake_camera):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={fake_camera}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("ESPRESSO_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return lambda driver, name: driver.save_screenshot(str(folder / f"{name}.png"))


def top_label(driver, after=""):
    """The first bar's label once the result differs from `after`."""
    def changed(d):
        bars = d.find_elements(By.CSS_SELECTOR, "#top .bar .text")
        return bars and bars[0].text != after and bars[0].text
    return WebDriverWait(driver, 20).until(changed)


def fmnist_png(tmp_path, label, index=0):
    images, labels = fmnist_subset("test")
    item = images[np.flatnonzero(labels == label)[index]]
    path = tmp_path / f"class{label}_{index}.png"
    Image.fromarray(item).resize((112, 112)).save(path)
    return path


def test_an_uploaded_test_image_is_recognized(server, browser, tmp_path, shots):
    browser.get(server)
    shots(browser, "1-page")
    browser.find_element(By.ID, "file").send_keys(str(fmnist_png(tmp_path, 8)))  # a bag
    assert top_label(browser).startswith("Bag")
    assert "compressed model" in browser.find_element(By.ID, "latency").text
    shots(browser, "2-uploaded-bag")


def test_a_drawing_is_classified(server, browser, shots):
    from selenium.webdriver import ActionChains

    browser.get(server)
    canvas = browser.find_element(By.ID, "draw")
    strokes = ActionChains(browser).move_to_element_with_offset(canvas, -30, -80).click_and_hold()
    for dx, dy in ((0, 60), (0, 60), (60, 0), (0, -60), (0, -60)):  # a trouser-like outline
        strokes = strokes.move_by_offset(dx, dy)
    strokes.release().perform()
    browser.find_element(By.ID, "draw-classify").click()
    assert top_label(browser)  # some class, with its bars
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")
    shots(browser, "3-drawing")


def test_a_class_taught_from_files_is_recognized(server, browser, tmp_path, shots):
    browser.get(server)
    pattern = np.zeros((28, 28), np.uint8)
    pattern[4:24:4, 4:24] = 255  # stripes: no garment of Fashion-MNIST looks so
    files = []
    for i in range(8):
        noisy = np.clip(pattern + np.random.default_rng(i).integers(0, 40, (28, 28)), 0, 255).astype(np.uint8)
        files.append(tmp_path / f"stripes{i}.png")
        Image.fromarray(noisy).resize((112, 112)).save(files[-1])
    browser.find_element(By.ID, "teach-name").send_keys("stripes")
    browser.find_element(By.ID, "teach-files").send_keys("\n".join(str(f) for f in files))
    browser.find_element(By.ID, "teach").click()
    WebDriverWait(browser, 60).until(lambda d: "learned" in d.find_element(By.ID, "teach-status").text)
    shots(browser, "4-taught")
    browser.find_element(By.ID, "file").send_keys(str(files[0]))
    assert top_label(browser).startswith("stripes")
    shots(browser, "5-recognized")
    browser.find_element(By.ID, "reset").click()
    WebDriverWait(browser, 10).until(lambda d: "shipped" in d.find_element(By.ID, "teach-status").text)


def test_the_webcam_is_classified_live(server, browser, shots):
    browser.get(server)
    browser.find_element(By.ID, "camera").click()
    assert top_label(browser).startswith("Trouser")  # the fake camera shows a trouser
    shots(browser, "6-camera")
    browser.find_element(By.ID, "camera").click()


def test_a_large_photo_on_a_light_background_is_shrunk_and_recognized(server, browser, tmp_path, shots):
    """A 1600 x 1200 "photo": a trouser, dark on a light grey background, as a phone would take it."""
    images, labels = fmnist_subset("test")
    trouser = images[np.flatnonzero(labels == 1)[2]]
    photo = Image.new("RGB", (1600, 1200), (214, 208, 200))
    garment = Image.fromarray(255 - trouser).resize((700, 700)).convert("RGB")
    photo.paste(garment, (420, 260), Image.fromarray(trouser).resize((700, 700)))
    photo.save(tmp_path / "photo.jpg", quality=90)
    browser.get(server)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "photo.jpg"))
    assert top_label(browser).startswith("Trouser")
    shots(browser, "7-photo")
