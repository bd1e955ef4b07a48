"""APro local affinity propagation (LP): a colour-affinity stencil iterated T times (docs/kernels.md)."""

from __future__ import annotations

import torch

from ..checks import check_int, check_map, check_pair, check_positive
from ..kernels import registry


def local_propagation(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    zeta_s: float = 0.15,
    kernel_size: int = 5,
    iters: int = 20,
    backend: str = "auto",
) -> torch.Tensor:
    """Smooth `unary` (B, K, H, W) over k x k windows of `image` (B, C, H, W).

    Each step sets y_i = sum_j psi(i, j) y_j / sum_j psi(i, j) over the in-image pixels j of the
    window around i (self included), psi(i, j) = exp(-sum_c (I_ic - I_jc)^2 / zeta_s^2). The
    weights are computed once; rows that sum to one keep summing to one. Computation runs in
    float64 when either input is float64, else float32; the result has the dtype of `unary`.

    kernel_size is odd and at most 2 * max(H, W) + 1: a window of 2 * max(H, W) - 1 already
    reaches every pixel of the image from every pixel, so larger ones change nothing (they run
    as that size). Memory for the weights grows as kernel_size^2 * B * H * W.
    backend: see `maskclip_apro.apro` ("auto", "torch", "cpu" or "triton").
    """
    check_map("unary", unary)
    check_map("image", image)
    check_pair("unary", unary, "image", image)
    zeta_s = check_positive("zeta_s", zeta_s)
    kernel_size = check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    reach = max(unary.shape[-2:])
    if kernel_size > 2 * reach + 1:
        raise ValueError(
            f"kernel_size {kernel_size} is larger than 2 * max(H, W) + 1 = {2 * reach + 1} for a "
            f"{unary.shape[-2]}x{unary.shape[-1]} map; a window of {2 * reach - 1} already covers the whole image"
        )
    iters = check_int("iters", iters, 0)
    name = registry.resolve(backend, unary.device)
    dtype = torch.float64 if torch.float64 in (unary.dtype, image.dtype) else torch.float32
    out = registry.run(
        "local_propagation", name, unary.to(dtype), image.to(dtype), zeta_s, min(kernel_size, 2 * reach - 1), iters
    )
    return out.to(unary.dtype)
