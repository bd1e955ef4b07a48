"""Key smoothing (MaskCLIP, design 3.1): probabilities averaged over positions with similar keys.

    Q_i = sum_j W_ij P_j,   W_ij = cos(k_i, k_j)   (no softmax; every position j of the image)

applied only where max_k P_i < thresh (1.0, MaskCLIP's value: every position that is not
already certain). MaskCLIP's code stops there (its argmax does not need normalised rows) and,
a quirk, normalises its keys over positions instead of channels; here W uses the true cosine.
So that the output is again a probability per position, rows are renormalised:
    Q_i <- max(Q_i, 0) / sum_k max(Q_ik, 0)
(cosines can be negative); a position with no positive mass keeps P_i. Whenever some Q_ik > 0
this leaves MaskCLIP's argmax unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..apro._checks import check_map, check_pair, check_positive
from .base import Guidance


class KeySmoothing:
    """P (B, K, h, w) -> key-smoothed P (B, K, h, w); needs guidance.keys (B, C, h, w) (ViT models)."""

    name = "ks"

    def __init__(self, thresh: float = 1.0) -> None:
        self.thresh = check_positive("thresh", thresh)

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        check_map("probs", probs)
        keys = guidance.keys
        if keys is None:
            raise ValueError(
                "key smoothing needs guidance.keys (the last ViT block's keys); this generator gave none "
                "(ResNet models have no keys): drop 'ks' from the refiner steps"
            )
        check_map("guidance.keys", keys)
        check_pair("probs", probs, "guidance.keys", keys)
        b, k, h, w = probs.shape
        p = probs.reshape(b, k, h * w)
        unit = F.normalize(keys.reshape(b, keys.shape[1], h * w).to(p.dtype), dim=1)
        weight = unit.transpose(1, 2) @ unit  # (B, N, N), symmetric
        smoothed = (p @ weight).clamp_min_(0)  # column i: sum_j W_ij P_j
        mass = smoothed.sum(dim=1, keepdim=True)
        smoothed = torch.where(mass > 0, smoothed / mass.clamp_min(torch.finfo(p.dtype).tiny), p)
        selected = p.amax(dim=1, keepdim=True) < self.thresh
        return torch.where(selected, smoothed, p).reshape(b, k, h, w)
