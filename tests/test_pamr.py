"""PAMR against a per-pixel loop oracle, plus properties and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.refiners.base import Guidance
from maskclip_apro.refiners.pamr import PAMR

OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def loop_pamr(probs: np.ndarray, image: np.ndarray, dilations, iters: int) -> np.ndarray:
    """Original PAMR read per pixel: clamped (replicate) neighbours, unbiased std, softmax."""
    nb, nc, h, w = image.shape

    def at(arr, b, i, j):
        return arr[b, :, min(max(i, 0), h - 1), min(max(j, 0), w - 1)]

    aff = np.zeros((nb, h, w, 8 * len(dilations)))
    for b in range(nb):
        for i in range(h):
            for j in range(w):
                window = [at(image, b, i + d * dy, j + d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                sigma = np.std(np.stack(window), axis=0, ddof=1)
                logits = []
                for d in dilations:
                    for dy, dx in OFFSETS:
                        diff = np.abs(image[b, :, i, j] - at(image, b, i + d * dy, j + d * dx))
                        logits.append(float(np.mean(-diff / (1e-8 + 0.1 * sigma))))
                m = max(logits)
                e = [math.exp(v - m) for v in logits]
                aff[b, i, j] = np.array(e) / sum(e)
    for _ in range(iters):
        new = np.zeros_like(probs)
        for b in range(nb):
            for i in range(h):
                for j in range(w):
                    n = 0
                    for d in dilations:
                        for dy, dx in OFFSETS:
                            new[b, :, i, j] += aff[b, i, j, n] * at(probs, b, i + d * dy, j + d * dx)
                            n += 1
        probs = new
    return probs


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dilations, iters", [((1,), 1), ((1, 2), 3), ((2, 3), 2)])
def test_matches_loop_oracle(dilations, iters):
    probs = torch.softmax(3 * rand(2, 3, 5, 6, seed=1), 1)
    image = rand(2, 3, 5, 6, seed=2)
    out = PAMR(dilations=dilations, iters=iters)(probs, Guidance(image=image))
    expect = loop_pamr(probs.numpy(), image.numpy(), dilations, iters)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-9, atol=1e-12)


def test_upsamples_to_guidance_size_then_refines():
    probs = torch.softmax(3 * rand(1, 4, 3, 4, seed=3), 1)
    image = rand(1, 3, 6, 8, seed=4)
    out = PAMR(dilations=(1, 2), iters=2)(probs, Guidance(image=image))
    up = F.interpolate(probs, size=(6, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out.numpy(), loop_pamr(up.numpy(), image.numpy(), (1, 2), 2), rtol=1e-9, atol=1e-12)


def test_rows_sum_to_one_and_stay_in_range_with_defaults():
    probs = torch.softmax(5 * torch.rand(2, 6, 8, 8, generator=torch.Generator().manual_seed(5)), 1)
    image = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(6))
    out = PAMR()(probs, Guidance(image=image))
    assert out.shape == (2, 6, 40, 36) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(1), torch.ones(2, 40, 36), rtol=1e-5, atol=1e-5)
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()


def test_constant_unary_is_unchanged():
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 7, 9).contiguous()
    out = PAMR(dilations=(1, 2), iters=4)(probs, Guidance(image=rand(1, 3, 7, 9, seed=7)))
    torch.testing.assert_close(out, probs, rtol=1e-12, atol=1e-12)


def test_constant_image_gives_uniform_neighbour_average():
    """Equal colours: every affinity is 1 / (8 * len(dilations)), a plain neighbour mean."""
    probs = torch.softmax(rand(1, 2, 5, 5, seed=8), 1)
    out = PAMR(dilations=(1,), iters=1)(probs, Guidance(image=torch.full((1, 3, 5, 5), 0.3, dtype=torch.float64)))
    pad = F.pad(probs, (1, 1, 1, 1), mode="replicate")
    expect = sum(pad[..., 1 + dy : 6 + dy, 1 + dx : 6 + dx] for dy, dx in OFFSETS) / 8
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_raw_and_normalised_images_give_the_same_result():
    """The official users feed a normalised image; the affinity is invariant to per-channel affine maps."""
    probs = torch.softmax(3 * rand(1, 4, 9, 11, seed=9), 1)
    image = rand(1, 3, 9, 11, seed=10)
    mean = torch.tensor([0.48, 0.46, 0.41], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.27, 0.26, 0.28], dtype=torch.float64).view(1, 3, 1, 1)
    refiner = PAMR(dilations=(1, 2), iters=3)
    torch.testing.assert_close(refiner(probs, Guidance(image=image)),
                               refiner(probs, Guidance(image=(image - mean) / std)), rtol=1e-6, atol=1e-7)


def test_is_a_refiner():
    refiner = PAMR()
    assert refiner.name == "pamr" and refiner.dilations == (8, 16) and refiner.iters == 10


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(dilations=()), "dilations"), (dict(dilations=(0, 2)), "dilations"), (dict(dilations=(1.5,)), "dilations"),
     (dict(iters=-1), "iters"), (dict(iters=1.0), "iters")],
)
def test_bad_constructor_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PAMR(**kwargs)


@pytest.mark.parametrize(
    "probs, image, name",
    [
        (torch.rand(3, 4, 4), torch.rand(1, 3, 4, 4), "probs"),
        (torch.rand(1, 3, 4, 4), torch.full((1, 3, 4, 4), float("nan")), "guidance.image"),
        (torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4), "batch"),
        (torch.ones(1, 3, 4, 4, dtype=torch.int64), torch.rand(1, 3, 4, 4), "probs"),
    ],
)
def test_bad_call_input(probs, image, name):
    with pytest.raises(ValueError, match=name):
        PAMR()(probs, Guidance(image=image))
