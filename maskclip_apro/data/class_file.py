"""Class files of the SCLIP-family harness: one line per class id, synonyms separated by ", ".

Their reader (`get_cls_idx` in SCLIP's `clip_segmentor.py`, NACLIP's `naclip.py`) splits each
line on ", " and turns every synonym into its own text query; query i belongs to class
owner[i]. A class then scores the max over its queries (maskclip_apro.postprocess).

The format is the project's vocabulary format (data/vocab.py: one class per line, synonyms
"a, b, c"), with one difference: a class file may list a name under two classes. SCLIP's
COCO-Object file puts "bed" both in the background line and as class 60; the two queries get
identical scores and the argmax picks the first class, so that file never predicts "bed".
The vocabulary reader refuses such a file; this one keeps it, as the harness does.

Built-in class files are the SCLIP / NACLIP `configs/cls_*.txt` (identical in both
repositories), named after the project's datasets with a "_sclip" suffix (SCLIP_CLASS_FILES).
ClearCLIP and ProxyCLIP ship other VOC21 / VOC20 / COCO-Object files (plain "background" /
"person" / "tvmonitor" lines; ProxyCLIP also separates synonyms with "; ").
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

SCLIP_CLASS_FILES = (
    "voc21_sclip",
    "voc20_sclip",
    "context60_sclip",
    "context59_sclip",
    "cocoobject81_sclip",
    "cocostuff171_sclip",
    "cityscapes19_sclip",
    "ade150_sclip",
)


def parse_class_lines(text: str, source: str) -> list[str]:
    """Class lines of a class file's text (a final newline is allowed); ValueError on an empty class or name."""
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"class file {source} is empty")
    for i, line in enumerate(lines):
        if not all(name.strip() for name in line.split(",")):
            raise ValueError(f"class file {source}: class {i} ({line!r}) has an empty name")
    return [", ".join(name.strip() for name in line.split(",")) for line in lines]


def read_class_file(name_or_path: str | os.PathLike) -> list[str]:
    """Class lines (one per class id, synonyms joined by ", ") of a built-in class file or a file path."""
    key = os.fspath(name_or_path)
    if key in SCLIP_CLASS_FILES:
        with resources.as_file(resources.files("maskclip_apro") / "vocab" / f"{key}.txt") as path:
            return parse_class_lines(path.read_text(encoding="utf-8"), repr(key))
    path = Path(key)
    if not path.is_file():
        raise FileNotFoundError(f"class file {key!r} is neither one of {list(SCLIP_CLASS_FILES)} nor an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"class file {key!r} is not UTF-8 text ({e})") from None
    return parse_class_lines(text, repr(key))


def class_queries(lines: list[str]) -> tuple[list[str], list[int]]:
    """(query names, owner class of each) in file order, as the harness's get_cls_idx builds them."""
    names: list[str] = []
    owner: list[int] = []
    for k, line in enumerate(lines):
        for name in line.split(","):
            names.append(name.strip())
            owner.append(k)
    return names, owner
