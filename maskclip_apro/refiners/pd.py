"""Prompt denoising (MaskCLIP, design 3.1): drop classes that are nowhere confident.

A class whose image-wide maximum probability is below `thresh` is removed: its probability is
zeroed and the others renormalised per position, which gives the same argmax as setting its
logits to -inf. The class with the largest image-wide maximum is always kept (so at least one
class survives when all fall below), and so are the indices in `keep` (e.g. a background
class whose probability is a constant, as with the generator's threshold background). Where
the kept classes carry no mass at all (underflowed softmax), the position becomes uniform
over the kept classes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..apro._checks import check_map
from .base import Guidance


class PromptDenoising:
    """P (B, K, h, w) -> P with the image-wide unconfident classes removed, per image."""

    name = "pd"

    def __init__(self, thresh: float = 0.5, keep: Sequence[int] = ()) -> None:
        if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 <= thresh <= 1:
            raise ValueError(f"thresh must be a number in [0, 1], got {thresh!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in keep):
            raise ValueError(f"keep must be a list of class indices >= 0, got {list(keep)!r}")
        self.thresh = float(thresh)
        self.keep = tuple(keep)

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        check_map("probs", probs)
        b, k = probs.shape[:2]
        if any(i >= k for i in self.keep):
            raise ValueError(f"keep {list(self.keep)} has indices outside the {k} classes of probs")
        peak = probs.reshape(b, k, -1).amax(dim=2)  # (B, K)
        kept = peak >= self.thresh
        kept[torch.arange(b, device=probs.device), peak.argmax(dim=1)] = True
        kept[:, list(self.keep)] = True
        mask = kept[:, :, None, None].to(probs.dtype)
        masked = probs * mask
        mass = masked.sum(dim=1, keepdim=True)
        uniform = mask / mask.sum(dim=1, keepdim=True)
        return torch.where(mass > 0, masked / mass.clamp_min(torch.finfo(probs.dtype).tiny), uniform)
