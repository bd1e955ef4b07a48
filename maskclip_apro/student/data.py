"""Deterministic training data: sample order and augmentation are functions of (seed, position).

Global batch b of step s holds positions s·B … s·B + B − 1. Position p is dataset item
perm_e[p mod N] with e = p div N and perm_e a permutation seeded by (seed, e); its crop is
augmented with a generator seeded by (seed, p). Process r of W takes the r-th contiguous slice of
B/W positions, split into `accum` micro-batches. So any world size, worker count or resume point
sees exactly the crops of an uninterrupted single-process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..constants import IGNORE_INDEX
from .augment import AugmentParams, augment, rng_for


def read_pseudo_label(folder: Path, name: str, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """The offline hard pseudo label `folder/<name>.png`, checked against the class range and size."""
    from ..data.io import load_label

    path = Path(folder) / f"{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label file {str(path)!r} for sample {name!r} does not exist (target.offline_dir)")
    label = load_label(path)
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"pseudo-label file {str(path)!r} holds value {int(label[bad].max())} outside the class range "
            f"[0, {num_classes}) (255 = ignore)"
        )
    if label.shape != tuple(size):
        raise ValueError(f"pseudo-label file {str(path)!r} has size {label.shape} but its image has size {tuple(size)}")
    return label


class TrainCrops(Dataset):
    """Item p: the augmented crop at global position p.

    Keys: image (3, c, c) in [0, 1], valid (c, c) (False on padding), position, and label (c, c)
    when there is one: with `offline_dir` the hard pseudo label, else, with `ignore_gt_void`, a
    mask label (0 = train here, 255 = the ground truth is void) - the official anno-free pipeline's
    ground truth with every class suppressed. With ignore_gt_void, pixels the ground truth marks
    255 are 255 in the label either way.
    """

    def __init__(
        self,
        dataset: Any,
        params: AugmentParams,
        seed: int,
        offline_dir: Optional[str] = None,
        num_classes: Optional[int] = None,
        ignore_gt_void: bool = False,
    ):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = dataset
        self.params = params
        self.seed = int(seed)
        self.offline_dir = Path(offline_dir) if offline_dir else None
        if self.offline_dir is not None and not self.offline_dir.is_dir():
            raise FileNotFoundError(f"target.offline_dir {str(self.offline_dir)!r} is not a folder")
        self.num_classes = num_classes
        self.ignore_gt_void = bool(ignore_gt_void)
        self._perm: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def index(self, position: int) -> int:
        """Dataset item shown at a global position (epoch-wise seeded permutation)."""
        n = len(self.dataset)
        epoch = position // n
        if self._perm[0] != epoch:
            g = rng_for(self.seed + 1_000_003, epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return int(self._perm[1][position % n])

    def __len__(self) -> int:
        return 2**62

    def label_of(self, sample: Any) -> Optional[np.ndarray]:
        """The map augmented with the image (see the class docstring), or None."""
        label = None
        if self.offline_dir is not None:
            label = read_pseudo_label(self.offline_dir, sample.name, self.num_classes, sample.image.shape[:2])
        if self.ignore_gt_void:
            if sample.label is None:
                raise ValueError(
                    f"target.ignore_gt_void is on but training sample {sample.name!r} has no ground truth; "
                    "set target.ignore_gt_void=false"
                )
            void = np.asarray(sample.label) == IGNORE_INDEX
            label = np.where(void, IGNORE_INDEX, 0 if label is None else label).astype(np.uint8)
        return label

    def __getitem__(self, position: int) -> Dict[str, torch.Tensor]:
        sample = self.dataset[self.index(position)]
        crop = augment(sample.image, self.label_of(sample), self.params, rng_for(self.seed, position))
        item = {"image": crop.image, "valid": crop.valid, "position": torch.tensor(position)}
        if crop.label is not None:
            item["label"] = crop.label
        return item


class StepBatches(Sampler[List[int]]):
    """Batch sampler: for steps start…stop−1, this rank's positions in `accum` micro-batches."""

    def __init__(self, start: int, stop: int, global_batch: int, rank: int, world: int, accum: int = 1):
        if global_batch % (world * accum) != 0:
            raise ValueError(
                f"batch_size {global_batch} must be divisible by world size {world} x accum {accum}"
            )
        self.start, self.stop = int(start), int(stop)
        self.global_batch, self.rank, self.world, self.accum = global_batch, rank, world, accum
        self.micro = global_batch // (world * accum)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        per_rank = self.global_batch // self.world
        for step in range(self.start, self.stop):
            base = step * self.global_batch + self.rank * per_rank
            for m in range(self.accum):
                yield list(range(base + m * self.micro, base + (m + 1) * self.micro))
