"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth 2020), the peer refiner (docs/refiners.md).

As in the original and in NACLIP/SCLIP: for each dilation d, the 8 neighbours at offsets
d * (dy, dx), dy, dx in {-1, 0, 1} (replicate padding at the borders). Per colour channel c,
the affinity of pixel i to neighbour j is -|I_ic - I_jc| / (eps + 0.1 * sigma_ic), sigma_ic the
(unbiased) standard deviation of the 3x3 windows of all dilations around i (centre counted
once per dilation); it is averaged over colour channels and soft-maxed over all 8 * len(dilations)
neighbours. Each iteration replaces P_i by sum_j a_ij P_j, a convex combination, so
probabilities keep summing to one.

Image: PAMR reads the raw image, `Guidance.image` in [0, 1]. NACLIP and SCLIP feed it their
CLIP-normalised input; dividing colour differences by the local standard deviation makes the
affinity invariant to any per-channel affine normalisation (up to eps = 1e-8), so the result is
the same.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..checks import check_int, check_map
from .base import Guidance

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
_EPS = 1e-8
_TEMPERATURE = 0.1


def _shift(x: torch.Tensor, pad: torch.Tensor, d: int, dy: int, dx: int) -> torch.Tensor:
    """x at offset d * (dy, dx), from `pad` = x replicate-padded by d."""
    h, w = x.shape[-2:]
    return pad[..., d + d * dy : d + d * dy + h, d + d * dx : d + d * dx + w]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Softmax affinities (B, 8 * len(dilations), H, W) of every pixel to its dilated neighbours."""
    window, logits = [], []
    for d in dilations:
        pad = F.pad(image, (d, d, d, d), mode="replicate")
        window.append(image)
        for dy, dx in _NEIGHBOURS:
            window.append(_shift(image, pad, d, dy, dx))
    sigma = torch.stack(window, 2).std(2)
    scale = _EPS + _TEMPERATURE * sigma
    for d in dilations:
        pad = F.pad(image, (d, d, d, d), mode="replicate")
        for dy, dx in _NEIGHBOURS:
            logits.append((-(image - _shift(image, pad, d, dy, dx)).abs() / scale).mean(1))
    return torch.softmax(torch.stack(logits, 1), 1)


def pamr(probs: torch.Tensor, image: torch.Tensor, dilations: Sequence[int], iters: int) -> torch.Tensor:
    """`iters` PAMR steps of probs (B, K, H, W) guided by image (B, C, H, W), same size."""
    aff = pamr_affinity(image, dilations)
    for _ in range(iters):
        out = torch.zeros_like(probs)
        n = 0
        for d in dilations:
            pad = F.pad(probs, (d, d, d, d), mode="replicate")
            for dy, dx in _NEIGHBOURS:
                out += aff[:, n : n + 1] * _shift(probs, pad, d, dy, dx)
                n += 1
        probs = out
    return probs


class PAMR:
    """Refiner: bilinear upsampling of P to the guidance image size, then PAMR (dtype of P kept)."""

    name = "pamr"

    def __init__(self, dilations: Sequence[int] = (8, 16), iters: int = 10) -> None:
        dilations = tuple(dilations)
        if not dilations:
            raise ValueError("pamr dilations must be a non-empty list of integers >= 1, got []")
        self.dilations = tuple(check_int("pamr dilations entries", d, 1) for d in dilations)
        self.iters = check_int("pamr iters", iters, 0)

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        check_map("probs", probs)
        image = check_map("guidance.image", guidance.image)
        if probs.shape[0] != image.shape[0]:
            raise ValueError(f"probs {tuple(probs.shape)} and guidance.image {tuple(image.shape)} differ in batch size")
        out_dtype = probs.dtype
        dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        image = image.to(device=probs.device, dtype=dtype)
        probs = probs.to(dtype)
        if probs.shape[-2:] != image.shape[-2:]:
            probs = F.interpolate(probs, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return pamr(probs, image, self.dilations, self.iters).to(out_dtype)
