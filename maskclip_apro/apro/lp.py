"""APro local affinity propagation (LP), design 3.3: a colour-affinity stencil iterated T times."""

from __future__ import annotations

import torch

from maskclip_apro.apro._checks import check_backend, check_map, check_pair, check_positive
from maskclip_apro.kernels.lp import lp_cpu_image, lp_torch, lp_triton, lp_weights

_ROUTES = {"torch": lp_torch, "triton": lp_triton}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def local_propagation(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    zeta_s: float = 0.15,
    kernel_size: int = 5,
    iters: int = 20,
    backend: str = "auto",
) -> torch.Tensor:
    """Smooth `unary` (B, K, H, W) over k x k windows of `image` (B, C, H, W) in [0, 1].

    Each step sets y_i = sum_j psi(i, j) y_j / sum_j psi(i, j) over the in-image pixels j of the
    window around i (self included), psi(i, j) = exp(-sum_c (I_ic - I_jc)^2 / zeta_s^2). The
    weights are computed once; rows that sum to one keep summing to one. Computation runs in
    float64 when either input is float64, else float32; the result has the dtype of `unary`.
    backend: "auto" (Triton on CUDA, the CPU route otherwise), "torch", "cpu" or "triton".
    """
    check_map("unary", unary)
    check_map("image", image)
    check_pair("unary", unary, "image", image)
    zeta_s = check_positive("zeta_s", zeta_s)
    kernel_size = _check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    iters = _check_int("iters", iters, 0)
    route = check_backend(backend, unary.device)
    if route == "cpu" and unary.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {unary.device}")
    dtype = torch.float64 if torch.float64 in (unary.dtype, image.dtype) else torch.float32
    y, im = unary.to(dtype), image.to(dtype)
    if route == "cpu":
        out = lp_cpu_image(y, im, zeta_s, kernel_size, iters)
    else:
        out = _ROUTES[route](y, lp_weights(im, zeta_s, kernel_size), iters)
    return out.to(unary.dtype)
