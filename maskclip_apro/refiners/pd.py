"""Prompt denoising as MaskCLIP's official head does it (docs/refiners.md).

Official rule, on cosine scores c: with P = softmax(100 c), every class whose image-wide maximum
probability is below `thresh` gets c = -100. On probabilities this is exact: the dropped classes'
probability becomes 0 (softmax(100 c) with c = -100 underflows to 0 in float32 and float64) and
the kept ones are renormalised per position. When every class falls below the threshold every
score is -100, so the official softmax is uniform and the argmax falls to class 0; here too every
class becomes 1/K. There is no "keep the best class" exception.

`keep` lists classes that are never dropped. It exists for the generator's threshold background
(class 0 has the constant probability t / (1 + t), below 0.5 for t <= 1, so PD would always drop
it); the official head has no such rule and leaves `keep` empty.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..checks import check_int, check_map, check_range
from .base import Guidance


class PromptDenoising:
    """P (B, K, h, w) -> P with the classes that are nowhere confident removed, per image."""

    name = "pd"

    def __init__(self, thresh: float = 0.5, keep: Sequence[int] = ()) -> None:
        self.thresh = check_range("pd thresh", thresh, 0, 1)
        self.keep = tuple(check_int("pd keep entries (class indices)", i, 0) for i in keep)

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        return self.with_scores(probs, guidance)[0]

    def with_scores(
        self, probs: torch.Tensor, guidance: Guidance, scores: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(P', scores'): the denoised probabilities, and the incoming scores (the generator's
        logits, s * cos) with every dropped class set to one constant below all of them, the
        official -100 on cosines, which mmseg upsamples before the argmax (refiners/chain.py). A
        class constant over the image and below every kept score never wins, so the labels do not
        depend on the constant. None when no scores come in."""
        check_map("probs", probs)
        b, k = probs.shape[:2]
        if any(i >= k for i in self.keep):
            raise ValueError(f"pd keep {list(self.keep)} has indices outside the {k} classes of probs")
        kept = probs.reshape(b, k, -1).amax(dim=2) >= self.thresh  # (B, K)
        kept[:, list(self.keep)] = True
        none_kept = ~kept.any(dim=1)
        kept[none_kept] = True  # every class dropped: every score -100, a uniform softmax (below)
        mask = kept[:, :, None, None].to(probs.dtype)
        masked = torch.where(none_kept[:, None, None, None], torch.ones_like(probs), probs * mask)
        mass = masked.sum(dim=1, keepdim=True)
        # A position where every kept class underflowed to 0 has lost its ranking; it becomes
        # uniform over the kept classes (the official scores would still rank them).
        uniform = mask / mask.sum(dim=1, keepdim=True)
        out = torch.where(mass > 0, masked / mass.clamp_min(torch.finfo(probs.dtype).tiny), uniform)
        if scores is None:
            return out, None
        dropped = ~kept | none_kept[:, None]
        floor = min(-100.0, float(scores.min()) - 1.0)
        return out, scores.masked_fill(dropped[:, :, None, None], floor)
