"""build_dataset: one entry point from a name (and the Hydra dataset group) to a dataset."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..geometry import check_img_scale
from .ade import ADE20KDataset
from .cityscapes import CityscapesDataset
from .cocoobject import COCOObjectDataset
from .cocostuff import COCOStuffDataset
from .context import PascalContextDataset
from .folder import FolderDataset, ImagesDataset
from .synthetic import SyntheticDataset
from .voc import VOCDataset

_BUILDERS: dict[str, Callable[..., Any]] = {
    "voc21": lambda root, split, **kw: VOCDataset(root, split or "val", background=True, **kw),
    "voc20": lambda root, split, **kw: VOCDataset(root, split or "val", background=False, **kw),
    "context59": lambda root, split, **kw: PascalContextDataset(root, split or "val", num_classes=59, **kw),
    "context60": lambda root, split, **kw: PascalContextDataset(root, split or "val", num_classes=60, **kw),
    "cocostuff171": lambda root, split, **kw: COCOStuffDataset(root, split or "val", **kw),
    "cocoobject81": lambda root, split, **kw: COCOObjectDataset(root, split or "val", **kw),
    "cityscapes19": lambda root, split, **kw: CityscapesDataset(root, split or "val", **kw),
    "ade150": lambda root, split, **kw: ADE20KDataset(root, split or "val", **kw),
    "folder": lambda root, split, **kw: FolderDataset(root, split=split, **kw),
    "images": lambda root, split, **kw: ImagesDataset(root, **kw),
}
_EXTRA_KWARGS: dict[str, tuple[str, ...]] = {
    "synthetic": tuple(p for p in inspect.signature(SyntheticDataset).parameters if p != "split"),
    "voc21": ("label_dir", "limit"),
    "voc20": ("label_dir", "limit"),
    "folder": ("classes", "image_dir", "label_dir", "limit"),
    "images": ("classes", "limit"),
}
DATASET_NAMES = ("synthetic", *_BUILDERS)


def build_dataset(
    name: str, root: str | Path | list | None = None, split: str | None = None, img_scale: Any = None, **kwargs: Any
):
    """A dataset by name: synthetic, voc21, voc20, context59, context60, cocostuff171,
    cocoobject81, cityscapes19, ade150, folder (images + label PNGs + class file, including
    VOC-style exports such as labelme's) or images (a folder, one image or a list of image
    files; no labels).

    split: None gives each dataset's default ("val"; every image for folder, which also uses
    every image when it has no ImageSets folder); images ignores it. kwargs: limit (first N
    samples) for all; label_dir for voc21/voc20; classes, image_dir and label_dir for folder;
    classes for images; num_images, size, seed, ignore_boundary for synthetic. img_scale: the
    dataset's standard keep-ratio scale [long, short] (see maskclip_apro.geometry), or None.
    Returns an object with len(), [i] -> Sample, class_names, num_classes, ignore_index,
    has_background and img_scale.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASET_NAMES)}")
    allowed = _EXTRA_KWARGS.get(name, ("limit",))
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"dataset {name!r} does not take {unknown}; it takes root, split and {list(allowed)}")
    scale = None if img_scale is None else check_img_scale(img_scale, "dataset.img_scale")
    if name == "synthetic":
        if root is not None:
            raise ValueError(f"dataset 'synthetic' is generated in memory and takes no root, got {root!r}")
        dataset = SyntheticDataset(split=split or "val", **kwargs)
    elif root is None or str(root) == "":
        raise ValueError(f"dataset {name!r} needs a root path (dataset.root=...)")
    else:
        dataset = _BUILDERS[name](root, split, **kwargs)
    dataset.img_scale = scale
    return dataset
