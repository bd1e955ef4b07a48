"""Argument checks shared by the APro operators, the refiners and anything else that validates input.

Each check returns the value it accepted (converted where said) or raises one ValueError that
names the argument, the value and what it should be. Numbers are Python or NumPy numbers, never
booleans (True is not 1 here) and never strings.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def check_map(name: str, x: Any, ndim: int = 4) -> torch.Tensor:
    """A finite, non-empty floating-point tensor of rank `ndim` (rank 4: (B, C, H, W))."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        layout = " (B, C, H, W)" if ndim == 4 else ""
        raise ValueError(f"{name} must have {ndim} dimensions{layout}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    lo, hi = torch.aminmax(x.detach())  # NaN and inf reach the min or max; 10x cheaper than isfinite().all()
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def check_pair(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    """Two maps (B, ., H, W) on the same device with the same batch size and spatial size."""
    if first.shape[0] != second.shape[0] or first.shape[-2:] != second.shape[-2:]:
        raise ValueError(
            f"{first_name} {tuple(first.shape)} and {second_name} {tuple(second.shape)} must share "
            "batch size and spatial size (B, ., H, W)"
        )
    if first.device != second.device:
        raise ValueError(f"{first_name} is on {first.device} but {second_name} is on {second.device}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name: str, value: Any, *, optional: bool = False) -> Optional[float]:
    """A finite number > 0, as float; None passes when `optional`."""
    if value is None and optional:
        return None
    if not _is_number(value) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number{' or null' if optional else ''}, got {value!r}")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float) -> float:
    """A number in [low, high], as float."""
    if not _is_number(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """An integer >= minimum (a float such as 2.0 is refused: it says the caller meant something else)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
