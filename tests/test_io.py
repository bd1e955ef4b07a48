"""load_image / load_label conversions and errors, label PNG and overlay writers, atomic_write."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from maskclip_apro.data.io import load_image, load_label
from maskclip_apro.palette import voc_palette
from maskclip_apro.visualize import save_overlay
from maskclip_apro.writing import atomic_write, save_label_png


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


def _exif_rotated_jpeg(path):
    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    rgb[:8, :8] = [250, 20, 20]  # marker top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(rgb).save(path, exif=exif, quality=95)


def _sixteen_bit_png(path):
    Image.fromarray(np.array([[0, 257, 65535, 32896]], dtype=np.uint16)).save(path)


def _rgba_png(path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255
    rgba[2:, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(path)


def _palette_png_with_transparency(path):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    im.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0] + [0] * 759)
    im.save(path, transparency=1)


def _grayscale_png(path):
    Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10), mode="L").save(path)


@pytest.mark.parametrize("make, expected_corner", [
    (_exif_rotated_jpeg, None), (_sixteen_bit_png, [0, 0, 0]), (_rgba_png, [200, 0, 0]),
    (_palette_png_with_transparency, [10, 20, 30]), (_grayscale_png, [0, 0, 0]),
])
def test_a_pil_image_converts_exactly_like_its_file(tmp_path, make, expected_corner):
    path = tmp_path / ("x.jpg" if make is _exif_rotated_jpeg else "x.png")
    make(path)
    from_file = load_image(path)
    with Image.open(path) as im:
        np.testing.assert_array_equal(load_image(im), from_file)
    if expected_corner is not None:
        assert from_file[0, 0].tolist() == expected_corner
    if make is _exif_rotated_jpeg:
        assert from_file.shape == (48, 32, 3) and from_file[2, -3, 0] > 200  # marker now top-right
    if make is _sixteen_bit_png:
        assert from_file[0, :, 0].tolist() == [0, 1, 255, 128]
    if make is _rgba_png:
        assert from_file[3, 3].tolist() == [255, 255, 255]
    if make is _palette_png_with_transparency:
        assert from_file[0, 1].tolist() == [255, 255, 255]


def test_the_segmenter_gives_a_pil_image_the_labels_of_its_file(tmp_path):
    from maskclip_apro import Segmenter

    _exif_rotated_jpeg(tmp_path / "r.jpg")
    seg = Segmenter.from_pretrained(model="tiny_vit", vocab=["red", "black"], refine="none",
                                    overrides=[f"generator.cache_dir={tmp_path}", "generator.short_side=64",
                                               "generator.window=64", "generator.stride=32"])
    with Image.open(tmp_path / "r.jpg") as im:
        from_pil = seg(im).labels
    np.testing.assert_array_equal(from_pil, seg(tmp_path / "r.jpg").labels)
    assert from_pil.shape == (48, 32)


def test_arrays_of_other_kinds_are_refused_or_converted():
    np.testing.assert_array_equal(load_image(np.array([[0, 65535]], np.uint16))[0, :, 0], [0, 255])
    two = np.dstack([np.full((2, 2), 90, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)])
    assert load_image(two)[:, :, 0].tolist() == [[90, 255], [90, 255]]  # gray + alpha on white
    for bad in (np.zeros((2, 2, 5), np.uint8), np.zeros((2,), np.uint8), np.zeros((0, 3, 3), np.uint8)):
        with pytest.raises(ValueError, match="shape"):
            load_image(bad)
    with pytest.raises(ValueError, match="file path, a PIL image or a uint8 array"):
        load_image([[1, 2]])


def test_a_truncated_pil_image_is_a_clear_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(tmp_path / "t.jpg") as im, pytest.raises(ValueError, match="PIL image from .*t.jpg.*truncated"):
        load_image(im)


def test_images_over_the_pixel_limit_are_refused_with_the_way_to_raise_it(tmp_path, monkeypatch):
    from maskclip_apro.data import io as image_io

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "big.png")
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        image_io.set_max_image_pixels(1000)
        with pytest.raises(ValueError, match=r"big.png' is 40 x 30 = 1,200 pixels, over the limit of 1,000.*"
                                             r"max_image_pixels=N or the environment variable MASKCLIP_MAX_IMAGE_PIXELS"):
            load_image(tmp_path / "big.png")
        image_io.set_max_image_pixels(None)
        monkeypatch.setenv("MASKCLIP_MAX_IMAGE_PIXELS", "1199")
        with pytest.raises(ValueError, match="over the limit of 1,199"):
            load_image(tmp_path / "big.png")
        monkeypatch.setenv("MASKCLIP_MAX_IMAGE_PIXELS", "1200")
        assert load_image(tmp_path / "big.png").shape == (30, 40, 3)
        monkeypatch.setenv("MASKCLIP_MAX_IMAGE_PIXELS", "lots")
        with pytest.raises(ValueError, match="MASKCLIP_MAX_IMAGE_PIXELS='lots' must be a positive integer"):
            load_image(tmp_path / "big.png")
        with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
            image_io.set_max_image_pixels(0)
    finally:
        image_io.set_max_image_pixels(None)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # Pillow's own setting is left as it was


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f.txt", "w") as f:
            f.write("x")
        save_label_png(tmp_path / "l.png", np.zeros((2, 2), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "l.png").stat().st_mode & 0o777 == mode


# A writer SIGKILLed halfway through atomic_write(argv[1]): it leaves its temporary behind.
KILLED_WRITER = (
    "import os, signal, sys\n"
    "from maskclip_apro.writing import atomic_write\n"
    "with atomic_write(sys.argv[1]) as f:\n"
    "    f.write(b'half')\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
)


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    import subprocess
    import sys

    from maskclip_apro.writing import remove_stale_temporaries

    labels = tmp_path / "out" / "labels"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(labels / "a.png")], capture_output=True, timeout=120)
    assert done.returncode == -9
    (stale,) = labels.iterdir()
    assert stale.name.startswith(".a.png.") and stale.name.endswith(".tmp")
    foreign = [labels / ".b.png.abcdefgh.tmp", labels / "notes.tmp", tmp_path / "out" / "keep.tmp",
               tmp_path / "elsewhere" / stale.name]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not ours")
    with atomic_write(labels / "live.png") as f:  # a running writer's temporary stays
        f.write(b"x")
        (live,) = labels.glob(".live.png.*.tmp")
        assert remove_stale_temporaries(tmp_path / "out") == [stale]
        assert live.exists()
    assert all(p.exists() for p in foreign) and not stale.exists()
    assert sorted(p.name for p in labels.iterdir()) == [".b.png.abcdefgh.tmp", "live.png", "notes.tmp"]


def test_the_next_run_removes_a_killed_runs_temporaries(tmp_path):
    """A rerun of refine in the same output_dir removes what a SIGKILLed writer left there."""
    import subprocess
    import sys

    from maskclip_apro.cli import refine
    from maskclip_apro.config import compose

    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out / "labels" / "im0.png")], capture_output=True, timeout=120)
    (stale,) = (out / "labels").glob(".im0.png.*.tmp")
    refine.run(compose("refine", ["model=tiny_vit", "dataset=synthetic", "dataset.num_images=1", f"output_dir={out}",
                                  f"generator.cache_dir={tmp_path / 'cache'}", "refine=none"]))
    assert not stale.exists()
    assert [p.name for p in (out / "labels").iterdir()] == ["synthetic_val_0000.png"]


def test_output_paths_never_leave_the_output_folder(tmp_path):
    from maskclip_apro.writing import output_path

    assert output_path(tmp_path, "labels", "2007_000032.png") == tmp_path / "labels" / "2007_000032.png"
    assert output_path(tmp_path, "labels", "sub/x.png") == tmp_path / "labels" / "sub" / "x.png"
    for parts in [("labels", "../../x.png"), ("labels", "/etc/x.png"), ("..",), ("labels", "a/../../../x")]:
        with pytest.raises(ValueError, match="outside the output folder"):
            output_path(tmp_path, *parts)
