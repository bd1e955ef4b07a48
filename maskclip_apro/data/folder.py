"""Custom data: images with label PNGs and a class file (including VOC-style exports such as
labelme's), or images alone."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from .base import Item, SegDataset, read_split_file, require
from .vocab import load_vocab

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_DIRS = ("images", "JPEGImages")
LABEL_DIRS = ("labels", "SegmentationClassPNG", "SegmentationClass")
CLASS_FILES = ("classes.txt", "class_names.txt")
SPLIT_DIR = Path("ImageSets") / "Segmentation"

Vocab = str | os.PathLike | Sequence[str]


def is_hidden(path: Path) -> bool:
    """Dot files: macOS resource forks (._photo.png), .DS_Store, editors' temporaries."""
    return path.name.startswith(".")


def list_images(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files directly in folder (by suffix, case-insensitive, hidden files skipped), sorted by
    name, and the other entries that were left out with why: files of other types (.gif, .txt),
    broken symbolic links and symbolic link loops (sub-folders and hidden files are not listed)."""
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if is_hidden(p):
            continue
        try:
            p.stat()
        except OSError as error:
            why = "a symbolic link loop" if error.errno == errno.ELOOP else "a broken symbolic link"
            skipped.append((str(p), f"{why}; not read"))
            continue
        if p.is_dir():
            continue
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            skipped.append((str(p), f"not an image type read here ({', '.join(IMAGE_SUFFIXES)})"))
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return files, skipped


def _find_folder(root: Path, given: str | None, candidates: Sequence[str], what: str, key: str,
                 holding: str | None = None) -> Path:
    """root/given, else the first candidate folder that exists, preferring one holding `holding` files."""
    if given is not None:
        return require(root / given, what)
    existing = [root / c for c in candidates if (root / c).is_dir()]
    if not existing:
        looked = ", ".join(repr(str(root / c)) for c in candidates)
        raise FileNotFoundError(f"{what} not found: looked for {looked}; name it with {key}=...")
    if holding is not None:
        existing = [d for d in existing if any(p.suffix.lower() == holding for p in d.iterdir())] or existing
    return existing[0]


def folder_classes(root: Path, classes: Vocab | None) -> list[str]:
    """The vocabulary: `classes`, else root/classes.txt or root/class_names.txt.

    labelme writes its background class as "_background_"; it becomes "background".
    """
    if classes is None:
        found = [root / name for name in CLASS_FILES if (root / name).is_file()]
        if not found:
            looked = ", ".join(repr(str(root / name)) for name in CLASS_FILES)
            raise FileNotFoundError(f"class file not found: looked for {looked}; or pass classes=...")
        classes = found[0]
    names = load_vocab(classes)
    if "_background_" in names:
        names = load_vocab(["background" if n == "_background_" else n for n in names])
    return names


class FolderDataset(SegDataset):
    """Images with label PNGs (class indices, 255 = ignore) and a class file.

    Layouts read as they are: root/images + root/labels + root/classes.txt, and VOC-style
    exports such as labelme's labelme2voc.py (root/JPEGImages, root/SegmentationClassPNG,
    root/class_names.txt). image_dir / label_dir name the folders when they are called otherwise
    (label folders are tried in the order labels, SegmentationClassPNG, SegmentationClass, the
    first holding PNG files). classes: a vocabulary name, a class file or a list; default the
    class file in root. split: a name reads the ids in root/ImageSets/Segmentation/<split>.txt
    when that folder exists; None, or a folder without ImageSets, uses every image. The dataset has a background class when the first
    class is named "background".
    """

    def __init__(
        self,
        root: str | Path,
        classes: Vocab | None = None,
        split: str | None = None,
        image_dir: str | None = None,
        label_dir: str | None = None,
        limit: int | None = None,
    ):
        root = require(Path(root), "dataset root")
        images = _find_folder(root, image_dir, IMAGE_DIRS, "image folder", "image_dir")
        labels = _find_folder(root, label_dir, LABEL_DIRS, "label folder", "label_dir", holding=".png")
        class_names = folder_classes(root, classes)
        paths, skipped = list_images(images)
        if split is not None and (root / SPLIT_DIR).is_dir():
            by_stem = {p.stem: p for p in paths}
            split_file = root / SPLIT_DIR / f"{split}.txt"
            ids = read_split_file(split_file)
            missing = [i for i in ids if i not in by_stem]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} id(s) of split file {str(split_file)!r} have no image in {str(images)!r}, "
                    f"first: {missing[0]!r}"
                )
            paths = [by_stem[i] for i in ids]
        items = [Item(p.stem, p, labels / f"{p.stem}.png") for p in paths]
        super().__init__(items, class_names, None, limit, skipped)


class ImagesDataset(SegDataset):
    """Images without labels: a folder of image files (not recursive), one image file, or a list of files.

    classes: the vocabulary to segment with (name, file or list); default "voc21".
    """

    def __init__(
        self, root: str | Path | Sequence[str | Path], classes: Vocab = "voc21", limit: int | None = None
    ):
        if isinstance(root, (str, os.PathLike)):
            root = require(Path(root), "image folder or file")
            paths, skipped = list_images(root) if root.is_dir() else ([root], [])
        else:
            paths, skipped = [require(Path(p), "image file") for p in root], []
        items = [Item(p.stem, p, None) for p in paths]
        super().__init__(items, load_vocab(classes), None, limit, skipped)
