"""Class files of the SCLIP-family harness: one line per class id, synonyms separated by ", ".

Their reader (`get_cls_idx` in SCLIP's `clip_segmentor.py`, NACLIP's `naclip.py`) splits each
line on ", " and turns every synonym into its own text query; query i belongs to class
owner[i]. A class then scores the max over its queries (maskclip_apro.postprocess).

The format is the project's vocabulary format (data/vocab.py: one class per line, synonyms
"a, b, c"), with one difference: a class file may list a name under two classes. SCLIP's
COCO-Object file puts "bed" both in the background line and as class 60; the two queries get
identical scores and the argmax picks the first class, so that file never predicts "bed".
The vocabulary reader refuses such a file; this one keeps it, as the harness does.

Built-in class files (CLASS_FILES) are the methods' `configs/cls_*.txt`, named after the
project's datasets: "<dataset>_sclip" are SCLIP's and NACLIP's (identical in both
repositories, and ClearCLIP's and ProxyCLIP's too except for three datasets). ClearCLIP ships
plain VOC21 / VOC20 / COCO-Object files ("background", "person", "tvmonitor", no synonyms):
"<dataset>_clearclip"; ProxyCLIP uses ClearCLIP's VOC20 file and its own VOC21 / COCO-Object
files with a background synonym line: "<dataset>_proxyclip" (ProxyCLIP separates synonyms with
"; ", written here with ", "; its COCO-Object background line lists "bed" too).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .vocab import read_text_file

CLASS_FILES = (
    "voc21_sclip",
    "voc20_sclip",
    "context60_sclip",
    "context59_sclip",
    "cocoobject81_sclip",
    "cocostuff171_sclip",
    "cityscapes19_sclip",
    "ade150_sclip",
    "voc21_clearclip",
    "voc20_clearclip",
    "cocoobject81_clearclip",
    "voc21_proxyclip",
    "cocoobject81_proxyclip",
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
    if key in CLASS_FILES:
        with resources.as_file(resources.files("maskclip_apro") / "vocab" / f"{key}.txt") as path:
            return parse_class_lines(path.read_text(encoding="utf-8-sig"), repr(key))
    if not Path(key).is_file():
        raise FileNotFoundError(f"class file {key!r} is neither one of {list(CLASS_FILES)} nor an existing file")
    return parse_class_lines(read_text_file(key, "class file"), repr(key))


def class_queries(lines: list[str]) -> tuple[list[str], list[int]]:
    """(query names, owner class of each) in file order, as the harness's get_cls_idx builds them."""
    names: list[str] = []
    owner: list[int] = []
    for k, line in enumerate(lines):
        for name in line.split(","):
            names.append(name.strip())
            owner.append(k)
    return names, owner
