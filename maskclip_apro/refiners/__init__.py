"""Refiners: probabilities plus guidance in, probabilities out (KS, PD, APro, PAMR)."""

from .base import Guidance, Refiner
from .chain import STEPS, Chain, build_refiner

__all__ = ["Guidance", "Refiner", "Chain", "build_refiner", "STEPS"]
