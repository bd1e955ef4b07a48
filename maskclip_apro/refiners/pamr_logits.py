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

As a chain step (`PAMRLogits`, step "pamr_logits") it takes probabilities like every refiner.
PAMR mixes each position's neighbours with the same weights in every channel, and so does a
bilinear resize; both therefore commute with adding a per-position constant. For
p = softmax(s z), log p = s z - logsumexp(s z), so

    softmax(PAMR(up(log p))) = softmax(s PAMR(up(z)))

exactly: the step gives the harness's PAMR on logits from the probabilities alone, whatever
steps ran before it. The one loss is the floating-point floor of p: a probability below the
smallest normal number (about 1e-38 in float32) is read as that number, which changes the
result only where some query trails the best one by more than 87 / s in cosine at a
neighbouring pixel (1.3 at the harness's largest scale, 65; CLIP's patch-text cosines span far
less). Each position is shifted by its largest log-probability first, so the logs that PAMR
averages are no larger in magnitude than s times the cosine spread.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Guidance
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


class PAMRLogits:
    """Refiner: P (B, M, h, w) -> softmax(PAMR(log P upsampled to the guidance image)) (module doc).

    Guided by guidance.image (PAMR's affinity does not depend on a per-channel affine
    normalisation of the image, up to its 1e-8). Under the SCLIP-family harness the
    probabilities arrive at the image size and guidance.image is the resized input the model saw,
    brought back to that size: this step is then their PAMR on the logits.
    """

    name = "pamr_logits"

    def __init__(self, dilations: Sequence[int] = HARNESS_DILATIONS, iters: int = HARNESS_ITERS) -> None:
        settings = PAMR(dilations, iters)  # validates both
        self.dilations, self.iters = settings.dilations, settings.iters

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        if probs.dim() != 4 or not probs.is_floating_point():
            raise ValueError(f"probs must be a floating-point (B, M, h, w) tensor, got {tuple(probs.shape)}")
        image = guidance.image
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != probs.shape[0]:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"guidance.image must be (B={probs.shape[0]}, 3, H, W), got {shape}")
        dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
        logp = torch.log(probs.to(dtype).clamp_min(torch.finfo(dtype).tiny))
        logp = logp - logp.amax(dim=1, keepdim=True)
        size = tuple(image.shape[-2:])
        if tuple(logp.shape[-2:]) != size:
            logp = F.interpolate(logp, size=size, mode="bilinear", align_corners=False)
        out = pamr(logp, image.to(logp.device, dtype), self.dilations, self.iters)
        return torch.softmax(out, dim=1).to(probs.dtype)
