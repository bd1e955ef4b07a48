"""Key smoothing as MaskCLIP's official head does it (docs/refiners.md).

Official rule: keys k (N positions x C channels, the last block's keys through the attention's
output projection) are L2-normalised along the positions, i.e. each channel across the image
(`F.normalize(k)` on an (B, N, C) tensor); W = k^ k^T (no softmax); every position i whose
maximum probability is below `thresh` takes S_i = sum_j W_ij P_j, the others keep P_i, and the
argmax is taken on that mixture. `norm="channel"` normalises each key instead (the plain cosine
the paper's text describes).

S_i is not a probability (W has negative entries and rows of any sum), and refiners after KS need
one. Each smoothed position therefore takes a positive affine map of S_i,

    Q_i = (S_i - m_i) / sum_k (S_ik - m_i),   m_i = min(0, min_k S_ik),

(uniform where that sum is 0, i.e. S_i is constant and <= 0): nonnegative, summing to one, with
exactly the ranking of S_i, so the argmax per position is the official one (up to float rounding
of near-ties). A row of S_i with no negative entry is simply rescaled to sum to one.

The official comparison `max P_i < thresh` runs in float32: with thresh = 1.0 it leaves alone
exactly the positions whose softmax saturated to 1.0. The maximum is cast to float32 before the
comparison here too, so the selection does not depend on the working dtype. An image whose
probabilities are the same in every class and position (PD dropped every class) is left as it
is: its W P is constant across classes, and its argmax is class 0 as in the official code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..checks import check_map, check_pair, check_positive
from .base import Guidance

NORMS = ("position", "channel")


class KeySmoothing:
    """P (B, K, h, w) -> key-smoothed P (B, K, h, w); needs guidance.keys (B, C, h, w) on the same grid."""

    name = "ks"

    def __init__(self, thresh: float = 1.0, norm: str = "position") -> None:
        if norm not in NORMS:
            raise ValueError(f"ks norm must be one of {NORMS}, got {norm!r}")
        self.thresh = check_positive("ks thresh", thresh)
        self.norm = norm

    def weights(self, keys: torch.Tensor) -> torch.Tensor:
        """W (B, N, N) = k^ k^T from keys (B, C, N), normalised per `norm`."""
        unit = F.normalize(keys, dim=2 if self.norm == "position" else 1)
        return unit.transpose(1, 2) @ unit

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        return self.with_scores(probs, guidance)[0]

    def with_scores(
        self, probs: torch.Tensor, guidance: Guidance, scores: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Q, S): the smoothed probabilities, and the official head's output, the mixture of S_i
        (smoothed positions) and P_i (the others), which mmseg upsamples before the argmax
        (refiners/chain.py). The incoming `scores` are not read: the official KS starts from P."""
        check_map("probs", probs)
        keys = guidance.keys
        if keys is None:
            raise ValueError(
                "key smoothing needs guidance.keys (the last block's keys); this generator gave none: "
                "drop 'ks' from the refiner steps"
            )
        check_map("guidance.keys", keys)
        check_pair("probs", probs, "guidance.keys", keys)
        b, k, h, w = probs.shape
        p = probs.reshape(b, k, h * w)
        mixed = p @ self.weights(keys.reshape(b, keys.shape[1], h * w).to(p.dtype))  # column i: sum_j W_ij P_j
        shift = mixed.amin(dim=1, keepdim=True).clamp_max(0)
        smoothed = mixed - shift
        mass = smoothed.sum(dim=1, keepdim=True)
        smoothed = torch.where(mass > 0, smoothed / mass.clamp_min(torch.finfo(p.dtype).tiny), torch.full_like(p, 1.0 / k))
        # An image uniform in every class (PD dropped them all) has W P constant across classes:
        # keep it uniform, so its argmax is class 0 whatever the rounding of the product.
        uniform = (p == p[:, :1, :1]).flatten(1).all(dim=1)[:, None, None]
        selected = (p.amax(dim=1, keepdim=True).to(torch.float32) < self.thresh) & ~uniform
        return (torch.where(selected, smoothed, p).reshape(b, k, h, w),
                torch.where(selected, mixed, p).reshape(b, k, h, w))
