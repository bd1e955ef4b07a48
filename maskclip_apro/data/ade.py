"""ADE20K (SceneParsing, 150 classes, mmseg layout)."""

from __future__ import annotations

from pathlib import Path

from .base import Item, SegDataset, reduce_zero_label_lut, require
from .folder import is_hidden
from .vocab import load_vocab

SPLIT_FOLDERS = {"val": "validation", "train": "training", "validation": "validation", "training": "training"}


class ADE20KDataset(SegDataset):
    """root/images/<split>/*.jpg and root/annotations/<split>/<stem>.png, root = ADEChallengeData2016.

    Label 0 ("other") becomes 255 (ignore) and 1..150 become 0..149 (mmseg reduce_zero_label).
    split: "val" / "validation" or "train" / "training".
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None):
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"ADE20K split must be one of {sorted(SPLIT_FOLDERS)}, got {split!r}")
        root = require(Path(root), "dataset root")
        image_dir = require(root / "images" / SPLIT_FOLDERS[split], "image folder")
        label_dir = require(root / "annotations" / SPLIT_FOLDERS[split], "annotation folder")
        images = sorted(p for p in image_dir.glob("*.jpg") if not is_hidden(p))
        if not images:
            raise FileNotFoundError(f"no .jpg images in {str(image_dir)!r}")
        items = [Item(p.stem, p, label_dir / f"{p.stem}.png") for p in images]
        super().__init__(items, load_vocab("ade150"), reduce_zero_label_lut(), limit)
