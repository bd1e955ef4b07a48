"""MaskCLIP generator: whole and sliding inference, resizing, padding, bad input.

The dense features and keys themselves are checked against the official code in
test_official_head.py.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.generator import GeneratorOutput, build_generator
from maskclip_apro.generator.maskclip import resized_size, stitch, window_starts
from maskclip_apro.generator.models import load_clip
from maskclip_apro.generator.resnet import attnpool_dense
from maskclip_apro.generator.vit import interpolate_pos_embed

NAMES = ["background", "cat", "dog"]


def make(model: str, cache_dir, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_generator(model, None, NAMES, cache_dir=str(cache_dir), **kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module")
def vit_whole(cache):
    return make("tiny_vit", cache, mode="whole", img_scale=None)


@pytest.fixture(scope="module")
def rn_whole(cache):
    return make("tiny_resnet", cache, mode="whole", img_scale=None)


def normalise(gen, img):
    return (img - gen.mean) / gen.std


def expected_logits(gen, unit_feats):
    return gen.logit_scale * torch.einsum("bdhw,kd->bkhw", unit_feats.float(), gen.classifier.embeddings)


# ---------------------------------------------------------------- ViT (the official-code oracle: test_official_head.py)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (75, 101)])
def test_vit_whole_image_output(vit_whole, size):
    torch.manual_seed(1)
    img = torch.rand(2, 3, *size)
    out = vit_whole(img)
    feats, keys = vit_whole.backbone(normalise(vit_whole, img))
    unit = F.normalize(feats, dim=1)
    grid = (math.ceil(size[0] / 16), math.ceil(size[1] / 16))  # zero-padded to whole patches
    assert isinstance(out, GeneratorOutput)
    assert out.logits.shape == (2, 3, *grid) and out.keys.shape == (2, 64, *grid)
    torch.testing.assert_close(out.features, feats)  # the projected features, before normalisation
    torch.testing.assert_close(out.keys, keys)
    torch.testing.assert_close(out.logits, expected_logits(vit_whole, unit), atol=2e-3, rtol=1e-4)
    assert torch.equal(out.image, img)


def test_vit_padding_is_zero_after_normalisation(vit_whole):
    """An odd-sized image gives what the image padded with the normalisation mean gives."""
    torch.manual_seed(2)
    img = torch.rand(1, 3, 50, 70)
    padded = vit_whole.mean.expand(1, 3, 64, 80).clone()
    padded[..., :50, :70] = img
    a, b = vit_whole(img), vit_whole(padded)
    for name in ("logits", "keys", "features"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def test_pos_embed_interpolation_is_identity_at_native_grid():
    torch.manual_seed(3)
    pos = torch.randn(1 + 14 * 14, 32)
    assert torch.equal(interpolate_pos_embed(pos, (14, 14), (14, 14)), pos)
    assert interpolate_pos_embed(pos, (14, 14), (28, 20)).shape == (1 + 28 * 20, 32)


# ---------------------------------------------------------------- ResNet


def test_resnet_dense_matches_per_position_projections(rn_whole):
    torch.manual_seed(4)
    img = torch.rand(1, 3, 64, 96)
    out = rn_whole(img)
    assert out.logits.shape == (1, 3, 2, 3) and rn_whole.patch_size == 32
    backbone = rn_whole.backbone
    trunk = backbone.trunk(normalise(rn_whole, img)).double()
    sd = {k: v.double() for k, v in backbone.visual.attnpool.state_dict().items()}

    def project(name, x):
        return torch.einsum("oe,behw->bohw", sd[name + ".weight"], x) + sd[name + ".bias"][:, None, None]

    dense = project("c_proj", project("v_proj", trunk))
    unit = F.normalize(dense, dim=1)
    torch.testing.assert_close(out.features, dense.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.keys, project("k_proj", trunk).float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, expected_logits(rn_whole, unit), atol=2e-3, rtol=1e-4)


def test_attnpool_equals_dense_on_identical_tokens(rn_whole):
    """All pool tokens equal (uniform map, zero positional embedding): pooled == dense everywhere."""
    pool = rn_whole.backbone.visual.attnpool
    saved = pool.positional_embedding.data.clone()
    torch.manual_seed(5)
    x = torch.randn(2, saved.shape[1], 1, 1).expand(2, saved.shape[1], 2, 2).contiguous()
    try:
        pool.positional_embedding.data.zero_()
        pooled = pool(x)
        dense = attnpool_dense(pool, x)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(dense[:, :, i, j], pooled, atol=1e-5, rtol=1e-5)
        pool.positional_embedding.data.copy_(saved)
        assert not torch.allclose(pool(x), pooled, atol=1e-4)  # the relation needs equal tokens
    finally:
        pool.positional_embedding.data.copy_(saved)


# ---------------------------------------------------------------- windows and resizing


def test_window_starts_follow_slide_inference():
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(48, 64, 32) == [0]
    assert window_starts(96, 64, 32) == [0, 32]
    assert window_starts(160, 64, 48) == [0, 48, 96]
    assert window_starts(592, 448, 224) == [0, 144]


def test_stitch_averages_overlaps():
    a = torch.full((1, 2, 1, 2), 1.0)
    b = torch.full((1, 2, 1, 2), 3.0)
    c = torch.full((1, 2, 1, 1), 8.0)
    out = stitch([(0, 0, a), (0, 1, b), (0, 2, c)], (1, 3))
    assert out[0, 0, 0].tolist() == [1.0, 2.0, (3.0 + 8.0) / 2]
    with pytest.raises(ValueError, match="uncovered"):
        stitch([(0, 0, a)], (1, 3))


def test_one_window_equals_whole(cache, vit_whole):
    gen = make("tiny_vit", cache, mode="slide", short_side=64, window=128, stride=64)
    img = torch.rand(1, 3, 64, 64)
    a, b = gen(img), vit_whole(img)
    for name in ("logits", "keys", "features", "image"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_slide_pads_an_unaligned_image_to_whole_patches(cache):
    """Windows run on the image zero-padded (after normalisation) at the bottom and right."""
    gen = make("tiny_resnet", cache, mode="slide", img_scale=None, window=64, stride=32)
    torch.manual_seed(7)
    img = torch.rand(1, 3, 70, 100)
    padded = gen.mean.expand(1, 3, 96, 128).clone()
    padded[..., :70, :100] = img
    a, b = gen(img), gen(padded)
    assert a.logits.shape == (1, 3, 3, 4) and a.keys.shape[-2:] == (3, 4)
    for name in ("logits", "keys", "features"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def test_slide_is_mean_of_window_outputs(cache, vit_whole):
    gen = make("tiny_vit", cache, mode="slide", short_side=64, window=64, stride=32)
    torch.manual_seed(6)
    img = torch.rand(2, 3, 64, 96)
    out = gen(img)
    left, right = vit_whole(img[..., :64]), vit_whole(img[..., 32:])
    for name in ("logits", "keys", "features"):  # features: the mean of the windows' unnormalised features
        want = torch.zeros_like(getattr(out, name))
        want[..., :4] += getattr(left, name)
        want[..., 2:] += getattr(right, name)
        want[..., 2:4] /= 2
        torch.testing.assert_close(getattr(out, name), want, atol=1e-5, rtol=1e-5)


def test_short_side_resize(cache):
    assert resized_size(375, 500, 448, 16) == (448, 592)
    assert resized_size(500, 375, 448, 14) == (602, 448)
    assert resized_size(64, 96, None, 16) == (64, 96)
    gen = make("tiny_resnet", cache, short_side=64, window=64, stride=32)
    out = gen(torch.rand(1, 3, 100, 150))
    assert out.image.shape == (1, 3, 64, 96) and out.logits.shape == (1, 3, 2, 3)
    assert 0 <= float(out.image.min()) and float(out.image.max()) <= 1


def test_keep_ratio_resize_is_plain_bilinear(cache):
    """mmcv's rescale: rounded keep-ratio size, OpenCV-style bilinear (half-pixel centres, no antialias)."""
    gen = make("tiny_vit", cache, img_scale=(520, 520))
    img = torch.rand(1, 3, 150, 203)
    out = gen(img)
    assert out.image.shape[-2:] == (384, 520)  # factor min(520 / 203, 520 / 150) = 2.5616
    want = F.interpolate(img, size=(384, 520), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.image, want)
    small = gen.resize(torch.rand(1, 3, 1040, 1040))  # downscaling: no antialiasing either
    assert small.shape[-2:] == (520, 520)


def test_the_generator_exposes_its_open_clip_model(vit_whole):
    assert isinstance(vit_whole.model, open_clip.CLIP)
    assert vit_whole.backbone.visual is vit_whole.model.visual


# ---------------------------------------------------------------- checkpoints and bad input


def test_local_checkpoint_loads(tmp_path, cache):
    torch.manual_seed(7)
    clip = open_clip.create_model("tiny_vit")
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    gen = build_generator("tiny_vit", str(path), NAMES, cache_dir=str(cache), short_side=64, window=64, stride=32)
    assert torch.equal(gen.backbone.visual.proj, clip.visual.proj)


def test_missing_checkpoint_path():
    with pytest.raises(FileNotFoundError, match="no_such_file.pt"):
        load_clip("tiny_vit", "/nowhere/no_such_file.pt")


def test_unknown_model():
    with pytest.raises(ValueError, match="not an open_clip model"):
        load_clip("ViT-Q-99", None)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"window": 60}, "window"),
        ({"stride": 40}, "stride"),
        ({"short_side": 70}, "short_side"),
        ({"stride": 128, "window": 64}, "stride"),
        ({"mode": "tiles"}, "mode"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"img_scale": [512]}, "img_scale"),
        ({"normalize": "clip"}, "normalize"),
        ({"act": "relu"}, "model.act"),
        ({"ln_eps": -1.0}, "model.ln_eps"),
    ],
)
def test_bad_generator_settings(cache, kw, match):
    settings = {"short_side": 64, "window": 64, "stride": 32, **kw}
    with pytest.raises(ValueError, match=match):
        make("tiny_vit", cache, **settings)


def test_image_smaller_than_patch(vit_whole):
    with pytest.raises(ValueError, match="10x200"):
        vit_whole(torch.rand(1, 3, 10, 200))
    with pytest.raises(ValueError, match="images"):
        vit_whole(torch.rand(3, 64, 64))
