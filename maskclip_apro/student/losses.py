"""Student losses: cross-entropy on hard pseudo labels plus APro's weighted L1 terms on soft targets.

Both terms are returned as SUMS over pixels; the trainer divides by pixel counts taken over the
whole global batch (all processes, all micro-batches), so that a step's gradient is the same
however the batch is split across processes. The cross-entropy is divided as mmseg 0.20 divides it
(what MaskCLIP+ trains with): by every crop pixel, ignored ones included, unless
`loss.avg_non_ignore` asks for the labelled pixels only; the L1 terms are always divided by the
supervised pixels, as APro divides by the box region (docs/student.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX


@dataclass
class LossSums:
    """ce: summed cross-entropy over labelled pixels; l1: weighted summed L1 over masked pixels and targets."""

    ce: torch.Tensor
    l1: torch.Tensor


def l1_sum(
    probs: torch.Tensor, targets: Sequence[torch.Tensor], weights: Sequence[float], mask: torch.Tensor
) -> torch.Tensor:
    """Σ_t w_t Σ_masked pixels Σ_k |p_k − y_t,k| for probabilities (B, K, H, W) and mask (B, H, W)."""
    if len(weights) != len(targets):
        raise ValueError(f"{len(targets)} soft targets but {len(weights)} weights")
    total = probs.new_zeros(())
    for y, w in zip(targets, weights):
        if y.shape != probs.shape:
            raise ValueError(f"soft target shape {tuple(y.shape)} does not match student output {tuple(probs.shape)}")
        total = total + float(w) * ((probs - y).abs().sum(dim=1) * mask).sum()
    return total


def loss_sums(
    logits: torch.Tensor,
    hard: torch.Tensor,
    soft: Sequence[torch.Tensor],
    weights: Sequence[float],
    mask: torch.Tensor,
) -> LossSums:
    """Summed CE (ignore 255) of logits (B, K, H, W) vs hard (B, H, W), and the weighted summed L1 of
    their softmax vs the soft targets over the masked pixels."""
    logits = logits.float()
    ce = F.cross_entropy(logits, hard, ignore_index=IGNORE_INDEX, reduction="sum")
    l1 = l1_sum(torch.softmax(logits, dim=1), soft, weights, mask.to(logits.dtype)) if soft else logits.new_zeros(())
    return LossSums(ce=ce, l1=l1)


def combine(sums: LossSums, ce_pixels: float, num_masked: float, ce_weight: float) -> torch.Tensor:
    """ce_weight · CE sum / ce_pixels + weighted L1 sum / num_masked (global pixel counts): ce_pixels
    is every crop pixel (mmseg 0.20) or the labelled ones (`loss.avg_non_ignore`)."""
    return ce_weight * sums.ce / max(ce_pixels, 1.0) + sums.l1 / max(num_masked, 1.0)
