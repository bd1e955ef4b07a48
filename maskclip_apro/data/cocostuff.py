"""COCO-Stuff 164k (mmseg layout, 171 classes as train ids)."""

from __future__ import annotations

from pathlib import Path

from .base import Item, SegDataset, require
from .folder import is_hidden
from .vocab import load_vocab


def coco_folders(root: str | Path, split: str) -> tuple[list[Path], Path]:
    """The images root/images/<split>2017/*.jpg (sorted, hidden files skipped) and the folder
    root/annotations/<split>2017; `split` may name the folder itself ("val2017")."""
    root = require(Path(root), "dataset root")
    folder = split if split.endswith("2017") else f"{split}2017"
    image_dir = require(root / "images" / folder, "image folder")
    label_dir = require(root / "annotations" / folder, "annotation folder")
    images = sorted(p for p in image_dir.glob("*.jpg") if not is_hidden(p))
    if not images:
        raise FileNotFoundError(f"no .jpg images in {str(image_dir)!r}")
    return images, label_dir


class COCOStuffDataset(SegDataset):
    """root/images/<split>2017/*.jpg and root/annotations/<split>2017/<stem>_labelTrainIds.png
    (values 0..170, 255 = ignore), as written by mmseg's coco_stuff164k converter.

    split: "train" or "val" (or the folder name itself, "val2017").
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None):
        images, label_dir = coco_folders(root, split)
        items = [Item(p.stem, p, label_dir / f"{p.stem}_labelTrainIds.png") for p in images]
        super().__init__(items, load_vocab("cocostuff171"), None, limit)
