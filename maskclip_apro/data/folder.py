"""Custom data: images with label PNGs and a class file, or images alone."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .base import Item, SegDataset, require
from .vocab import load_vocab

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Vocab = str | os.PathLike | Sequence[str]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in folder (by suffix, case-insensitive), sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return files


class FolderDataset(SegDataset):
    """root/images/<stem>.<ext> with root/labels/<stem>.png (class indices, 255 = ignore).

    classes: a vocabulary name, a class file, or a list; default root/classes.txt.
    The dataset has a background class when the first class is named "background".
    """

    def __init__(self, root: str | Path, classes: Vocab | None = None, limit: int | None = None):
        root = require(Path(root), "dataset root")
        image_dir = require(root / "images", "image folder")
        label_dir = require(root / "labels", "label folder")
        if classes is None:
            classes = require(root / "classes.txt", "class file")
        items = [Item(p.stem, p, label_dir / f"{p.stem}.png") for p in list_images(image_dir)]
        super().__init__(items, load_vocab(classes), None, limit)


class ImagesDataset(SegDataset):
    """Images without labels: a folder of image files (not recursive), one image file, or a list of files.

    classes: the vocabulary to segment with (name, file or list); default "voc21".
    """

    def __init__(
        self, root: str | Path | Sequence[str | Path], classes: Vocab = "voc21", limit: int | None = None
    ):
        if isinstance(root, (str, os.PathLike)):
            root = require(Path(root), "image folder or file")
            paths = list_images(root) if root.is_dir() else [root]
        else:
            paths = [require(Path(p), "image file") for p in root]
        items = [Item(p.stem, p, None) for p in paths]
        super().__init__(items, load_vocab(classes), None, limit)
