"""Refiners: probabilities plus guidance in, probabilities out (KS, PD, APro, PAMR); see docs/refiners.md."""

from importlib import import_module

from .base import Guidance, Refiner
from .chain import STEPS, Chain, build_refiner

_LAZY = {"KeySmoothing": ".ks", "PromptDenoising": ".pd", "APro": ".apro", "PAMR": ".pamr"}

__all__ = ["Guidance", "Refiner", "Chain", "build_refiner", "STEPS", *_LAZY]


def __getattr__(name: str):
    """The refiner classes, imported on first use (APro and KS pull in the compiled kernels)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
