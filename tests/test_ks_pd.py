"""Key smoothing and prompt denoising against loop-form oracles."""

from __future__ import annotations

import math

import pytest
import torch

from maskclip_apro.refiners.base import Guidance
from maskclip_apro.refiners.ks import KeySmoothing
from maskclip_apro.refiners.pd import PromptDenoising


def random_probs(b=2, k=4, h=3, w=5, seed=0, scale=3.0):
    torch.manual_seed(seed)
    return torch.softmax(torch.randn(b, k, h, w, dtype=torch.float64) * scale, dim=1)


def ks_loop(probs, keys, thresh):
    b, k, h, w = probs.shape
    p = probs.reshape(b, k, -1)
    kk = keys.reshape(b, keys.shape[1], -1)
    out = p.clone()
    for i in range(b):
        for n in range(h * w):
            if max(p[i, :, n].tolist()) >= thresh:
                continue
            q = [0.0] * k
            for m in range(h * w):
                a, c = kk[i, :, n], kk[i, :, m]
                cos = float((a * c).sum()) / math.sqrt(float((a * a).sum()) * float((c * c).sum()))
                for j in range(k):
                    q[j] += cos * float(p[i, j, m])
            q = [max(v, 0.0) for v in q]
            total = sum(q)
            if total > 0:
                out[i, :, n] = torch.tensor([v / total for v in q], dtype=p.dtype)
    return out.reshape(b, k, h, w)


@pytest.mark.parametrize("thresh", [1.0, 0.7])
def test_key_smoothing_matches_loops(thresh):
    probs = random_probs()
    torch.manual_seed(1)
    keys = torch.randn(2, 6, 3, 5, dtype=torch.float64)  # cosines of both signs
    guidance = Guidance(image=torch.rand(2, 3, 48, 80), keys=keys)
    out = KeySmoothing(thresh)(probs, guidance)
    torch.testing.assert_close(out, ks_loop(probs, keys, thresh), atol=1e-12, rtol=1e-10)
    assert bool((out >= 0).all())
    torch.testing.assert_close(out.sum(1), torch.ones_like(out.sum(1)))
    if thresh < 1.0:
        kept = probs.amax(1, keepdim=True) >= thresh
        assert bool(kept.any()) and torch.equal(out[kept.expand_as(out)], probs[kept.expand_as(probs)])


def test_key_smoothing_keeps_maskclip_argmax_with_positive_keys():
    probs = random_probs(seed=2).float()
    torch.manual_seed(3)
    keys = torch.rand(2, 6, 3, 5)  # all cosines positive
    out = KeySmoothing()(probs, Guidance(image=torch.rand(2, 3, 3, 5), keys=keys))
    unit = torch.nn.functional.normalize(keys.reshape(2, 6, -1), dim=1)
    raw = probs.reshape(2, 4, -1) @ (unit.transpose(1, 2) @ unit)  # MaskCLIP: W P, no renormalisation
    assert torch.equal(out.reshape(2, 4, -1).argmax(1), raw.argmax(1))


def test_key_smoothing_needs_matching_keys():
    probs = random_probs().float()
    with pytest.raises(ValueError, match="keys"):
        KeySmoothing()(probs, Guidance(image=torch.rand(2, 3, 3, 5)))
    with pytest.raises(ValueError, match="keys"):
        KeySmoothing()(probs, Guidance(image=torch.rand(2, 3, 3, 5), keys=torch.rand(2, 6, 4, 5)))
    with pytest.raises(ValueError, match="thresh"):
        KeySmoothing(thresh=0)


def pd_loop(probs, thresh, keep=()):
    b, k = probs.shape[:2]
    out = torch.zeros_like(probs)
    for i in range(b):
        peaks = [float(probs[i, j].max()) for j in range(k)]
        kept = [j for j in range(k) if peaks[j] >= thresh or j in keep or j == peaks.index(max(peaks))]
        total = sum(probs[i, j] for j in kept)
        for j in kept:
            out[i, j] = probs[i, j] / total
    return out


def test_prompt_denoising_matches_loops_and_inf_logits():
    torch.manual_seed(4)
    logits = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 2
    logits[0, 1] += 4  # image 0: class 1 confident somewhere
    logits[1, :, 0, 0] = torch.tensor([0.0, 9.0, 9.0, 0.0, 0.0], dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    out = PromptDenoising(0.5)(probs, Guidance(image=torch.rand(3, 3, 4, 4)))
    torch.testing.assert_close(out, pd_loop(probs, 0.5), atol=1e-12, rtol=1e-10)
    peak = probs.flatten(2).amax(2)
    removed = peak < 0.5
    removed[torch.arange(3), peak.argmax(1)] = False
    masked = logits.masked_fill(removed[:, :, None, None], float("-inf"))
    torch.testing.assert_close(out, torch.softmax(masked, dim=1), atol=1e-12, rtol=1e-10)


def test_prompt_denoising_keeps_top_class_and_keep_list():
    probs = torch.full((1, 4, 2, 2), 0.25, dtype=torch.float64)
    probs[0, :, 0, 0] = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    probs[0, :, 1, 1] = torch.tensor([0.3, 0.2, 0.3, 0.2], dtype=torch.float64)
    g = Guidance(image=torch.rand(1, 3, 2, 2))
    out = PromptDenoising(0.5)(probs, g)  # all peaks below 0.5: only class 1 (peak 0.4) stays
    assert torch.equal(out[0, 1], torch.ones(2, 2, dtype=torch.float64))
    out = PromptDenoising(0.5, keep=[0])(probs, g)
    torch.testing.assert_close(out, pd_loop(probs, 0.5, keep=(0,)))
    with pytest.raises(ValueError, match="keep"):
        PromptDenoising(0.5, keep=[7])(probs, g)
    with pytest.raises(ValueError, match="thresh"):
        PromptDenoising(1.5)


def test_prompt_denoising_no_kept_mass_becomes_uniform_over_kept():
    third = 1.0 / 3.0
    probs = torch.tensor([[[[0.0, 1.0]], [[third, 0.0]], [[third, 0.0]], [[third, 0.0]]]])
    g = Guidance(image=torch.rand(1, 3, 1, 2))
    out = PromptDenoising(0.5)(probs, g)  # only class 0 survives; position 0 had none of its mass
    assert out[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    out = PromptDenoising(0.5, keep=[0, 2, 3])(probs, g)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
