"""PAMR on raw logits, as the SCLIP-family harness applies it (SCLIP `forward_slide`, NACLIP `predict`).

There PAMR runs on the query-level cosine logits after they are resized to the original
image, before the softmax, guided by the CLIP-normalised input (the resized image the model
saw) resized bilinearly back to the original size. Their operator (`pamr.py`, from
Araslanov & Roth's 1-stage-wseg) is the one of maskclip_apro.refiners.pamr: replicate-padded
8-neighbourhoods per dilation, affinity -|I_i - I_j| / (1e-8 + 0.1 sigma_i) per channel
(sigma the unbiased std of the 3x3 dilated windows, centre once per dilation), averaged over
channels, soft-maxed over all neighbours; each iteration is a convex combination of neighbours.
Only the input differs: logits instead of probabilities, and the guide's scale (the normalised
image, not [0, 1]; the affinity is invariant to a per-channel affine map of the image except
through the 1e-8). Since the combination is linear per channel and the softmax is not, PAMR
on logits then softmax differs from softmax then PAMR.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .pamr import PAMR, pamr

HARNESS_DILATIONS = (8, 16)
HARNESS_ITERS = 10


def pamr_logits(
    logits: torch.Tensor,
    normalised_image: torch.Tensor,
    dilations: Sequence[int] = HARNESS_DILATIONS,
    iters: int = HARNESS_ITERS,
) -> torch.Tensor:
    """PAMR of logits (B, M, H, W) at the original size, guided by the normalised image (B, 3, h, w) resized to (H, W).

    Runs in float64 for float64 logits, else float32 (as the harness does), and returns the
    logits' dtype.
    """
    if logits.dim() != 4 or normalised_image.dim() != 4 or normalised_image.shape[1] != 3:
        raise ValueError(
            f"logits must be (B, M, H, W) and the image (B, 3, h, w), "
            f"got {tuple(logits.shape)} and {tuple(normalised_image.shape)}"
        )
    if logits.shape[0] != normalised_image.shape[0]:
        raise ValueError(f"logits and image differ in batch size: {logits.shape[0]} vs {normalised_image.shape[0]}")
    settings = PAMR(dilations, iters)  # validates both
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    guide = normalised_image.to(logits.device, dtype)
    if guide.shape[-2:] != logits.shape[-2:]:
        guide = F.interpolate(guide, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    return pamr(logits.to(dtype), guide, settings.dilations, settings.iters).to(logits.dtype)
