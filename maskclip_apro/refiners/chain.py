"""Refiner chains: refiners applied in order, built from step names (refiners/registry.py) so that
configs and the compare table name methods as data. docs/refiners.md defines every refiner."""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

from .base import Guidance, Refiner
from .registry import build_refiner


class Chain:
    """Refiners applied in order; records the seconds each step took in `last_times`."""

    def __init__(self, refiners: Sequence[Refiner]) -> None:
        self.refiners = list(refiners)
        self.name = "+".join(r.name for r in self.refiners) or "none"
        self.last_times: dict[str, float] = {}

    @classmethod
    def from_steps(cls, steps: Sequence[str], params: Optional[Mapping[str, Any]] = None) -> "Chain":
        """The chain of `steps`, each built by registry.build_refiner from `params` (family -> kwargs)."""
        return cls([build_refiner(s, params) for s in steps])

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        return self.refine(probs, guidance)[0]

    def refine(
        self, probs: torch.Tensor, guidance: Guidance, scores: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(refined probabilities, label scores or None): the labels are the argmax of the label
        scores upsampled bilinearly, or of the probabilities when None. `scores` are the
        generator's logits (the scores without refiners). KS and PD pass on what MaskCLIP's
        official head outputs after them, which mmseg upsamples (step_with_scores); any other
        refiner ends them (None: its probabilities are what to upsample)."""
        self.last_times = {}
        for refiner in self.refiners:
            start = time.perf_counter()
            probs, scores = step_with_scores(refiner, probs, guidance, scores)
            self.last_times[refiner.name] = self.last_times.get(refiner.name, 0.0) + time.perf_counter() - start
        return probs, scores


def step_with_scores(
    refiner: Refiner, probs: torch.Tensor, guidance: Guidance, scores: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One refiner: its probabilities, and the label scores after it (None: its probabilities).

    MaskCLIP's head (chongzhou96/MaskCLIP mmseg/models/decode_heads/maskclip_head.py,
    refine_output) outputs the cosines with -100 on PD's dropped classes, and after KS the mixture
    S; encode_decode / whole_inference upsample that output, not renormalised probabilities.
    Refiners that know their official output (`with_scores`) give it; the others give None.
    """
    with_scores = getattr(refiner, "with_scores", None)
    if with_scores is None:
        return refiner(probs, guidance), None
    return with_scores(probs, guidance, scores)
