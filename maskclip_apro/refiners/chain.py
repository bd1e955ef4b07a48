"""Refiner chains: refiners applied in order, built from step names (refiners/registry.py) so that
configs and the compare table name methods as data. docs/refiners.md defines every refiner."""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

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
        self.last_times = {}
        for refiner in self.refiners:
            start = time.perf_counter()
            probs = refiner(probs, guidance)
            self.last_times[refiner.name] = self.last_times.get(refiner.name, 0.0) + time.perf_counter() - start
        return probs
