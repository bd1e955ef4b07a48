"""Pascal Context (mmseg layout under VOCdevkit/VOC2010)."""

from __future__ import annotations

from pathlib import Path

from .base import SegDataset, reduce_zero_label_lut
from .voc import devkit_items, find_devkit_year
from .vocab import load_vocab


class PascalContextDataset(SegDataset):
    """VOC2010: JPEGImages/*.jpg, SegmentationClassContext/*.png (0 = background, 1..59),
    ImageSets/SegmentationContext/<split>.txt, as written by mmseg's converter.

    num_classes=60 keeps background as class 0; 59 maps 0 to 255 (ignore) and shifts the
    rest down by one (mmseg reduce_zero_label).
    """

    def __init__(self, root: str | Path, split: str = "val", num_classes: int = 59, limit: int | None = None):
        if num_classes not in (59, 60):
            raise ValueError(f"Pascal Context num_classes must be 59 or 60, got {num_classes}")
        base = find_devkit_year(root, "VOC2010")
        split_file = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        items = devkit_items(base, "SegmentationClassContext", split_file)
        lut = reduce_zero_label_lut() if num_classes == 59 else None
        super().__init__(items, load_vocab(f"context{num_classes}"), lut, limit)
