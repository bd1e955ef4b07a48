"""LPOSS+'s pixel-graph product: y = x - alpha * Wn x with Wn a per-pixel stencil (refiners/lposs.py).

Wn is given as weights (O, H, W) float32, weights[o, i, j] the edge from pixel (i, j) to
(i + dy_o, j + dx_o), zero where that neighbour lies outside the image; x and y are (K, H, W)
float64 maps, one per class. Two implementations, equal up to float64 rounding:

- `stencil_matvec_reference`: the readable torch version (shifted views of a zero-padded map),
  on any device; the one CUDA tensors use.
- `stencil_matvec_cpu`: a numba loop, (row, class) pairs in parallel, every offset applied
  while the row band is in cache (one pass over memory instead of one per offset).
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
import torch
import torch.nn.functional as F


def stencil_matvec_reference(
    weights: torch.Tensor, offsets: Sequence[tuple[int, int]], alpha: float, x: torch.Tensor
) -> torch.Tensor:
    """x - alpha * Wn x for maps x (K, H, W) (module doc)."""
    _, h, w = weights.shape
    half = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (half, half, half, half))
    out = x.clone()
    for o, (dy, dx) in enumerate(offsets):
        shifted = padded[:, half + dy : half + dy + h, half + dx : half + dx + w]
        out.addcmul_(weights[o].to(x.dtype), shifted, value=-alpha)
    return out


@numba.njit(parallel=True, cache=True)
def _stencil_rows(weights, dy, dx, alpha, x, out):  # pragma: no cover - compiled
    n_off, h, w = weights.shape
    k = x.shape[0]
    for t in numba.prange(h * k):
        i = t // k
        c = t - i * k
        for j in range(w):
            out[c, i, j] = x[c, i, j]
        for o in range(n_off):
            ii = i + dy[o]
            if ii < 0 or ii >= h:
                continue
            shift = dx[o]
            for j in range(max(0, -shift), min(w, w - shift)):
                out[c, i, j] -= alpha * (weights[o, i, j] * x[c, ii, j + shift])


def stencil_matvec_cpu(
    weights: torch.Tensor, offsets: Sequence[tuple[int, int]], alpha: float, x: torch.Tensor
) -> torch.Tensor:
    """stencil_matvec_reference's result from the numba loop, on the host (CPU tensors)."""
    wts = weights.detach().to(torch.float32).contiguous().numpy()
    xs = x.detach().to(torch.float64).contiguous().numpy()
    dy = np.array([o[0] for o in offsets], dtype=np.int64)
    dx = np.array([o[1] for o in offsets], dtype=np.int64)
    out = np.empty_like(xs)
    _stencil_rows(wts, dy, dx, float(alpha), xs, out)
    return torch.from_numpy(out)


def stencil_matvec(weights: torch.Tensor, offsets: Sequence[tuple[int, int]], alpha: float, x: torch.Tensor) -> torch.Tensor:
    """The numba loop for CPU tensors, the torch reference elsewhere."""
    if x.device.type == "cpu":
        return stencil_matvec_cpu(weights, offsets, alpha, x)
    return stencil_matvec_reference(weights, offsets, alpha, x)
