"""The refiner interface: probabilities plus guidance in, probabilities out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass
class Guidance:
    """What a refiner may look at besides the probabilities.

    image: (B, 3, H, W) float in [0, 1], the (resized) input image.
    keys: (B, C, h, w) last-block keys on the patch grid (ViT only), for key smoothing.
    features: (B, D, h, w) dense CLIP features on the patch grid, for a second GP pass.
    """

    image: torch.Tensor
    keys: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None


class Refiner(Protocol):
    """Maps probabilities P (B, K, h, w) to refined probabilities (B, K, H', W').

    A refiner may change the spatial size (APro works at the guidance resolution); callers
    resize the result to the size they need. Refiners know nothing of datasets.
    """

    name: str

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor: ...
