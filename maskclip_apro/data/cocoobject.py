"""COCO-Object: background + the 80 COCO thing classes, derived from COCO-Stuff 164k label maps.

The SCLIP-family harness (`datasets/cvt_coco_object.py` of SCLIP / NACLIP / ClearCLIP /
ProxyCLIP, after GroupViT and TCL) converts COCO-Stuff's raw maps (`stuffthingmaps`: pixel =
COCO category id - 1, 255 = unlabelled) to `<stem>_instanceTrainIds.png` with:
thing values 0..89 (the 80 used ids, in order) -> 1..80; stuff values 91..181 -> 0
(background); 255 (unlabelled) -> 0 as well. Unlabelled pixels therefore count as background,
not as ignored. The 11 values of unused COCO ids (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
never occur in the data; the official script would keep them as they are, this converter
refuses a map that holds one (or any other value outside the table).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..writing import save_label_png
from .base import Item, SegDataset, require
from .cocostuff import coco_folders
from .io import load_label
from .vocab import load_vocab

UNUSED_THING_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # COCO ids 12, 26, ... 91 minus one
STUFF_VALUES = range(91, 182)
UNLABELLED = 255  # the raw maps' value for unlabelled pixels (a file format value: COCO-Object makes them background)
INVALID = -1
LABEL_SUFFIX = "_instanceTrainIds.png"


def coco_object_table() -> np.ndarray:
    """(256,) int16: raw COCO-Stuff value -> COCO-Object class (0..80), INVALID where no value is defined."""
    table = np.full(256, INVALID, dtype=np.int16)
    things = [v for v in range(90) if v not in UNUSED_THING_VALUES]
    table[things] = np.arange(1, len(things) + 1)
    table[list(STUFF_VALUES)] = 0
    table[UNLABELLED] = 0
    return table


def to_coco_object(raw: np.ndarray, source: str = "label map") -> np.ndarray:
    """A raw COCO-Stuff label map (H, W) -> uint8 COCO-Object classes; ValueError naming `source` on unknown values."""
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.dtype.kind not in "iu":
        raise ValueError(f"{source} must be a 2-D integer label map, got {raw.dtype} {raw.shape}")
    values = np.unique(raw)
    table = coco_object_table()
    bad = [int(v) for v in values if not 0 <= v <= 255 or table[int(v)] == INVALID]
    if bad:
        raise ValueError(
            f"{source} holds values {bad[:8]} that are not COCO-Stuff category ids minus one "
            "(things 0..89, stuff 91..181, 255 unlabelled): is it a raw stuffthingmaps PNG?"
        )
    return table[raw].astype(np.uint8)


def convert_coco_object(
    coco_root: str | os.PathLike, out_root: str | os.PathLike | None = None, splits: tuple[str, ...] = ("val2017",)
) -> int:
    """Write out_root/annotations/<split>/<stem>_instanceTrainIds.png for every raw map; the count written.

    coco_root: a COCO-Stuff 164k root in mmseg's layout (images/<split>/*.jpg,
    annotations/<split>/<stem>.png raw maps, beside the *_labelTrainIds.png mmseg writes, which
    are skipped). out_root: default coco_root; otherwise out_root/images links to coco_root/images
    (a symbolic link: the photos are not copied), so out_root is a COCO-Object root.
    """
    coco_root = require(Path(coco_root), "COCO-Stuff root")
    out_root = coco_root if out_root is None else Path(out_root)
    count = 0
    for split in splits:
        src = require(coco_root / "annotations" / split, "annotation folder")
        maps = sorted(p for p in src.glob("*.png") if "TrainIds" not in p.name)
        if not maps:
            raise FileNotFoundError(f"no raw label maps (*.png without 'TrainIds') in {str(src)!r}")
        for path in maps:
            label = to_coco_object(load_label(path), repr(str(path)))
            save_label_png(out_root / "annotations" / split / f"{path.stem}{LABEL_SUFFIX}", label, grayscale=True)
            count += 1
    images = out_root / "images"
    if out_root.resolve() != coco_root.resolve() and not images.exists():
        images.symlink_to((coco_root / "images").resolve(), target_is_directory=True)
    return count


class COCOObjectDataset(SegDataset):
    """root/images/<split>2017/*.jpg and root/annotations/<split>2017/<stem>_instanceTrainIds.png
    (values 0..80, 0 = background), as written by convert_coco_object (scripts/convert_coco_object.py).

    split: "train" or "val" (or the folder name itself, "val2017").
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None):
        images, label_dir = coco_folders(root, split)
        if not any(label_dir.glob(f"*{LABEL_SUFFIX}")):
            raise FileNotFoundError(
                f"no COCO-Object labels (*{LABEL_SUFFIX}) in {str(label_dir)!r}: convert the COCO-Stuff "
                "maps first (scripts/convert_coco_object.py)"
            )
        items = [Item(p.stem, p, label_dir / f"{p.stem}{LABEL_SUFFIX}") for p in images]
        super().__init__(items, load_vocab("cocoobject81"), None, limit)
