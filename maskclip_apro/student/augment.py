"""Training augmentation: random scale, random crop (padded when smaller), horizontal flip.

All randomness comes from a torch.Generator the caller seeds from (seed, sample position), so a
crop is the same whichever process, worker or resumed run draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


@dataclass
class AugmentParams:
    """crop: output size; base_size: short side before scaling (None = crop); scale: ratio range."""

    crop: int
    base_size: Optional[int] = None
    scale: Tuple[float, float] = (0.5, 2.0)
    flip: bool = True

    def __post_init__(self) -> None:
        if int(self.crop) < 8:
            raise ValueError(f"crop must be >= 8 pixels, got {self.crop}")
        lo, hi = (float(v) for v in self.scale)
        if not 0 < lo <= hi:
            raise ValueError(f"augment.scale must be [min, max] with 0 < min <= max, got {list(self.scale)}")
        self.scale = (lo, hi)


def rng_for(seed: int, position: int) -> torch.Generator:
    """A generator seeded from (seed, position): the per-sample randomness of the run."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 0x9E3779B1 + int(position) * 0x85EBCA77 + 1) % (2**63))
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def augment(
    image: np.ndarray, label: Optional[np.ndarray], params: AugmentParams, g: torch.Generator
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """uint8 (H, W, 3) [+ label (H, W)] -> image (3, c, c) in [0, 1], label (c, c) int64, valid (c, c).

    Padding (when the scaled image is smaller than the crop) is black, label 255, valid False.
    """
    c = int(params.crop)
    h, w = image.shape[:2]
    base = params.base_size or c
    ratio = _uniform(g, *params.scale) * base / min(h, w)
    nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=ratio < 1).clamp_(0, 1)[0]
    y = None
    if label is not None:
        y = torch.from_numpy(np.asarray(label).astype(np.int64))[None, None].float()
        y = F.interpolate(y, size=(nh, nw), mode="nearest")[0, 0].long()
    top = int(torch.randint(0, max(nh - c, 0) + 1, (), generator=g))
    left = int(torch.randint(0, max(nw - c, 0) + 1, (), generator=g))
    flip = params.flip and bool(torch.rand((), generator=g) < 0.5)
    x = x[:, top : top + c, left : left + c]
    ch, cw = x.shape[-2:]
    out = torch.zeros(3, c, c)
    out[:, :ch, :cw] = x
    valid = torch.zeros(c, c, dtype=torch.bool)
    valid[:ch, :cw] = True
    out_label = None
    if y is not None:
        out_label = torch.full((c, c), IGNORE, dtype=torch.long)
        out_label[:ch, :cw] = y[top : top + c, left : left + c]
    if flip:
        out, valid = out.flip(-1), valid.flip(-1)
        out_label = out_label.flip(-1) if out_label is not None else None
    return out, out_label, valid
