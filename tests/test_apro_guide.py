"""The guide image APro shrinks to its working resolutions: plain bilinear under refine=apro_official
(as the official heads), antialiased under refine=apro (as calibrated)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.config import compose, refine_params
from maskclip_apro.refiners import Guidance, build_refiner
from maskclip_apro.refiners.base import imagenet_normalize


def official_scale_img(norm_img, featmap_size):
    """The official heads' guide: the normalised network input shrunk to the mask resolution.
    Transcribed from CircleRadon/APro 8251a9ec1f4d53e030e43493b2db909f53e1990b,
    mmdet/models/dense_heads/box_solov2_head.py (solo_target_single, `scale_img`), per image."""
    return F.interpolate(norm_img.unsqueeze(dim=0), size=featmap_size, mode='bilinear')


@pytest.mark.parametrize("preset,antialias", [("apro_official", False), ("apro", True)])
def test_apro_guides_are_shrunk_as_the_preset_says(preset, antialias):
    params = refine_params(compose("refine", [f"refine={preset}", "refine.apro.backend=torch", "refine.apro.iters=1"]))
    refiner = build_refiner("apro", params)
    assert refiner.antialias is antialias
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 96, 128, generator=g)
    probs = torch.softmax(torch.randn(1, 3, 3, 4, generator=g), 1)
    seen = {}

    def gp(p, guide, guidance):
        seen["gp"] = guide
        return p

    def lp(p, guide):
        seen["lp"] = guide
        return p

    refiner.gp, refiner.lp = gp, lp  # record the guides the propagations get
    refiner.targets(probs, Guidance(image=image))
    norm = imagenet_normalize(image)[0]
    for name, scale in (("gp", params["apro"]["gp_scale"]), ("lp", params["apro"]["lp_scale"])):
        size = (round(3 * scale), round(4 * scale))
        assert tuple(seen[name].shape[-2:]) == size and size[0] < 96
        official = official_scale_img(norm, size)
        if antialias:
            smooth = F.interpolate(norm[None], size=size, mode="bilinear", align_corners=False, antialias=True)
            torch.testing.assert_close(seen[name], smooth)
            assert (seen[name] - official).abs().max() > 0.1
        else:
            torch.testing.assert_close(seen[name], official)
    with pytest.raises(ValueError, match="antialias must be true or false"):
        build_refiner("apro", {"apro": {"antialias": "no"}})
