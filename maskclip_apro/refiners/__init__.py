"""Refiners: probabilities plus guidance in, probabilities out (KS, PD, APro, PAMR); see docs/refiners.md.

The registry (registry.py) maps chain step names to refiner classes; nothing here reads configs.
"""

from .base import Guidance, Refiner
from .chain import Chain
from .registry import CLASS_MODULES, STEPS, build_refiner, refiner_class

__all__ = ["Guidance", "Refiner", "Chain", "build_refiner", "STEPS", *CLASS_MODULES]


def __getattr__(name: str):
    """The refiner classes, imported on first use (APro and KS pull in the compiled kernels)."""
    if name in CLASS_MODULES:
        return refiner_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
