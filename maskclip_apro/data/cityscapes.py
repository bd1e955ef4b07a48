"""Cityscapes (19 evaluation classes as train ids, mmseg layout)."""

from __future__ import annotations

from pathlib import Path

from .base import Item, SegDataset, require
from .folder import is_hidden
from .vocab import load_vocab

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


class CityscapesDataset(SegDataset):
    """root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png with
    root/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png (values 0..18, 255 = ignore), as
    written by cityscapesScripts' createTrainIdLabelImgs (or mmseg's cityscapes converter).

    split: "train" or "val". Sample names are the stems (e.g. "frankfurt_000000_000294").
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None):
        root = require(Path(root), "dataset root")
        image_dir = require(root / "leftImg8bit" / split, "image folder")
        label_dir = require(root / "gtFine" / split, "annotation folder")
        images = sorted(p for p in image_dir.rglob(f"*{IMAGE_SUFFIX}") if not is_hidden(p))
        if not images:
            raise FileNotFoundError(f"no *{IMAGE_SUFFIX} images under {str(image_dir)!r}")
        items = []
        for path in images:
            stem = path.name[: -len(IMAGE_SUFFIX)]
            items.append(Item(stem, path, label_dir / path.parent.relative_to(image_dir) / f"{stem}{LABEL_SUFFIX}"))
        super().__init__(items, load_vocab("cityscapes19"), None, limit)
