"""LP against a pixel-loop oracle and the official unfold formulation, plus properties and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import maskclip_apro.kernels._triton as ktriton
import maskclip_apro.kernels.lp as klp
from maskclip_apro.apro import local_propagation

BACKENDS = ["torch", "cpu", "triton"]


def loop_lp(unary: torch.Tensor, image: torch.Tensor, zeta: float, k: int, iters: int) -> np.ndarray:
    """The update rule read literally: per pixel, per in-image neighbour, psi recomputed each step."""
    y = unary.double().numpy().copy()
    im = image.double().numpy()
    nb, _, h, w = y.shape
    r = k // 2
    for _ in range(iters):
        new = np.zeros_like(y)
        for b in range(nb):
            for i in range(h):
                for j in range(w):
                    num, den = 0.0, 0.0
                    for a in range(i - r, i + r + 1):
                        for c in range(j - r, j + r + 1):
                            if 0 <= a < h and 0 <= c < w:
                                psi = math.exp(-float(((im[b, :, i, j] - im[b, :, a, c]) ** 2).sum()) / zeta**2)
                                num = num + psi * y[b, :, a, c]
                                den += psi
                    new[b, :, i, j] = num / den
        y = new
    return y


def rand(*shape: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


ORACLE_CASES = [(1, 0.15, 2), (3, 0.15, 3), (5, 0.15, 2), (3, 0.6, 1), (5, 1.0, 4), (7, 0.4, 2)]
CPU_CASES = [(1, 0.15, 2), (3, 0.6, 1), (5, 1.0, 4)]  # each kernel size costs the CPU route a compile


@pytest.mark.parametrize(
    "backend, k, zeta, iters", [("torch", *case) for case in ORACLE_CASES] + [("cpu", *case) for case in CPU_CASES]
)
def test_matches_loop_oracle(backend, k, zeta, iters):
    unary, image = rand(2, 3, 5, 6, seed=1), rand(2, 3, 5, 6, seed=2)
    out = local_propagation(unary, image, zeta_s=zeta, kernel_size=k, iters=iters, backend=backend)
    np.testing.assert_allclose(out.numpy(), loop_lp(unary, image, zeta, k, iters), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k, iters, dtype", [(3, 2, torch.float64), (5, 3, torch.float32)])
def test_triton_matches_loop_oracle(k, iters, dtype):
    unary, image = rand(2, 3, 8, 9, seed=3, dtype=dtype), rand(2, 3, 8, 9, seed=4, dtype=dtype)
    out = local_propagation(unary, image, zeta_s=0.5, kernel_size=k, iters=iters, backend="triton")
    assert out.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.double().numpy(), loop_lp(unary, image, 0.5, k, iters), rtol=tol, atol=tol)


def test_triton_channel_blocks_and_batch():
    """More channels than one block, odd sizes: every (tile, channel block, image) program is used."""
    unary, image = rand(3, 70, 4, 5, seed=5, dtype=torch.float32), rand(3, 2, 4, 5, seed=6, dtype=torch.float32)
    ref = local_propagation(unary, image, zeta_s=0.3, kernel_size=3, iters=2, backend="torch")
    out = local_propagation(unary, image, zeta_s=0.3, kernel_size=3, iters=2, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ktriton, "INTERPRETED", False)
    with pytest.raises(ValueError, match="triton.*CUDA"):
        local_propagation(rand(1, 2, 4, 4), rand(1, 3, 4, 4), backend="triton")


def test_large_windows_use_the_loop_form_and_match_the_reference():
    """Windows above UNROLL_MAX run as a loop, not as straight-line code whose compile time grows as k^2."""
    unary, image = rand(2, 3, 20, 18, seed=24, dtype=torch.float32), rand(2, 3, 20, 18, seed=25, dtype=torch.float32)
    k = 33
    assert k > klp.UNROLL_MAX
    ref = klp.lp_torch(unary, klp.lp_weights(image, 0.5, k), 2)
    out = local_propagation(unary, image, zeta_s=0.5, kernel_size=k, iters=2, backend="cpu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    k = klp.UNROLL_MAX + 2  # the triton kernel's loop branch; kept small for the interpreter
    small_u, small_i = unary[:1, :, :6, :6], image[:1, :, :6, :6]
    ref = klp.lp_torch(small_u, klp.lp_weights(small_i, 0.5, k), 1)
    out = local_propagation(small_u, small_i, zeta_s=0.5, kernel_size=k, iters=1, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_windows_wider_than_the_image_are_capped(backend):
    """Up to 2 * max(H, W) + 1 the result equals the plain stencil of that size; beyond, a clear error."""
    unary, image = rand(1, 2, 3, 2, seed=26), rand(1, 3, 3, 2, seed=27)
    k = 2 * 3 + 1  # runs as 5, the widest window that still adds pixels
    ref = klp.lp_torch(unary, klp.lp_weights(image, 0.7, k), 3)  # unclamped reference
    out = local_propagation(unary, image, zeta_s=0.7, kernel_size=k, iters=3, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"kernel_size 9 is larger than 2 \* max\(H, W\) \+ 1 = 7 for a 3x2 map"):
        local_propagation(unary, image, kernel_size=9, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_official_unfold_everywhere_for_small_zeta(backend):
    """With image in [0, 1] and zeta << 10 the +10 shift makes padded taps underflow to exactly 0."""
    unary, image = rand(2, 4, 9, 11, seed=7), rand(2, 3, 9, 11, seed=8)
    for k, zeta in [(3, 0.15), (5, 0.15), (5, 0.8)]:
        ref = klp.lp_unfold(unary, image, zeta, k, 6)
        out = local_propagation(unary, image, zeta_s=zeta, kernel_size=k, iters=6, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)


def test_official_unfold_differs_only_at_borders_for_large_zeta():
    """zeta comparable to the +10 shift: padding leaks into border pixels of the official code only."""
    unary, image = rand(1, 2, 9, 10, seed=9), rand(1, 3, 9, 10, seed=10)
    k, r = 5, 2
    ref = klp.lp_unfold(unary, image, 20.0, k, 1)
    out = local_propagation(unary, image, zeta_s=20.0, kernel_size=k, iters=1, backend="torch")
    torch.testing.assert_close(out[..., r:-r, r:-r], ref[..., r:-r, r:-r], rtol=1e-9, atol=1e-12)
    border = torch.ones(9, 10, dtype=torch.bool)
    border[r:-r, r:-r] = False
    assert ((out - ref).abs()[..., border] > 1e-3).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_iters_zero_is_identity(backend):
    unary = rand(1, 3, 5, 6, seed=11, dtype=torch.float32)
    out = local_propagation(unary, rand(1, 3, 5, 6, seed=12, dtype=torch.float32), iters=0, backend=backend)
    assert torch.equal(out, unary) and out.data_ptr() != unary.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_summing_to_one_stay_so(backend):
    probs = torch.softmax(4 * rand(2, 5, 6, 7, seed=13, dtype=torch.float32), 1)
    out = local_propagation(probs, rand(2, 3, 6, 7, seed=14, dtype=torch.float32), iters=3, backend=backend)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 6, 7), rtol=1e-5, atol=1e-5)
    assert (out >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_constant_image_is_box_average_with_border_excluded(backend):
    """psi = 1 everywhere: one step is the mean over the in-image part of the window."""
    unary, k, r = rand(1, 2, 6, 7, seed=15), 5, 2
    out = local_propagation(unary, torch.full((1, 3, 6, 7), 0.4, dtype=torch.float64), kernel_size=k, iters=1, backend=backend)
    expect = torch.empty_like(unary)
    for i in range(6):
        for j in range(7):
            win = unary[..., max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
            expect[..., i, j] = win.mean((-2, -1))
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_permutation_equivariance(backend):
    unary, image = rand(1, 6, 5, 6, seed=16, dtype=torch.float32), rand(1, 3, 5, 6, seed=17, dtype=torch.float32)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = local_propagation(unary, image, iters=2, backend=backend)[:, perm]
    b = local_propagation(unary[:, perm], image, iters=2, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_output_dtype_follows_unary_and_auto_is_cpu():
    unary = rand(1, 2, 5, 6, seed=18).half()
    out = local_propagation(unary, rand(1, 3, 5, 6, seed=19, dtype=torch.float32), iters=2)
    assert out.dtype == torch.float16
    ref = local_propagation(unary.float(), rand(1, 3, 5, 6, seed=19, dtype=torch.float32), iters=2, backend="torch")
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-3)


def test_cpu_route_batch_and_many_channels_match_reference():
    unary, image = rand(2, 21, 17, 23, seed=20, dtype=torch.float32), rand(2, 3, 17, 23, seed=21, dtype=torch.float32)
    for k, iters in [(5, 7), (3, 4)]:
        ref = local_propagation(unary, image, kernel_size=k, iters=iters, backend="torch")
        out = local_propagation(unary, image, kernel_size=k, iters=iters, backend="cpu")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_cpu_routes_from_image_and_from_weights_match_reference(dtype, tol):
    """lp_cpu_image (numba weights, symmetric exps) and lp_cpu against lp_torch on lp_weights, several sizes.

    Two channels (the fewest padded lanes) under a 5x5 window need more scratch for the
    forward affinities than the ping-pong buffers hold; the shrinking and growing sizes reuse
    the per-thread workspace.
    """
    for seed, (b, k_ch, h, w) in enumerate([(1, 2, 40, 37), (2, 3, 9, 11), (1, 9, 31, 20)]):
        unary, image = rand(b, k_ch, h, w, seed=seed, dtype=dtype), rand(b, 3, h, w, seed=seed + 10, dtype=dtype)
        weights = klp.lp_weights(image, 0.3, 5)
        ref = klp.lp_torch(unary, weights, 3)
        torch.testing.assert_close(klp.lp_cpu(unary, weights, 3), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(klp.lp_cpu_image(unary, image, 0.3, 5, 3), ref, rtol=tol, atol=tol)


def test_cpu_window_larger_than_image_and_inputs_that_require_grad():
    unary, image = rand(1, 3, 2, 3, seed=22), rand(1, 3, 2, 3, seed=23)
    ref = local_propagation(unary, image, kernel_size=7, zeta_s=0.5, iters=2, backend="torch")
    out = klp.lp_cpu_image(unary.requires_grad_(), image.requires_grad_(), 0.5, 7, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# bad input


def good():
    return dict(unary=rand(1, 2, 4, 5), image=rand(1, 3, 4, 5))


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(unary=torch.rand(2, 4, 5)), "unary"),
        (dict(image=torch.rand(1, 3, 4, 6)), "unary"),
        (dict(image=torch.rand(2, 3, 4, 5)), "unary"),
        (dict(unary=torch.full((1, 2, 4, 5), float("nan"))), "unary"),
        (dict(image=torch.full((1, 3, 4, 5), float("inf"))), "image"),
        (dict(unary=torch.rand(1, 0, 4, 5)), "unary"),
        (dict(unary=torch.ones(1, 2, 4, 5, dtype=torch.int64)), "unary"),
        (dict(image=[[0.0]]), "image"),
        (dict(zeta_s=0.0), "zeta_s"),
        (dict(zeta_s=-1.0), "zeta_s"),
        (dict(kernel_size=4), "kernel_size"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=3.0), "kernel_size"),
        (dict(kernel_size=99), "kernel_size"),
        (dict(iters=-1), "iters"),
        (dict(iters=2.5), "iters"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_input_names_the_argument(change, name):
    args = good() | change
    with pytest.raises(ValueError, match=name):
        local_propagation(args.pop("unary"), args.pop("image"), **args)
