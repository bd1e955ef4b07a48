"""load_image / load_label conversions and errors, label PNG and overlay writers, atomic_write."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from maskclip_apro.data import voc_palette
from maskclip_apro.data.io import atomic_write, load_image, load_label, save_label_png, save_overlay


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # VOC ignore/boundary colour
    assert len({tuple(c) for c in pal}) == 256
    np.testing.assert_array_equal(voc_palette(21), pal[:21])
    with pytest.raises(ValueError, match="num_classes"):
        voc_palette(257)


def test_rgb_jpeg_and_png(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    assert load_image(str(tmp_path / "a.jpg")).shape == (12, 10, 3)


def test_grayscale(tmp_path):
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red
    rgba[2:, :, 3] = 0  # bottom fully transparent -> white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[3, 3].tolist() == [255, 255, 255]


def test_16bit_scaled(tmp_path):
    wide = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    with Image.open(tmp_path / "w.png") as im:
        assert im.mode.startswith("I")
    out = load_image(tmp_path / "w.png")
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]


def test_palette_png(tmp_path):
    idx = np.array([[0, 1], [2, 15]], dtype=np.uint8)
    save_label_png(tmp_path / "p.png", idx)
    out = load_image(tmp_path / "p.png")
    pal = voc_palette()
    np.testing.assert_array_equal(out, pal[idx])


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[0, 0] = 255  # marker top-left
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    im.save(tmp_path / "r.png", exif=exif)
    out = load_image(tmp_path / "r.png")
    assert out.shape == (6, 4, 3)
    assert out[0, -1].tolist() == [255, 255, 255]


def test_missing_corrupt_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="directory"):
        load_image(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(bad)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(buf, format="JPEG")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="trunc.jpg"):
        load_image(truncated)
    with pytest.raises(ValueError, match="bad.jpg"):
        load_label(bad)


def test_label_roundtrip_and_modes(tmp_path):
    labels = np.array([[0, 1, 255], [20, 3, 0]], dtype=np.int64)
    save_label_png(tmp_path / "l.png", labels)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        assert im.getpalette()[3:6] == [128, 0, 0]
    out = load_label(tmp_path / "l.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_label(tmp_path / "gray.png"), labels)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*mode 'RGB'"):
        load_label(tmp_path / "rgb.png")


def test_save_label_png_errors_and_custom_palette(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        save_label_png(tmp_path / "x.png", np.array([[0, 300]]))
    with pytest.raises(ValueError, match="2-D"):
        save_label_png(tmp_path / "x.png", np.zeros((1, 2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        save_label_png(tmp_path / "x.png", np.zeros((2, 2)))
    pal = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    save_label_png(tmp_path / "sub" / "c.png", np.array([[0, 1]]), pal)
    with Image.open(tmp_path / "sub" / "c.png") as im:
        assert im.getpalette()[:6] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "x.png").exists()


def test_save_overlay(tmp_path):
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 255], [1, 1, 0]])
    save_overlay(tmp_path / "o.png", image, labels, alpha=0.5)
    with Image.open(tmp_path / "o.png") as im:
        out = np.asarray(im)
    assert out[0, 0].tolist() == [50, 50, 50]  # black class 0 at alpha 0.5
    assert out[0, 1].tolist() == [114, 50, 50]  # (100 + 128) / 2 = 114
    assert out[0, 2].tolist() == [100, 100, 100]  # ignore left as the image
    save_overlay(tmp_path / "o.jpg", image, labels)
    with Image.open(tmp_path / "o.jpg") as im:
        assert im.format == "JPEG"
    with pytest.raises(ValueError, match="does not match"):
        save_overlay(tmp_path / "p.png", image, labels[:, :2])
    with pytest.raises(ValueError, match="extension"):
        save_overlay(tmp_path / "p.unknownext", image, labels)


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    with atomic_write(target, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("new, half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass
