"""Sample type and the file-backed dataset base shared by all readers."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..constants import IGNORE_INDEX
from .io import load_image, load_label
from .vocab import is_background


@dataclass(frozen=True)
class Sample:
    """One item: name (file stem, unique in its dataset), RGB uint8 (H, W, 3) image,
    label (H, W) of class indices with 255 = ignore, or None when there is no ground truth."""

    name: str
    image: np.ndarray
    label: np.ndarray | None


@dataclass(frozen=True)
class Source:
    """What one sample is made from, cheap to compute without decoding it: its name, and for its
    image and label either the file's identity (file_identity; `files` then names the file, whose
    content digest goes into result keys) or the generation parameters of an in-memory sample.
    Saved results are reused only while these match (pipeline.reuse)."""

    name: str
    image: str
    label: str | None
    files: Mapping[str, Path] = field(default_factory=dict)  # "image" / "label" -> the file


def file_identity(path: Path) -> str:
    """Device, inode, size, modification and status-change times (ns) of a file.

    Any rewrite changes it, even one that restores the size and the modification time
    (`cp --preserve=timestamps`, `rsync -t`): the status-change time cannot be set back.
    """
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


_DIGESTS: dict[tuple[str, str], str] = {}  # (path, file_identity) -> file_digest, this process's


def file_digest(path: Path, known: tuple[str, str] | None = None) -> tuple[str, str]:
    """(file_identity, digest of the bytes): the digest (BLAKE2b, 128 bits) is what result keys hold
    for input files.

    The file is read only when its identity is new to this process and differs from `known`, an
    (identity, digest) pair an earlier run recorded for it.
    """
    identity = file_identity(path)
    if known is not None and len(known) == 2 and known[0] == identity:
        return identity, str(known[1])
    cached = _DIGESTS.get((str(path), identity))
    if cached is None:
        cached = _DIGESTS[(str(path), identity)] = _hash_file(path)
    return identity, cached


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"blake2b:{h.hexdigest()}"


@dataclass(frozen=True)
class Item:
    """Where one sample lives on disk."""

    name: str
    image_path: Path
    label_path: Path | None


def reduce_zero_label_lut() -> np.ndarray:
    """Lookup table for mmseg's reduce_zero_label: 0 -> 255 (ignore), k -> k - 1, 255 stays."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut.astype(np.uint8)


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def require(path: Path, what: str) -> Path:
    """Return path, or raise FileNotFoundError naming it and what it should be."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {str(path)!r} does not exist")
    return path


def check_class_count(class_names: Sequence[str], source: str) -> None:
    """Label maps are 8-bit PNGs whose value 255 marks ignored pixels, so a run takes at most 255
    classes (indices 0-254); more is refused before anything runs."""
    if len(class_names) > IGNORE_INDEX:
        raise ValueError(
            f"{source} has {len(class_names)} classes; label maps hold at most {IGNORE_INDEX} (indices 0-"
            f"{IGNORE_INDEX - 1}; {IGNORE_INDEX} marks ignored pixels): split the vocabulary or merge classes"
        )


def check_items(items: list[Item]) -> None:
    """Fail early, naming the first missing file and how many are missing."""
    missing = [p for it in items for p in (it.image_path, it.label_path) if p is not None and not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed by the dataset are missing, first: {str(missing[0])!r}"
        )


def check_sample_id(sample_id: str, where: str) -> str:
    """A sample id becomes a file name (labels/<id>.png): refuse one that is not a plain name."""
    if not sample_id or sample_id in (".", "..") or any(c in sample_id for c in "/\\\0"):
        raise ValueError(
            f"{where}: sample id {sample_id!r} is not a plain file name (ids such as 2007_000032 "
            "contain no '/', '\\' or '..', and are not absolute paths)"
        )
    return sample_id


def read_split_file(path: Path) -> list[str]:
    """Sample ids, one per line, blank lines skipped; each must be a plain file name."""
    require(path, "split file")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    ids = [check_sample_id(line.strip(), f"split file {str(path)!r} line {n}") for n, line in enumerate(lines, 1)
           if line.strip()]
    if not ids:
        raise ValueError(f"split file {str(path)!r} lists no samples")
    return ids


class LabelledBy:
    """What every dataset tells about its classes: names, count, background, ignore index."""

    ignore_index: int = IGNORE_INDEX
    class_names: list[str]
    img_scale: tuple[int, int] | None = None  # standard keep-ratio scale [long, short] (maskclip_apro.geometry)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_background(self) -> bool:
        return is_background(self.class_names[0])


class SegDataset(LabelledBy):
    """Items on disk plus a vocabulary; __getitem__ reads and maps one sample.

    label_lut (256,) uint8 maps raw label values to class indices (e.g. reduce_zero_label).
    Files that are not used are listed in `skipped` as (path, why): files that share a name
    (both are left out: `dup.jpg` and `dup.png` would write one `labels/dup.png`; their paths are
    also in `name_clashes`) and, for folder readers, entries that are not images (list_images).
    """

    def __init__(
        self,
        items: list[Item],
        class_names: list[str],
        label_lut: np.ndarray | None = None,
        limit: int | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        check_limit(limit)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.name_clashes: set[str] = set()
        counts = Counter(it.name for it in items)
        for name in sorted(n for n, c in counts.items() if c > 1):
            same = [str(it.image_path) for it in items if it.name == name]
            self.name_clashes.update(same)
            for path in same:
                self.skipped.append((path, f"{len(same)} files share the name {name!r} ({', '.join(same)}); "
                                           "both are left out: rename one"))
        items = [it for it in items if counts[it.name] == 1]
        if not items:
            raise ValueError(f"{type(self).__name__} has no samples"
                             + (f"; {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""))
        self.items = items[:limit] if limit is not None else items
        check_items(self.items)
        self.class_names = list(class_names)
        self._lut = label_lut

    def __len__(self) -> int:
        return len(self.items)

    def _item(self, index: int) -> Item:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return self.items[index]

    def source(self, index: int) -> Source:
        """Name and file identities of sample `index` (no reading)."""
        item = self._item(index)
        files = {"image": item.image_path}
        label = None
        if item.label_path is not None:
            files["label"] = item.label_path
            label = file_identity(item.label_path)
        return Source(item.name, file_identity(item.image_path), label, files)

    def __getitem__(self, index: int) -> Sample:
        item = self._item(index)
        image = load_image(item.image_path)
        label = None
        if item.label_path is not None:
            label = load_label(item.label_path)
            if label.shape != image.shape[:2]:
                raise ValueError(
                    f"label {str(item.label_path)!r} has size {label.shape} but image "
                    f"{str(item.image_path)!r} has size {image.shape[:2]}"
                )
            label = self._classes_of(label, item.label_path)
        return Sample(item.name, image, label)

    def label(self, index: int) -> np.ndarray | None:
        """The label map of sample `index` (class indices, 255 = ignore) read without its image;
        None when the sample has none."""
        item = self._item(index)
        if item.label_path is None:
            return None
        return self._classes_of(load_label(item.label_path), item.label_path)

    def _classes_of(self, raw: np.ndarray, path: Path) -> np.ndarray:
        label = raw if self._lut is None else self._lut[self._as_uint8(raw, path)]
        self._check_classes(raw, label, path)
        return label

    def _check_classes(self, raw: np.ndarray, label: np.ndarray, path: Path) -> None:
        """Every label value must be a class index or the ignore index; name the file otherwise."""
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise ValueError(
                f"label file {str(path)!r} holds value(s) {shown} that are not classes of this dataset "
                f"({self.num_classes} classes, 0-{self.num_classes - 1}, ignore {self.ignore_index})"
            )

    @staticmethod
    def _as_uint8(label: np.ndarray, path: Path) -> np.ndarray:
        if label.dtype != np.uint8:
            if label.size and (label.min() < 0 or label.max() > 255):
                raise ValueError(f"label {str(path)!r} holds values outside [0, 255]")
            label = label.astype(np.uint8)
        return label
