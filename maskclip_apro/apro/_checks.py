"""Input validation shared by the APro entry points: every error names the argument."""

from __future__ import annotations

import math

import torch


def check_map(name: str, x, ndim: int = 4) -> torch.Tensor:
    """A finite, non-empty floating tensor of rank `ndim`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    lo, hi = torch.aminmax(x.detach())  # NaN and inf reach the min or max; 10x cheaper than isfinite().all()
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def check_pair(unary_name: str, unary: torch.Tensor, guide_name: str, guide: torch.Tensor) -> None:
    """Same batch size and spatial size for a map and its guidance."""
    if unary.shape[0] != guide.shape[0] or unary.shape[-2:] != guide.shape[-2:]:
        raise ValueError(
            f"{unary_name} {tuple(unary.shape)} and {guide_name} {tuple(guide.shape)} must share "
            "batch size and spatial size (B, ., H, W)"
        )
    if unary.device != guide.device:
        raise ValueError(f"{unary_name} is on {unary.device} but {guide_name} is on {guide.device}")


def check_positive(name: str, value) -> float:
    """A finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v
