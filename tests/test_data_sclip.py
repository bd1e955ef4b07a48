"""Datasets of the SCLIP-family tables: COCO-Object (conversion from COCO-Stuff maps), Cityscapes, ADE20K."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskclip_apro.data import build_dataset
from maskclip_apro.data.cocoobject import coco_object_table, convert_coco_object, to_coco_object
from maskclip_apro.data.io import load_label

RNG = np.random.default_rng(0)
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_coco_object.py"


def write_image(path: Path, shape, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path, format=fmt)


def write_gray(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


# ---------------------------------------------------------------- COCO-Object

# raw COCO-Stuff value (category id - 1) -> COCO-Object class, by hand from the COCO category list
HAND = {
    0: 1,     # person (id 1)
    1: 2,     # bicycle
    10: 11,   # fire hydrant (id 11)
    12: 12,   # stop sign (id 13; id 12 unused)
    26: 25,   # backpack (id 27; ids 26 unused)
    89: 80,   # toothbrush (id 90)
    91: 0,    # banner (id 92, first stuff class) -> background
    181: 0,   # wood (id 182, last stuff class)
    255: 0,   # unlabelled -> background
}


def test_coco_object_table_by_hand():
    table = coco_object_table()
    for raw, want in HAND.items():
        assert table[raw] == want, raw
    things = table[:90][table[:90] > 0]
    assert things.tolist() == list(range(1, 81))  # the 80 things, in id order
    assert sorted(np.flatnonzero(table[:91] < 0).tolist()) == [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert np.all(table[182:255] < 0)


def test_to_coco_object_on_a_tiny_map_and_bad_values():
    raw = np.array([[0, 1, 10], [12, 26, 89], [91, 181, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(to_coco_object(raw), [[1, 2, 11], [12, 25, 80], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"'x.png' holds values \[11\]"):
        to_coco_object(np.array([[0, 11]], dtype=np.uint8), "'x.png'")


def make_coco_stuff(root: Path) -> dict[str, np.ndarray]:
    raws = {
        "000000000139": np.array([[0, 0, 91], [255, 89, 12]], dtype=np.uint8),
        "000000000285": np.array([[26, 181], [1, 1]], dtype=np.uint8),
    }
    for stem, raw in raws.items():
        write_image(root / "images" / "val2017" / f"{stem}.jpg", raw.shape)
        write_gray(root / "annotations" / "val2017" / f"{stem}.png", raw)
        write_gray(root / "annotations" / "val2017" / f"{stem}_labelTrainIds.png", np.full(raw.shape, 7))  # skipped
    return raws


def test_convert_in_place_then_read(tmp_path):
    root = tmp_path / "coco_stuff164k"
    raws = make_coco_stuff(root)
    assert convert_coco_object(root) == 2
    out = load_label(root / "annotations" / "val2017" / "000000000139_instanceTrainIds.png")
    np.testing.assert_array_equal(out, [[1, 1, 0], [0, 80, 12]])
    ds = build_dataset("cocoobject81", root=root)
    assert len(ds) == 2 and ds.num_classes == 81 and ds.has_background and ds[0].name == "000000000139"
    np.testing.assert_array_equal(ds[1].label, to_coco_object(raws["000000000285"]))
    assert not list((root / "annotations" / "val2017").glob("*labelTrainIds_instanceTrainIds.png"))


def test_convert_to_another_root_links_images_and_script(tmp_path):
    src = tmp_path / "coco_stuff164k"
    make_coco_stuff(src)
    out = tmp_path / "coco_object"
    spec = importlib.util.spec_from_file_location("convert_coco_object", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(src), "-o", str(out)]) == 0
    assert (out / "images").is_symlink()
    assert len(build_dataset("cocoobject81", root=out)) == 2
    assert script.main([str(tmp_path / "nowhere")]) == 1


def test_cocoobject_reader_names_the_missing_conversion(tmp_path):
    root = tmp_path / "coco"
    make_coco_stuff(root)
    with pytest.raises(FileNotFoundError, match="convert_coco_object"):
        build_dataset("cocoobject81", root=root)


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_layout(tmp_path):
    labels = {
        ("frankfurt", "frankfurt_000000_000294"): np.array([[0, 18], [255, 7]], dtype=np.uint8),
        ("lindau", "lindau_000001_000019"): np.array([[11, 11], [13, 0]], dtype=np.uint8),
    }
    for (city, stem), label in labels.items():
        write_image(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", label.shape)
        write_gray(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", label)
        write_gray(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label + 1)  # not read
    ds = build_dataset("cityscapes19", root=tmp_path)
    assert len(ds) == 2 and ds.num_classes == 19 and not ds.has_background
    assert [ds[i].name for i in range(2)] == ["frankfurt_000000_000294", "lindau_000001_000019"]
    np.testing.assert_array_equal(ds[0].label, labels[("frankfurt", "frankfurt_000000_000294")])
    assert ds.class_names[0] == "road" and ds.class_names[18] == "bicycle"
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="lindau_000001_000019_gtFine_labelTrainIds.png"):
        build_dataset("cityscapes19", root=tmp_path)


# ---------------------------------------------------------------- ADE20K


def test_ade20k_reduces_zero_label(tmp_path):
    label = np.array([[0, 1, 150], [255, 75, 2]], dtype=np.uint8)
    write_image(tmp_path / "images" / "validation" / "ADE_val_00000001.jpg", label.shape)
    write_gray(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png", label)
    for split in ("val", "validation"):
        ds = build_dataset("ade150", root=tmp_path, split=split)
        assert len(ds) == 1 and ds.num_classes == 150 and ds.class_names[0] == "wall"
        np.testing.assert_array_equal(ds[0].label, [[255, 0, 149], [255, 74, 1]])
    with pytest.raises(ValueError, match="split"):
        build_dataset("ade150", root=tmp_path, split="test")
