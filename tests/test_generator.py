"""MaskCLIP generator: dense ViT/ResNet paths against hand-written oracles, windows, bad input."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale

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
    return make("tiny_vit", cache, mode="whole", short_side=None)


@pytest.fixture(scope="module")
def rn_whole(cache):
    return make("tiny_resnet", cache, mode="whole", short_side=None)


# ---------------------------------------------------------------- hand-written oracles (float64)


def _ln(x, sd, prefix):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _mlp(x, sd, p):
    h = _gelu(x @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def _gamma(sd, key, width):
    return sd.get(key, torch.ones(width, dtype=torch.float64))


def _full_block(x, sd, p, heads):
    width = x.shape[-1]
    y = _ln(x, sd, p + "ln_1")
    qkv = y @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = qkv.split(width, dim=-1)
    b, n, _ = x.shape
    dh = width // heads
    q, k, v = (t.reshape(b, n, heads, dh).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(b, n, width)
    o = o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    x = x + _gamma(sd, p + "ls_1.gamma", width) * o
    return x + _gamma(sd, p + "ls_2.gamma", width) * _mlp(_ln(x, sd, p + "ln_2"), sd, p)


def vit_oracle(visual, x):
    """Design 2 from the state dict: tower to the last block, value path there, ln_post, proj."""
    sd = {k: v.double() for k, v in visual.state_dict().items()}
    x = x.double()
    patch = visual.patch_size[0]
    width = sd["class_embedding"].shape[0]
    heads = visual.transformer.resblocks[0].attn.num_heads
    layers = len(visual.transformer.resblocks)
    b, _, h, w = x.shape
    gh, gw = h // patch, w // patch
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, -1)
    t = patches @ sd["conv1.weight"].reshape(width, -1).T
    pos = sd["positional_embedding"]
    n0 = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, n0, n0, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, width)])
    t = torch.cat([sd["class_embedding"].expand(b, 1, width), t], dim=1) + pos
    t = _ln(t, sd, "ln_pre")
    for i in range(layers - 1):
        t = _full_block(t, sd, f"transformer.resblocks.{i}.", heads)
    p = f"transformer.resblocks.{layers - 1}."
    x = t[:, 1:]
    y = _ln(x, sd, p + "ln_1")
    w_in, b_in = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    keys = y @ w_in[width : 2 * width].T + b_in[width : 2 * width]
    val = y @ w_in[2 * width :].T + b_in[2 * width :]
    val = val @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    v = x + _gamma(sd, p + "ls_1.gamma", width) * val
    v = v + _gamma(sd, p + "ls_2.gamma", width) * _mlp(_ln(v, sd, p + "ln_2"), sd, p)
    feats = _ln(v, sd, "ln_post") @ sd["proj"]
    to_map = lambda z: z.transpose(1, 2).reshape(b, -1, gh, gw)  # noqa: E731
    return to_map(feats), to_map(keys)


def normalise(gen, img):
    return (img - gen.mean) / gen.std


def expected_logits(gen, unit_feats):
    return gen.logit_scale * torch.einsum("bdhw,kd->bkhw", unit_feats.float(), gen.classifier.embeddings)


# ---------------------------------------------------------------- ViT


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (48, 80)])
def test_vit_value_path_matches_oracle(vit_whole, size):
    torch.manual_seed(1)
    img = torch.rand(2, 3, *size)
    out = vit_whole(img)
    feats, keys = vit_oracle(vit_whole.backbone.visual, normalise(vit_whole, img))
    unit = F.normalize(feats, dim=1)
    assert isinstance(out, GeneratorOutput)
    assert out.logits.shape == (2, 3, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(out.features, unit.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.keys, keys.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, expected_logits(vit_whole, unit), atol=2e-3, rtol=1e-4)
    assert torch.equal(out.image, img)


def test_vit_layer_scale_is_applied(cache):
    gen = make("tiny_vit", cache, mode="whole", short_side=None)
    last = gen.backbone.visual.transformer.resblocks[-1]
    torch.manual_seed(2)
    last.ls_1, last.ls_2 = LayerScale(64, 0.5), LayerScale(64, 0.5)
    last.ls_1.gamma.data.uniform_(0.2, 2.0)
    last.ls_2.gamma.data.uniform_(0.2, 2.0)
    img = torch.rand(1, 3, 64, 64)
    feats, keys = vit_oracle(gen.backbone.visual, normalise(gen, img))
    out = gen(img)
    torch.testing.assert_close(out.features, F.normalize(feats, dim=1).float(), atol=2e-5, rtol=1e-4)


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
    assert out.keys is None and out.logits.shape == (1, 3, 2, 3) and rn_whole.patch_size == 32
    backbone = rn_whole.backbone
    trunk = backbone.trunk(normalise(rn_whole, img)).double()
    sd = {k: v.double() for k, v in backbone.visual.attnpool.state_dict().items()}
    v = torch.einsum("oe,behw->bohw", sd["v_proj.weight"], trunk) + sd["v_proj.bias"][:, None, None]
    c = torch.einsum("oe,behw->bohw", sd["c_proj.weight"], v) + sd["c_proj.bias"][:, None, None]
    unit = F.normalize(c, dim=1)
    torch.testing.assert_close(out.features, unit.float(), atol=2e-5, rtol=1e-4)
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


def test_slide_is_mean_of_window_outputs(cache, vit_whole):
    gen = make("tiny_vit", cache, mode="slide", short_side=64, window=64, stride=32)
    torch.manual_seed(6)
    img = torch.rand(2, 3, 64, 96)
    out = gen(img)
    left, right = vit_whole(img[..., :64]), vit_whole(img[..., 32:])
    for name in ("logits", "keys"):
        want = torch.zeros_like(getattr(out, name))
        want[..., :4] += getattr(left, name)
        want[..., 2:] += getattr(right, name)
        want[..., 2:4] /= 2
        torch.testing.assert_close(getattr(out, name), want, atol=1e-5, rtol=1e-5)
    feats = torch.zeros_like(out.features)
    feats[..., :4] += left.features
    feats[..., 2:] += right.features
    torch.testing.assert_close(out.features, F.normalize(feats, dim=1), atol=1e-6, rtol=1e-5)


def test_short_side_resize(cache):
    assert resized_size(375, 500, 448, 16) == (448, 592)
    assert resized_size(500, 375, 448, 14) == (602, 448)
    assert resized_size(64, 96, None, 16) == (64, 96)
    gen = make("tiny_resnet", cache, short_side=64, window=64, stride=32)
    out = gen(torch.rand(1, 3, 100, 150))
    assert out.image.shape == (1, 3, 64, 96) and out.logits.shape == (1, 3, 2, 3)
    assert 0 <= float(out.image.min()) and float(out.image.max()) <= 1


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
