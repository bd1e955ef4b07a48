"""ProxyCLIP's vision foundation model wrapper on tiny random-weight timm ViTs (no download)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.constants import IMAGENET_MEAN, IMAGENET_STD
from maskclip_apro.generator.vfm import load_vfm


def imagenet(images):
    return (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def timm_patch_tokens(model, images):
    """timm's own forward: final-norm output tokens, class / register tokens dropped, as (B, C, h, w)."""
    b, _, h, w = images.shape
    p = model.patch_embed.patch_size[0]
    tokens = model.forward_features(imagenet(images))[:, model.num_prefix_tokens :]
    return tokens.transpose(1, 2).reshape(b, -1, h // p, w // p)


@pytest.mark.parametrize("name", ["tiny_dino", "tiny_dinov2_reg"])
def test_native_size_equals_timm_forward(name):
    vfm = load_vfm(name, None)
    side = vfm.patch_size * vfm.native[0]
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    out = vfm(images)
    assert out.shape == (2, 32, *vfm.native)
    assert torch.equal(out, timm_patch_tokens(vfm.model, images))


def test_dinov2_registers_resample_like_its_hub_code():
    """Register models resample by size with antialiasing: timm's own dynamic resize does the same."""
    vfm = load_vfm("tiny_dinov2_reg", None)
    assert (vfm.pos_offset, vfm.pos_antialias) == (0.0, True)
    images = torch.rand(1, 3, 14 * 5, 14 * 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(vfm(images), timm_patch_tokens(vfm.model, images), atol=1e-6, rtol=1e-6)


def test_dino_resamples_with_the_offset_rule():
    """DINO ViT: the model run on an embedding resampled as DINO's hub code does (scale factor (g + 0.1) / M)."""
    vfm = load_vfm("tiny_dino", None)
    assert (vfm.pos_offset, vfm.pos_antialias) == (0.1, False)
    grid = (5, 3)
    images = torch.rand(1, 3, 8 * grid[0], 8 * grid[1], generator=torch.Generator().manual_seed(2))
    ref = copy.deepcopy(vfm.model)
    pos = ref.pos_embed.data
    patches = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / 4, (grid[1] + 0.1) / 4), mode="bicubic")
    ref.pos_embed = torch.nn.Parameter(torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1))
    ref.patch_embed.grid_size = grid  # timm then finds the embedding at the input's grid and keeps it
    torch.testing.assert_close(vfm(images), timm_patch_tokens(ref, images), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(vfm(images), timm_patch_tokens(vfm.model, images), atol=1e-4)


def test_local_checkpoint_and_errors(tmp_path):
    vfm = load_vfm("tiny_dino", None)
    path = tmp_path / "dino.pth"
    torch.save(vfm.model.state_dict(), path)
    again = load_vfm("tiny_dino", str(path))
    assert all(torch.equal(a, b) for a, b in zip(vfm.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vfm("tiny_dino", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="no pretrained weights"):
        load_vfm("tiny_dino", True)
    with pytest.raises(ValueError, match="not a timm model"):
        load_vfm("dino_vit_q99", None)
    with pytest.raises(ValueError, match="multiple of its patch size 8"):
        vfm(torch.rand(1, 3, 30, 32))
