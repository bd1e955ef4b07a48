"""GP's two passes and `refine=apro_official` against transcriptions of the official APro heads.

The official heads (CircleRadon/APro 8251a9ec1f4d53e030e43493b2db909f53e1990b,
mmdet/models/dense_heads/box_solov2_head.py) take the ImageNet-normalised network input I;
GP pass 1 propagates each mask over the official MST of I with zeta_gl, pass 2 propagates the
pass-1 map over the same tree with edge weights (y1_p - y1_q)^2 of that map and zeta_gh: the
MST (apro/gp_cuda/mst/mst.py, boruvka.cpp) and the propagation (apro/gp_cuda/gp_process/
gp_process.cu) are transcribed in tests/test_gp_ties.py. LP (apro/apro.py, Local_APro) iterates
a 5x5 window average with weights exp(-||I_i - I_j||^2 / zeta_s^2) over in-image pixels, 20 times
(transcribed below). Each class map of our probabilities plays the part of one mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gp import sq_dist
from test_gp_ties import official_two_pass

from maskclip_apro.config import compose
from maskclip_apro.refiners import Guidance, build_refiner
from maskclip_apro.refiners.apro import APro

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def normalised(image: torch.Tensor) -> np.ndarray:
    """(3, N) float64 ImageNet-normalised pixels of one (3, H, W) image."""
    x = image.double().numpy().reshape(3, -1)
    return (x - MEAN[:, None]) / STD[:, None]


def official_gp(unary: np.ndarray, guide: np.ndarray, h: int, w: int, zeta_l: float, zeta_h: float | None):
    """unary (K, N), guide (3, N): the official heads' GP (float32 network input), pass 2 unless zeta_h is None."""
    image = guide.astype(np.float32).reshape(3, h, w)
    return official_two_pass(unary.astype(np.float32), image, zeta_l, zeta_h).astype(np.float64)


def official_lp(unary: np.ndarray, guide: np.ndarray, h: int, w: int, zeta_s: float, k: int, iters: int):
    """Local_APro: affinities over the in-image pixels of each k x k window, `iters` normalised averages."""
    r = k // 2
    neigh, aff = [], []
    for i in range(h):
        for j in range(w):
            ids = [(i + di) * w + (j + dj) for di in range(-r, r + 1) for dj in range(-r, r + 1)
                   if 0 <= i + di < h and 0 <= j + dj < w]
            neigh.append(ids)
            aff.append(np.array([np.exp(-sq_dist(guide, i * w + j, q) / zeta_s**2) for q in ids]))
    y = unary.copy()
    for _ in range(iters):
        y = np.stack([(y[:, ids] * a).sum(1) / (a.sum() + 1e-10) for ids, a in zip(neigh, aff)], axis=1)
    return y


def smooth_image(seed: int, h: int, w: int) -> torch.Tensor:
    """Two flat regions 0.05 apart plus 0.002 noise ([0, 1] units): both official zetas matter on it."""
    g = torch.Generator().manual_seed(seed)
    image = 0.45 + 0.002 * torch.rand(1, 3, h, w, generator=g, dtype=torch.float64)
    image[:, :, :, w // 2 :] += 0.05
    return image


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("zetas", [(0.02, 0.07), (0.3, 0.2), (0.05, None)])
def test_two_pass_gp_matches_the_brute_force(zetas, backend):
    h, w, k = 6, 7, 3
    image = smooth_image(1, h, w) if zetas[0] < 0.1 else torch.rand(1, 3, h, w, dtype=torch.float64)
    probs = torch.softmax(3 * torch.randn(1, k, h, w, generator=torch.Generator().manual_seed(2),
                                          dtype=torch.float64), 1)
    second = None if zetas[1] is None else "output"
    refiner = APro(mode="gp", zeta_g=zetas[0], second_pass=second, zeta_h=zetas[1] or 1.0, gp_scale=None, lp_scale=None,
                   backend=backend)
    expected = official_gp(probs[0].reshape(k, -1).numpy(), normalised(image[0]), h, w, *zetas)
    got = refiner(probs, Guidance(image=image))[0].reshape(k, -1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    if zetas[1] is not None:  # the second pass changed something: the test sees it
        one = official_gp(probs[0].reshape(k, -1).numpy(), normalised(image[0]), h, w, zetas[0], None)
        assert np.abs(one - expected).max() > 1e-3


def test_apro_official_preset_is_the_official_heads():
    h, w, k = 6, 7, 3
    cfg = compose("refine", ["refine=apro_official"]).refine
    assert cfg.steps == ["apro"]
    refiner = build_refiner("apro", cfg)
    image = smooth_image(3, h, w)
    probs = torch.softmax(2 * torch.randn(1, k, h, w, generator=torch.Generator().manual_seed(4),
                                          dtype=torch.float64), 1)
    gp, lp = refiner.targets(probs, Guidance(image=image))
    unary, guide = probs[0].reshape(k, -1).numpy(), normalised(image[0])
    expected_gp = official_gp(unary, guide, h, w, 0.01, 0.07)
    expected_lp = official_lp(unary, guide, h, w, 0.15, 5, 20)
    np.testing.assert_allclose(gp[0].reshape(k, -1).double().numpy(), expected_gp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lp[0].reshape(k, -1).double().numpy(), expected_lp, atol=1e-5, rtol=0)
    both = refiner(probs, Guidance(image=image))[0].reshape(k, -1).double().numpy()
    np.testing.assert_allclose(both, 0.5 * (expected_gp + expected_lp), atol=1e-5, rtol=0)
    assert np.abs(expected_gp - unary).max() > 1e-2 and np.abs(expected_lp - unary).max() > 1e-2
