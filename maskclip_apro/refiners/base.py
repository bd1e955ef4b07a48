"""The refiner interface: probabilities plus guidance in, probabilities out (docs/refiners.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from ..constants import IMAGENET_MEAN, IMAGENET_STD


def imagenet_normalize(image: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per RGB channel of a (B, 3, H, W) image in [0, 1]."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"guidance.image must be a (B, 3, H, W) RGB tensor, got {shape}")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=image.device).view(1, 3, 1, 1)
    return (image.to(dtype) - mean) / std


@dataclass
class Guidance:
    """What a refiner may look at besides the probabilities.

    image: (B, 3, H, W) RGB in [0, 1]. What the Segmenter passes (Segmenter.probabilities and
        harness_probabilities): under MaskCLIP's protocols the image it was given, at its own
        resolution (not the generator's resized copy); under the SCLIP-family harness the
        resized image the model saw, brought back bilinearly to the input's size (what the
        harness's PAMR reads). The student's teacher passes the training crop. PAMR and
        PAMRLogits read it; APro reads its normalised form.
    keys: (B, C, h, w) last-block keys on the probabilities' patch grid, for key smoothing.
    features: (B, D, h, w) dense CLIP features on the patch grid, for GP's second pass "features".
    normalized: (B, 3, H, W) the same image ImageNet-normalised, (image - mean) / std; APro reads
        it (its zetas are in these units). Derived from `image` when not given.
    grid: (h, w) the patch grid the probabilities were computed on, when they reach the refiners
        at a finer resolution (the SCLIP-family harness hands over maps at the image size); APro's
        resolutions are relative to it. None: the probabilities' own grid.
    windows: the harness's per-window scores and VFM features (lposs.WindowScores), for LPOSS.
    """

    image: torch.Tensor
    keys: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    normalized: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None
    windows: Optional[Any] = None

    def normalized_image(self) -> torch.Tensor:
        """The ImageNet-normalised image: `normalized` when given, else computed from `image` once."""
        if self.normalized is None:
            self.normalized = imagenet_normalize(self.image)
        elif not isinstance(self.normalized, torch.Tensor) or tuple(self.normalized.shape) != tuple(self.image.shape):
            shape = tuple(self.normalized.shape) if isinstance(self.normalized, torch.Tensor) else self.normalized
            raise ValueError(
                f"guidance.normalized {shape} must have the shape of guidance.image {tuple(self.image.shape)}"
            )
        return self.normalized


class Refiner(Protocol):
    """Maps probabilities P (B, K, h, w) to refined probabilities (B, K, H', W').

    A refiner may change the spatial size (APro works at the guidance resolution); callers
    resize the result to the size they need. Refiners know nothing of datasets.
    """

    name: str

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor: ...
