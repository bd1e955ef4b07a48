"""Refiner chains built from step names, so configs and the compare table name methods as data.

`params` is the composed `cfg.refine` (conf/_refine_params.yaml plus the preset's changes), or
any mapping of refiner family (ks, pd, apro, pamr) to keyword arguments. The steps "pamr"
(PAMR on probabilities) and "pamr_logits" (PAMR on the logits, as the SCLIP-family harness
applies it) share the `pamr` parameters. docs/refiners.md
defines every refiner.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from .base import Guidance, Refiner

# Steps with a fixed APro combination (step -> APro mode); the step "apro" runs refine.apro.mode.
APRO_MODES = {"gp": "gp", "lp": "lp", "lp_gp": "lp_gp", "gp_lp": "gp_lp", "gp_lp_parallel": "parallel"}
STEPS = ("ks", "pd", "pamr", "pamr_logits", "apro", *APRO_MODES)


def build_refiner(step: str, params: Mapping[str, Any] | None = None) -> Refiner:
    """One refiner from its step name; `params` maps a refiner family (ks, pd, apro, pamr) to kwargs.

    Other keys of `params` (e.g. `steps`) are ignored, so the whole `cfg.refine` can be passed.
    """
    params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else (params or {})
    if step == "ks":
        from .ks import KeySmoothing

        return KeySmoothing(**dict(params.get("ks", {})))
    if step == "pd":
        from .pd import PromptDenoising

        return PromptDenoising(**dict(params.get("pd", {})))
    if step in ("pamr", "pamr_logits"):
        from .pamr import PAMR
        from .pamr_logits import PAMRLogits

        kwargs = dict(params.get("pamr", {}))
        if "dilations" in kwargs:
            kwargs["dilations"] = tuple(kwargs["dilations"])
        return (PAMR if step == "pamr" else PAMRLogits)(**kwargs)
    if step == "apro" or step in APRO_MODES:
        from .apro import APro

        kwargs = dict(params.get("apro", {}))
        if step != "apro":
            kwargs["mode"] = APRO_MODES[step]
        refiner = APro(**kwargs)
        if step == "apro":
            refiner.name = "apro"  # timed and named as the step, whichever combination it runs
        return refiner
    raise ValueError(f"unknown refiner step {step!r}; choose from {STEPS}")


class Chain:
    """Refiners applied in order; records the seconds each step took in `last_times`."""

    def __init__(self, refiners: Sequence[Refiner]) -> None:
        self.refiners = list(refiners)
        self.name = "+".join(r.name for r in self.refiners) or "none"
        self.last_times: dict[str, float] = {}

    @classmethod
    def from_steps(cls, steps: Sequence[str], params: Mapping[str, Any] | None = None) -> "Chain":
        return cls([build_refiner(s, params) for s in steps])

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        self.last_times = {}
        for refiner in self.refiners:
            start = time.perf_counter()
            probs = refiner(probs, guidance)
            self.last_times[refiner.name] = self.last_times.get(refiner.name, 0.0) + time.perf_counter() - start
        return probs
