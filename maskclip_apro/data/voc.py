"""Pascal VOC 2012 segmentation (VOCdevkit layout)."""

from __future__ import annotations

from pathlib import Path

from .base import Item, SegDataset, read_split_file, reduce_zero_label_lut, require
from .vocab import load_vocab


def find_devkit_year(root: str | Path, year_dir: str) -> Path:
    """Accept root = .../VOCdevkit/<year_dir>, .../VOCdevkit, or the folder holding VOCdevkit."""
    root = require(Path(root), "dataset root")
    for candidate in (root, root / year_dir, root / "VOCdevkit" / year_dir):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no {year_dir} folder under {str(root)!r}: looked for JPEGImages in {str(root)!r}, "
        f"{str(root / year_dir)!r} and {str(root / 'VOCdevkit' / year_dir)!r}"
    )


def devkit_items(base: Path, label_dir: str, split_file: Path) -> list[Item]:
    require(base / label_dir, "label folder")
    ids = read_split_file(split_file)
    return [Item(i, base / "JPEGImages" / f"{i}.jpg", base / label_dir / f"{i}.png") for i in ids]


def train_aug_items(base: Path) -> list[Item]:
    """VOC 2012 train_aug (10,582 images: VOC train plus SBD minus VOC val).

    The id list is ImageSets/Segmentation/train_aug.txt, or trainaug.txt (mmseg's voc_aug
    converter), or train.txt followed by aug.txt (the split mmseg's configs train on). Ids listed
    in train.txt take their label from SegmentationClass, the others from SegmentationClassAug,
    as mmseg's two-part training set does.
    """
    sets = base / "ImageSets" / "Segmentation"
    train_ids = read_split_file(sets / "train.txt") if (sets / "train.txt").is_file() else []
    for name in ("train_aug.txt", "trainaug.txt"):
        if (sets / name).is_file():
            ids = read_split_file(sets / name)
            break
    else:
        if not (sets / "aug.txt").is_file():
            raise FileNotFoundError(
                f"split train_aug needs {str(sets / 'train_aug.txt')!r}, 'trainaug.txt' (mmseg's voc_aug converter) "
                "or 'aug.txt' (with 'train.txt') in that folder, and the SegmentationClassAug labels"
            )
        ids = train_ids + read_split_file(sets / "aug.txt")
    voc_train = set(train_ids)
    return [
        Item(i, base / "JPEGImages" / f"{i}.jpg",
             base / ("SegmentationClass" if i in voc_train else "SegmentationClassAug") / f"{i}.png")
        for i in ids
    ]


class VOCDataset(SegDataset):
    """VOC 2012: JPEGImages/*.jpg, SegmentationClass/*.png (palette, 255 = ignore),
    ImageSets/Segmentation/<split>.txt.

    background=True gives 21 classes (voc21); False gives 20 (voc20): background pixels
    become 255 (ignore) and the other classes shift down by one. label_dir selects
    another label folder, e.g. "SegmentationClassAug" with split "aug" (mmseg's SBD layout).
    split "train_aug" is the SBD-augmented training set (see train_aug_items; label_dir unused).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        background: bool = True,
        label_dir: str = "SegmentationClass",
        limit: int | None = None,
    ):
        base = find_devkit_year(root, "VOC2012")
        if split == "train_aug":
            items = train_aug_items(base)
        else:
            items = devkit_items(base, label_dir, base / "ImageSets" / "Segmentation" / f"{split}.txt")
        lut = None if background else reduce_zero_label_lut()
        super().__init__(items, load_vocab("voc21" if background else "voc20"), lut, limit)
