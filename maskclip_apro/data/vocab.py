"""Class vocabularies: one class per line; a line may list synonyms "a, b, c"."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

BUILTIN_VOCABS = ("voc20", "voc21", "context59", "context60", "cocostuff171", "cocoobject81", "cityscapes19", "ade150")


def split_synonyms(line: str) -> list[str]:
    """The synonyms of one vocabulary line: "person, man" -> ["person", "man"]."""
    return [part.strip() for part in line.split(",") if part.strip()]


def primary_name(line: str) -> str:
    """The first synonym of a vocabulary line, used for display."""
    names = split_synonyms(line)
    return names[0] if names else line.strip()


def validate_vocab(names: list[str], source: str) -> list[str]:
    """Normalise whitespace; reject an empty list, empty entries and names (or synonyms) used twice."""
    cleaned = [" ".join(str(n).split()) for n in names]
    if not cleaned:
        raise ValueError(f"vocabulary {source} is empty: it needs at least one class name")
    blank = [i for i, n in enumerate(cleaned) if not split_synonyms(n)]
    if blank:
        raise ValueError(f"vocabulary {source} has empty class names at positions {blank}")
    seen: set[str] = set()
    duplicates: list[str] = []
    for line in cleaned:
        for name in dict.fromkeys(n.lower() for n in split_synonyms(line)):
            if name in seen and name not in duplicates:
                duplicates.append(name)
            seen.add(name)
    if duplicates:
        raise ValueError(f"vocabulary {source} has duplicate class names: {duplicates}")
    return cleaned


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file, less a byte order mark (Windows editors write one); FileNotFoundError
    or ValueError naming `what` and the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e})") from None


def read_vocab_file(path: str | os.PathLike) -> list[str]:
    """Read a vocabulary text file; blank lines are skipped."""
    text = read_text_file(path, "vocabulary file")
    lines = [line for line in text.splitlines() if line.strip()]
    return validate_vocab(lines, f"file {str(path)!r}")


def load_vocab(name_or_path: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a built-in vocabulary name, a text file path, or a list of names.

    Built-in: "voc20", "voc21" (background + 20), "context59", "context60"
    (background + 59), "cocostuff171". A sequence of names (list, tuple, OmegaConf
    ListConfig) is validated and returned cleaned.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return validate_vocab(list(name_or_path), "given as a list")
    key = os.fspath(name_or_path)
    if key in BUILTIN_VOCABS:
        resource = resources.files("maskclip_apro") / "vocab" / f"{key}.txt"
        with resources.as_file(resource) as path:
            return read_vocab_file(path)
    path = Path(key)
    if path.suffix == "" and not path.exists():
        raise ValueError(
            f"unknown vocabulary {key!r}: expected one of {list(BUILTIN_VOCABS)}, a text file path, or a list of names"
        )
    return read_vocab_file(path)


def is_background(line: str) -> bool:
    """Whether a vocabulary line names the background class."""
    return primary_name(line).lower() == "background"
