"""WindowData (R-CNN's input): the window file, foreground/background sampling, Caffe's crop
with context padding (warp and square), mirroring, mean and scale."""

import numpy as np
import pytest
from devices import gpu_test

import espresso
from espresso.data import DatasetError
from espresso.data.image import read_image, resize
from espresso.errors import LayerParamError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.testing import assert_close

FG, BG, UNUSED = (3, 0.8, 2, 3, 12, 15), (5, 0.1, 10, 2, 25, 18), (4, 0.45, 0, 0, 5, 5)


@pytest.fixture
def images(tmp_path, rng):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(tmp_path / name)
    return tmp_path


def window_file(folder, windows=((FG, BG, UNUSED), (FG,)), first_index=0):
    lines = []
    for i, (name, listed) in enumerate(zip(("a.png", "b.png"), windows)):
        lines += [f"# {first_index + i}", name, "3", "20", "30", str(len(listed))]
        lines += [" ".join(map(str, w)) for w in listed]
    (folder / "windows.txt").write_text("\n".join(lines) + "\n")
    return folder / "windows.txt"


def window_net(folder, params="", transform="crop_size: 8", batch=4):
    return espresso.Net(parse_text(f"""
        layer {{ name: "w" type: "WindowData" top: "data" top: "label"
                 transform_param {{ {transform} }}
                 window_data_param {{ source: "{folder / 'windows.txt'}" root_folder: "{folder}/" batch_size: {batch}
                                     fg_threshold: 0.6 bg_threshold: 0.3 {params} }} }}""",
                                    caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


def test_background_first_then_foreground_warped_with_mean_and_scale(images):
    window_file(images)
    net = window_net(images, "fg_fraction: 0.5 scale: 0.5", "crop_size: 8 mean_value: 1 mean_value: 2 mean_value: 3")
    layer = net.layer_dict["w"]
    assert (len(layer.fg), len(layer.bg)) == (2, 1)  # the 0.45 window is neither
    net.forward()
    assert net.blobs["label"].data.tolist() == [0, 0, 3, 3]
    image = read_image(images / "a.png")
    mean = np.array([1, 2, 3], np.float32)[:, None, None]
    fg = (resize(image[:, 3:16, 2:13], 8, 8) - mean) * 0.5  # rows y1..y2, columns x1..x2, inclusive
    bg = (resize(image[:, 2:19, 10:26], 8, 8) - mean) * 0.5
    assert_close(net.blobs["data"].data[0], bg)
    assert_close(net.blobs["data"].data[2], fg)


def test_context_padding_at_the_corner_and_mirrored(images):
    """crop 8, context_pad 2 around (0, 0)-(7, 7): Caffe's box grows to (-4, -4)-(12, 12), scale
    8/17; the clipped 13 x 13 goes to 6 x 6 at (2, 2); outside the image stays 0.  Mirrored, the
    padding moves to the far side."""
    window_file(images, ((FG, BG, (1, 0.9, 0, 0, 7, 7)), (FG,)))
    layer = window_net(images, "context_pad: 2").layer_dict["w"]
    corner = next(w for w in layer.fg if w[2:] == (0, 0, 7, 7))
    image = read_image(images / "a.png").astype(np.float32)
    inside = resize(image[:, 0:13, 0:13].astype(np.uint8), 6, 6)
    out = np.zeros((3, 8, 8), np.float32)
    layer.crop_window(corner, False, out)
    assert_close(out[:, 2:, 2:], inside)
    assert not out[:, :2].any() and not out[:, :, :2].any()
    flipped = np.zeros((3, 8, 8), np.float32)
    layer.crop_window(corner, True, flipped)
    assert_close(flipped[:, 2:, :6], inside[:, :, ::-1])
    assert not flipped[:, :, 6:].any()


def test_square_mode_makes_the_window_square_first(images):
    window_file(images, ((FG, BG, (1, 0.9, 4, 6, 9, 9)), (FG,)))  # 6 wide, 4 tall
    layer = window_net(images, "crop_mode: 'square'").layer_dict["w"]
    window = next(w for w in layer.fg if w[2:] == (4, 6, 9, 9))
    out = np.zeros((3, 8, 8), np.float32)
    layer.crop_window(window, False, out)
    image = read_image(images / "a.png")
    # centre (7, 8), half 3 both ways: (4, 5)-(10, 11), a 7 x 7 box warped to 8 x 8
    assert_close(out, resize(image[:, 5:12, 4:11], 8, 8))


def test_mirror_draws_and_resume_continue_the_stream(images):
    window_file(images)
    net = window_net(images, "fg_fraction: 0.25", "crop_size: 8 mirror: true", batch=16)
    net.forward()
    cursor = net.layer_dict["w"].cursor()
    net.forward()
    after = net.blobs["data"].data.copy()
    again = window_net(images, "fg_fraction: 0.25", "crop_size: 8 mirror: true", batch=16)
    again.layer_dict["w"].seek(cursor)
    again.forward()
    assert_close(again.blobs["data"].data, after)
    assert net.blobs["label"].data.tolist() == [0] * 12 + [3] * 4


@pytest.mark.parametrize("change, error, message", [
    (lambda f: window_file(f, first_index=1), DatasetError, "expected '# 0'"),
    (lambda f: window_file(f, ((FG, BG), ((0, 0.9, 1, 1, 4, 4),))), DatasetError, "classes of objects start at 1"),
    (lambda f: window_file(f, ((FG,), (FG,))), DatasetError, "needs foreground and background windows, got 2 and 0"),
    (lambda f: (f / "windows.txt").write_text(""), DatasetError, "Window file is empty"),
    (lambda f: (f / "windows.txt").write_text("# 0 a.png 3 20 x 1\n"), DatasetError, "malformed window file"),
])
def test_bad_window_files_are_refused(images, change, error, message):
    change(images)
    with pytest.raises(error, match=message):
        window_net(images)


def test_fields_caffe_ignores_are_refused(images):
    window_file(images)
    with pytest.raises(LayerParamError, match="window_data_param.crop_size is deprecated.*transform_param.crop_size"):
        window_net(images, "crop_size: 8", "")
    with pytest.raises(LayerParamError, match="transform_param.scale is unused by WindowData.*window_data_param.scale"):
        window_net(images, "", "crop_size: 8 scale: 0.5")
    with pytest.raises(LayerParamError, match="needs a crop size"):
        window_net(images, "", "")
    with pytest.raises(LayerParamError, match="give 1 or 3 values"):
        window_net(images, "", "crop_size: 8 mean_value: 1 mean_value: 2")


@gpu_test
def test_window_data_on_a_gpu_gives_the_cpus_batches(images):
    window_file(images)
    cpu = window_net(images, "context_pad: 1 fg_fraction: 0.5", "crop_size: 8 mirror: true mean_value: 100")
    espresso.set_mode_gpu()
    try:
        gpu = window_net(images, "context_pad: 1 fg_fraction: 0.5", "crop_size: 8 mirror: true mean_value: 100")
    finally:
        espresso.set_mode_cpu()
    gpu.layer_dict["w"].seek(cpu.layer_dict["w"].cursor())  # the same draws
    for _ in range(2):
        cpu.forward(), gpu.forward()
        assert_close(gpu.blobs["data"].data, cpu.blobs["data"].data)
        assert gpu.blobs["label"].data.tolist() == cpu.blobs["label"].data.tolist()
