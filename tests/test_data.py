"""Dataset readers on tiny layouts written in tmp_path, the synthetic set, build_dataset, configs."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskclip_apro.data import DATASET_NAMES, Sample, build_dataset
from maskclip_apro.writing import save_label_png

RNG = np.random.default_rng(0)


def write_pair(img_path: Path, lbl_path: Path | None, label: np.ndarray, fmt_suffix: str = ".jpg"):
    img_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = RNG.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img_path)
    if lbl_path is not None:
        lbl_path.parent.mkdir(parents=True, exist_ok=True)
        save_label_png(lbl_path, label)


def make_devkit(root: Path, year: str, label_dir: str, sets_dir: str, labels: dict[str, np.ndarray]):
    base = root / "VOCdevkit" / year
    for name, label in labels.items():
        write_pair(base / "JPEGImages" / f"{name}.jpg", base / label_dir / f"{name}.png", label)
    split = base / "ImageSets" / sets_dir
    split.mkdir(parents=True)
    (split / "val.txt").write_text("\n".join(labels) + "\n")
    (split / "train.txt").write_text(next(iter(labels)) + "\n")
    return base


VOC_LABELS = {
    "2007_000001": np.array([[0, 0, 15], [255, 15, 20]], np.uint8),
    "2007_000002": np.array([[1, 0, 0], [0, 255, 0]], np.uint8),
}


@pytest.mark.parametrize("where", ["parent", "devkit", "year"])
def test_voc21_layout_and_roots(tmp_path, where):
    base = make_devkit(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", VOC_LABELS)
    root = {"parent": tmp_path, "devkit": tmp_path / "VOCdevkit", "year": base}[where]
    ds = build_dataset("voc21", root=str(root))
    assert len(ds) == 2 and ds.num_classes == 21 and ds.has_background and ds.ignore_index == 255
    s = ds[0]
    assert isinstance(s, Sample) and s.name == "2007_000001"
    assert s.image.shape == (2, 3, 3) and s.image.dtype == np.uint8
    np.testing.assert_array_equal(s.label, VOC_LABELS["2007_000001"])
    assert len(build_dataset("voc21", root=root, split="train")) == 1
    assert len(build_dataset("voc21", root=root, limit=1)) == 1
    (base / "SegmentationClass").rename(base / "SegmentationClassAug")
    aug = build_dataset("voc21", root=root, label_dir="SegmentationClassAug")
    np.testing.assert_array_equal(aug[1].label, VOC_LABELS["2007_000002"])


def test_voc20_reduces_zero_label(tmp_path):
    make_devkit(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", VOC_LABELS)
    ds = build_dataset("voc20", root=tmp_path)
    assert ds.num_classes == 20 and not ds.has_background
    np.testing.assert_array_equal(ds[0].label, [[255, 255, 14], [255, 14, 19]])
    np.testing.assert_array_equal(ds[1].label, [[0, 255, 255], [255, 255, 255]])


def test_context_59_and_60(tmp_path):
    labels = {"2008_000002": np.array([[0, 1, 59], [255, 30, 0]], np.uint8)}
    make_devkit(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext", labels)
    ds60 = build_dataset("context60", root=tmp_path / "VOCdevkit")
    assert ds60.num_classes == 60 and ds60.has_background
    np.testing.assert_array_equal(ds60[0].label, labels["2008_000002"])
    ds59 = build_dataset("context59", root=tmp_path / "VOCdevkit")
    assert ds59.num_classes == 59 and not ds59.has_background
    np.testing.assert_array_equal(ds59[0].label, [[255, 0, 58], [255, 29, 255]])


def test_cocostuff(tmp_path):
    root = tmp_path / "coco_stuff164k"
    for stem, label in [("000000000139", np.array([[0, 170], [255, 5]], np.uint8)),
                        ("000000000285", np.array([[1, 1], [1, 1]], np.uint8))]:
        write_pair(root / "images" / "val2017" / f"{stem}.jpg",
                   root / "annotations" / "val2017" / f"{stem}_labelTrainIds.png", label)
    ds = build_dataset("cocostuff171", root=root)
    assert len(ds) == 2 and ds.num_classes == 171 and not ds.has_background
    assert ds[0].name == "000000000139"
    np.testing.assert_array_equal(ds[0].label, [[0, 170], [255, 5]])
    assert len(build_dataset("cocostuff171", root=root, split="val2017")) == 2
    with pytest.raises(FileNotFoundError, match="train2017"):
        build_dataset("cocostuff171", root=root, split="train")


def test_folder_and_images(tmp_path):
    root = tmp_path / "mydata"
    label = np.array([[0, 1, 2]], np.uint8)
    write_pair(root / "images" / "b.png", root / "labels" / "b.png", label)
    write_pair(root / "images" / "a.JPG", root / "labels" / "a.png", label)
    (root / "images" / "notes.txt").write_text("ignored")
    (root / "classes.txt").write_text("background\nroad\ncar, vehicle\n")
    ds = build_dataset("folder", root=root)
    assert [ds[i].name for i in range(len(ds))] == ["a", "b"]
    assert ds.class_names == ["background", "road", "car, vehicle"] and ds.has_background
    np.testing.assert_array_equal(ds[1].label, label)
    ds2 = build_dataset("folder", root=root, classes=["road", "car", "tree"])
    assert not ds2.has_background and ds2.num_classes == 3

    imgs = build_dataset("images", root=root / "images")
    assert len(imgs) == 2 and imgs[0].label is None and imgs.num_classes == 21
    one = build_dataset("images", root=root / "images" / "b.png", classes="cocostuff171")
    assert len(one) == 1 and one[0].name == "b" and one[0].image.shape == (1, 3, 3)
    assert one.num_classes == 171


def test_broken_layouts_name_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("voc21", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        build_dataset("voc21", root=tmp_path)
    base = make_devkit(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", VOC_LABELS)
    with pytest.raises(FileNotFoundError, match=r"Segmentation[/\\]test\.txt"):
        build_dataset("voc21", root=tmp_path, split="test")
    (base / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000002.png"):
        build_dataset("voc21", root=tmp_path)
    assert len(build_dataset("voc21", root=tmp_path, limit=1)) == 1  # only listed items are checked
    (base / "SegmentationClass").rename(base / "moved")
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        build_dataset("voc21", root=tmp_path)

    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"f[/\\]labels"):
        build_dataset("folder", root=root)
    (root / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        build_dataset("folder", root=root)
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_dataset("folder", root=root, classes="voc21")
    write_pair(root / "images" / "x.jpg", None, np.zeros((2, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"labels[/\\]x.png"):
        build_dataset("folder", root=root, classes="voc21")


def test_bad_files_and_sizes(tmp_path):
    root = tmp_path / "f"
    write_pair(root / "images" / "x.jpg", root / "labels" / "x.png", np.zeros((2, 2), np.uint8))
    save_label_png(root / "labels" / "x.png", np.zeros((3, 2), np.uint8))
    ds = build_dataset("folder", root=root, classes="voc21")
    with pytest.raises(ValueError, match=r"x.png.*\(3, 2\).*x.jpg.*\(2, 2\)"):
        ds[0]
    (root / "images" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.jpg"):
        ds[0]
    write_pair(root / "images" / "x.png", None, np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"share the name.*'x'"):
        build_dataset("images", root=root / "images")
    with pytest.raises(IndexError):
        ds[5]


def test_build_errors():
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        build_dataset("voc")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("voc21")
    with pytest.raises(ValueError, match=r"does not take \['seed'\]"):
        build_dataset("voc21", root=".", seed=1)
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("synthetic", root="x")
    with pytest.raises(ValueError, match="limit"):
        build_dataset("synthetic", limit=0)


def test_synthetic_deterministic_and_shapes():
    ds = build_dataset("synthetic")
    assert len(ds) == 8 and ds.num_classes == 5 and ds.has_background
    assert ds.class_names[0] == "background" and ds.ignore_index == 255
    again = build_dataset("synthetic")
    seen = set()
    for i in reversed(range(len(ds))):  # order of access must not matter
        a, b = ds[i], again[i]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        h, w = a.label.shape
        assert 64 <= h <= 96 and 64 <= w <= 96
        assert a.image.shape == (h, w, 3) and a.image.dtype == np.uint8 and a.label.dtype == np.uint8
        values = set(np.unique(a.label).tolist())
        assert values <= {0, 1, 2, 3, 4, 255} and 0 in values and 255 in values
        assert len(values - {0, 255}) >= 2
        seen |= values
        assert (a.label == 255).mean() < 0.15
    assert seen == {0, 1, 2, 3, 4, 255}
    other = build_dataset("synthetic", seed=1)
    assert not np.array_equal(other[0].image[:8, :8], ds[0].image[:8, :8])
    train = build_dataset("synthetic", split="train")
    assert not np.array_equal(train[0].image[:8, :8], ds[0].image[:8, :8])
    fixed = build_dataset("synthetic", num_images=2, size=[40, 50], ignore_boundary=False)
    assert len(fixed) == 2 and fixed[1].image.shape == (40, 50, 3)
    assert 255 not in fixed[1].label
    assert len(build_dataset("synthetic", limit=3)) == 3


def test_synthetic_regions_are_colour_coherent():
    """Within-region colour spread is far below the spread between class colours."""
    s = build_dataset("synthetic", ignore_boundary=False)[0]
    img = s.image.astype(float)
    means = []
    for c in np.unique(s.label):
        pix = img[s.label == c]
        means.append(pix.mean(0))
        assert pix.std(0).max() < 20
    means = np.array(means)
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert gaps[~np.eye(len(means), dtype=bool)].min() > 60


def test_hydra_dataset_configs_build(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    names = sorted(p.stem for p in (conf_dir / "dataset").glob("*.yaml"))
    assert names == sorted(DATASET_NAMES)
    make_devkit(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", VOC_LABELS)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        for name in names:
            cfg = compose(config_name=f"dataset/{name}")["dataset"]
            assert cfg.name == name and {"root", "split", "limit"} <= set(cfg.keys()) and cfg.limit is None
        cfg = compose(config_name="dataset/voc21")["dataset"]
        ds = build_dataset(**OmegaConf.to_container(cfg, resolve=True))
        assert len(ds) == 2
        cfg = compose(config_name="dataset/synthetic", overrides=["dataset.num_images=3"])["dataset"]
        assert len(build_dataset(**cfg)) == 3


@pytest.mark.parametrize("bad", ["../../x", "/abs/x", "a/b", "a\\b", "..", "."])
def test_split_file_ids_must_be_plain_file_names(tmp_path, bad):
    base = make_devkit(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", VOC_LABELS)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text(f"2007_000001\n\n{bad}\n")
    with pytest.raises(ValueError, match=rf"val.txt' line 3: sample id {re.escape(repr(bad))} is not a plain file name"):
        build_dataset("voc21", root=tmp_path)


def test_hidden_files_are_not_images(tmp_path):
    root = tmp_path / "f"
    write_pair(root / "images" / "a.png", root / "labels" / "a.png", np.zeros((2, 2), np.uint8))
    (root / "images" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "images" / ".DS_Store").write_bytes(b"Bud1")
    assert [s.name for s in build_dataset("folder", root=root, classes="voc21")] == ["a"]
    assert len(build_dataset("images", root=root / "images")) == 1


def test_label_values_beyond_the_classes_name_the_file(tmp_path):
    root = tmp_path / "f"
    write_pair(root / "images" / "a.png", root / "labels" / "a.png", np.array([[0, 2, 255, 7, 3]], np.uint8))
    (root / "classes.txt").write_text("background\nroad\ncar\n")
    with pytest.raises(ValueError, match=r"label file '.*labels/a.png' holds value\(s\) 3, 7 that are not classes of "
                                         r"this dataset \(3 classes, 0-2, ignore 255\)"):
        build_dataset("folder", root=root)[0]
    base = make_devkit(tmp_path / "voc", "VOC2012", "SegmentationClass", "Segmentation",
                       {"2007_000001": np.array([[0, 21, 30]], np.uint8)})
    with pytest.raises(ValueError, match=r"2007_000001.png' holds value\(s\) 21, 30 .*\(20 classes"):
        build_dataset("voc20", root=base)[0]


def test_sources_fingerprint_the_files_and_generation_parameters(tmp_path):
    root = tmp_path / "f"
    write_pair(root / "images" / "a.png", root / "labels" / "a.png", np.zeros((2, 2), np.uint8))
    ds = build_dataset("folder", root=root, classes="voc21")
    first = ds.source(0)
    assert first.name == "a" and first.image != first.label
    save_label_png(root / "labels" / "a.png", np.ones((2, 3), np.uint8))
    assert ds.source(0).label != first.label and ds.source(0).image == first.image
    synthetic = build_dataset("synthetic", num_images=2)
    assert synthetic.source(1) == build_dataset("synthetic", num_images=5).source(1)
    assert synthetic.source(1).name == synthetic[1].name
    assert synthetic.source(1) != build_dataset("synthetic", seed=3).source(1)
    with pytest.raises(IndexError):
        synthetic.source(2)


def make_labelme_export(root: Path) -> Path:
    """A folder laid out as labelme's labelme2voc.py writes it (no ImageSets, labels as PNG and .npy)."""
    labels = {"2011_000003": np.array([[0, 15, 255], [5, 0, 0]], np.uint8),
              "2011_000006": np.array([[9, 18, 15], [0, 0, 255]], np.uint8)}
    for name, label in labels.items():
        write_pair(root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClassPNG" / f"{name}.png", label)
        (root / "SegmentationClass").mkdir(exist_ok=True)
        np.save(root / "SegmentationClass" / f"{name}.npy", np.where(label == 255, -1, label).astype(np.int32))
        (root / "SegmentationClassVisualization").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "SegmentationClassVisualization" / f"{name}.jpg")
    voc = ["_background_", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor"]
    (root / "class_names.txt").write_text("\n".join(voc))  # labelme writes no final newline
    return root


def test_a_labelme_voc_export_reads_as_it_is(tmp_path):
    root = make_labelme_export(tmp_path / "data_dataset_voc")
    ds = build_dataset("folder", root=root)
    assert [s.name for s in ds] == ["2011_000003", "2011_000006"]
    assert ds.num_classes == 21 and ds.class_names[0] == "background" and ds.has_background
    assert ds.class_names[20] == "tv/monitor"
    np.testing.assert_array_equal(ds[0].label, [[0, 15, 255], [5, 0, 0]])
    assert ds[1].image.shape == (2, 3, 3)

    assert build_dataset("folder", root=root, classes="voc21").class_names[20] == "tv monitor"
    assert len(build_dataset("folder", root=root, split="train")) == 2  # no ImageSets: every image
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000006\n")
    assert [s.name for s in build_dataset("folder", root=root, split="val")] == ["2011_000006"]
    assert len(build_dataset("folder", root=root)) == 2  # no split: every image
    with pytest.raises(FileNotFoundError, match=r"ImageSets[/\\]Segmentation[/\\]train.txt"):
        build_dataset("folder", root=root, split="train")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000006\nmissing_one\n")
    with pytest.raises(FileNotFoundError, match="first: 'missing_one'"):
        build_dataset("folder", root=root, split="val")

    (root / "SegmentationClassPNG").rename(root / "masks")
    with pytest.raises(FileNotFoundError, match=r"2011_000003.png"):  # SegmentationClass holds no PNG files
        build_dataset("folder", root=root)
    assert len(build_dataset("folder", root=root, label_dir="masks")) == 2
    with pytest.raises(FileNotFoundError, match="label folder not found: .*nowhere"):
        build_dataset("folder", root=root, label_dir="nowhere")


def test_a_byte_order_mark_is_not_part_of_the_first_class(tmp_path):
    from maskclip_apro.data import load_vocab
    from maskclip_apro.data.class_file import read_class_file

    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes("background\ncat\n".encode("utf-8-sig"))
    assert load_vocab(vocab) == ["background", "cat"]
    assert read_class_file(vocab) == ["background", "cat"]
    root = tmp_path / "f"
    write_pair(root / "images" / "a.png", root / "labels" / "a.png", np.zeros((2, 2), np.uint8))
    (root / "classes.txt").write_bytes("background\ncat\n".encode("utf-8-sig"))
    assert build_dataset("folder", root=root).has_background


def test_a_vocabulary_that_is_a_directory_says_so(tmp_path):
    from maskclip_apro.data import load_vocab

    with pytest.raises(ValueError, match=f"vocabulary file '{tmp_path}' is a directory, not a text file"):
        load_vocab(tmp_path)


def test_entries_that_are_not_read_are_listed_with_why(tmp_path):
    root = tmp_path / "images"
    write_pair(root / "a.png", None, np.zeros((2, 2), np.uint8))
    Image.new("P", (2, 2)).save(root / "anim.gif")
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "sub").mkdir()
    ds = build_dataset("images", root=root)
    assert [s.name for s in ds] == ["a"]
    why = {Path(path).name: reason for path, reason in ds.skipped}
    assert set(why) == {"anim.gif", "gone.png", "loop.png"}
    assert why["anim.gif"].startswith("not an image type") and why["gone.png"].startswith("a broken symbolic link")
    assert why["loop.png"].startswith("a symbolic link loop")
