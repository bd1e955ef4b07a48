"""Dense last-block attention forms (vanilla, maskclip, sclip, clearclip, naclip, proxyclip) against
open_clip itself, per-head loop recomputations from state_dict() (float64) and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.generator.dense_attention import (
    ATTENTION_MODES,
    dense_last_block,
    last_block_tokens,
    naclip_omega,
    proxy_attention,
    sclip_attention,
)
from maskclip_apro.generator.models import load_clip
from maskclip_apro.generator.pos_embed import interpolate_pos_embed_offset, resample_patch_pos
from maskclip_apro.generator.vit import ViTDense

GRID = (4, 3)  # tiny_vit: patch 16, native grid 4x4, width 64, 2 heads


@pytest.fixture(scope="module")
def visual():
    clip, _ = load_clip("tiny_vit", None)
    return clip.visual.double().eval()


def tokens_into_last_block(visual, images):
    """The tokens open_clip feeds its own last block (captured by a hook), and open_clip's output tokens."""
    seen = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
        hook.remove()
    return seen["x"], tokens


def random_tokens(visual, grid=GRID, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = visual.class_embedding.shape[0]
    return torch.randn(batch, 1 + grid[0] * grid[1], width, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- hand-written oracle (loops over batch and heads)


def _softmax(s):
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _ln(x, sd, name, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _bilinear_matrix(n_out, n_in):
    """(n_out, n_in) weights of a 1-D bilinear resize, half-pixel centres, edges clamped."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def oracle(visual, x, grid, mode, sigma=5.0, feats=None, beta=1.2, gamma=3.0):
    """Patch outputs after ln_post / proj, (B, h*w, D), computed head by head from the state dict."""
    sd = {k: v.double() for k, v in visual.state_dict().items()}
    p = f"transformer.resblocks.{len(visual.transformer.resblocks) - 1}."
    heads = visual.transformer.resblocks[-1].attn.num_heads
    c = x.shape[-1]
    d = c // heads
    w_in, b_in = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    w_out, b_out = sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"]
    gh, gw = grid
    n = gh * gw
    out = []
    for b in range(x.shape[0]):
        y = _ln(x[b], sd, p + "ln_1")
        head_out = []
        for h in range(heads):
            rows = slice(h * d, (h + 1) * d)
            q = y @ w_in[:c][rows].T + b_in[:c][rows]
            k = y @ w_in[c : 2 * c][rows].T + b_in[c : 2 * c][rows]
            v = y @ w_in[2 * c :][rows].T + b_in[2 * c :][rows]
            s = 1.0 / math.sqrt(d)
            if mode == "vanilla":
                a = _softmax(s * q @ k.T)
            elif mode == "maskclip":
                a = torch.eye(1 + n, dtype=torch.float64)
            elif mode == "sclip":
                a = _softmax(s * q @ q.T) + _softmax(s * k @ k.T)
            elif mode == "clearclip":
                a = _softmax(s * q @ q.T)
            elif mode == "naclip":
                omega = torch.zeros(1 + n, 1 + n, dtype=torch.float64)
                for i in range(n):
                    for j in range(n):
                        dy, dx = i // gw - j // gw, i % gw - j % gw
                        omega[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
                a = _softmax(s * k @ k.T + omega)
            if mode == "proxyclip":
                fh, fw = feats.shape[-2:]
                f = feats[b].reshape(feats.shape[1], -1).T
                f = f / f.norm(dim=1, keepdim=True)
                sim = f @ f.T
                sim = gamma * (sim - beta * sim.mean())
                sim[sim < 0] = float("-inf")
                a = _softmax(sim)
                ry, rx = _bilinear_matrix(fh, gh), _bilinear_matrix(fw, gw)
                vp = v[1:].T.reshape(d, gh, gw)
                v_up = torch.stack([ry @ vp[ch] @ rx.T for ch in range(d)]).reshape(d, -1).T
                head_out.append(a @ v_up)
            else:
                head_out.append((a @ v)[1:])
        o = torch.cat(head_out, dim=-1) @ w_out.T + b_out
        if mode in ("vanilla", "maskclip", "sclip"):
            z = x[b, 1:] + o
            hidden = _ln(z, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
            hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
            z = z + hidden @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        else:
            z = o
        out.append(_ln(z, sd, "ln_post") @ sd["proj"])
    return torch.stack(out)


def as_tokens(maps):
    return maps.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------- anchors


def test_vanilla_equals_open_clip_output_tokens(visual):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    x, tokens = tokens_into_last_block(visual, images)
    feats, keys = dense_last_block(visual, x, (4, 4), "vanilla")
    assert feats.shape == (2, visual.proj.shape[1], 4, 4) and keys.shape == (2, 64, 4, 4)
    torch.testing.assert_close(as_tokens(feats), tokens @ visual.proj, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", [m for m in ATTENTION_MODES if m != "proxyclip"])
def test_mode_matches_per_head_oracle(visual, mode):
    x = random_tokens(visual)
    feats, _ = dense_last_block(visual, x, GRID, mode, sigma=1.5)
    torch.testing.assert_close(as_tokens(feats), oracle(visual, x, GRID, mode, sigma=1.5), atol=1e-10, rtol=1e-10)


def test_proxyclip_matches_per_head_oracle(visual):
    x = random_tokens(visual)
    feats_vfm = torch.randn(2, 5, 7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    feats, keys = dense_last_block(visual, x, GRID, "proxyclip", vfm_features=feats_vfm, beta=0.5, gamma=2.0)
    assert feats.shape[-2:] == (7, 5) and keys.shape[-2:] == (7, 5)
    want = oracle(visual, x, GRID, "proxyclip", feats=feats_vfm, beta=0.5, gamma=2.0)
    torch.testing.assert_close(as_tokens(feats), want, atol=1e-10, rtol=1e-10)


def test_keys_are_out_projected_patch_keys(visual):
    x = random_tokens(visual)
    last = visual.transformer.resblocks[-1]
    c = x.shape[-1]
    raw = last.ln_1(x) @ last.attn.in_proj_weight[c : 2 * c].T + last.attn.in_proj_bias[c : 2 * c]
    want = raw[:, 1:] @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    for mode in ("vanilla", "sclip", "naclip"):
        _, keys = dense_last_block(visual, x, GRID, mode)
        torch.testing.assert_close(as_tokens(keys), want, atol=1e-12, rtol=1e-12)


def todays_vit_dense(visual, x):
    """The generator's ViT forward before the dense modes were wired in (transcribed from its code):
    corner padding, size-driven bicubic positional embeddings, blocks[:-1], then the value path."""
    from maskclip_apro.generator.vit import interpolate_pos_embed, pad_to_multiple

    tokens = visual.conv1(pad_to_multiple(x, 16))
    b, c, gh, gw = tokens.shape
    tokens = tokens.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(tokens.dtype).expand(b, 1, c)
    pos = interpolate_pos_embed(visual.positional_embedding, tuple(visual.grid_size), (gh, gw))
    tokens = visual.ln_pre(torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype))
    for block in visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    last = visual.transformer.resblocks[-1]
    patches = tokens[:, 1:]
    y = last.ln_1(patches)
    _, w_k, w_v = last.attn.in_proj_weight.chunk(3)
    _, b_k, b_v = last.attn.in_proj_bias.chunk(3)
    keys = last.attn.out_proj(F.linear(y, w_k, b_k))
    out = patches + last.ls_1(last.attn.out_proj(F.linear(y, w_v, b_v)))
    out = out + last.ls_2(last.mlp(last.ln_2(out)))
    feats = visual.ln_post(out) @ visual.proj
    return feats.transpose(1, 2).reshape(b, -1, gh, gw), keys.transpose(1, 2).reshape(b, -1, gh, gw)


def test_maskclip_mode_is_todays_generator_bit_for_bit(tmp_path):
    """model.dense=maskclip (the default) gives the generator's features, keys and logits as they were."""
    from maskclip_apro.config import build_generator_from_config, compose

    cfg = compose("compare", ["model=tiny_vit", "model.short_side=null", "generator.img_scale=[96, 64]",
                              f"generator.cache_dir={tmp_path}"])
    gen = build_generator_from_config(cfg, ["cat", "dog", "grass"])
    assert gen.backbone.mode == "maskclip" and gen.backbone.pos_interp == "size" and gen.name == "MaskCLIP"
    torch.manual_seed(2)
    image = torch.rand(2, 3, 50, 70)
    out = gen(image)
    with torch.no_grad():
        feats, keys = todays_vit_dense(gen.backbone.visual, (out.image - gen.mean) / gen.std)
    assert torch.equal(out.features, feats) and torch.equal(out.keys, keys)
    assert torch.equal(out.logits, gen.classifier(F.normalize(feats, dim=1), gen.logit_scale))

    seen = {}  # and ViTDense is dense_last_block on the tokens it feeds the last block
    visual = gen.backbone.visual
    hook = visual.transformer.resblocks[-2].register_forward_hook(lambda m, args, o: seen.setdefault("x", o))
    try:
        want_feats, want_keys = ViTDense(visual)(torch.randn(2, 3, 64, 48))
    finally:
        hook.remove()
    feats, keys = dense_last_block(visual, seen["x"], (4, 3), "maskclip")
    assert torch.equal(feats, want_feats) and torch.equal(keys, want_keys)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip"])
def test_vitdense_runs_each_mode_on_the_tokens_it_builds(visual, mode):
    dense = ViTDense(visual, mode, pos_interp="offset", remainder="drop", naclip_sigma=1.5)
    images = torch.randn(2, 3, 50, 75, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    feats, _ = dense(images)
    assert feats.shape[-2:] == dense.grid(50, 75) == (3, 4)  # the remainder past whole patches is dropped
    x, grid = dense.tokens(images[..., :48, :64])
    assert grid == (3, 4)
    pos = interpolate_pos_embed_offset(visual.positional_embedding, (4, 4), (3, 4))
    stem = visual.conv1(images[..., :48, :64]).flatten(2).transpose(1, 2)
    first = visual.ln_pre(torch.cat([visual.class_embedding.expand(2, 1, -1), stem], 1) + pos)
    torch.testing.assert_close(x, visual.transformer.resblocks[0](first), atol=1e-12, rtol=0)
    torch.testing.assert_close(as_tokens(feats), oracle(visual, x, grid, mode, sigma=1.5), atol=1e-10, rtol=1e-10)


def test_dense_backbone_settings_are_checked(visual):
    from maskclip_apro.generator.build import build_dense_backbone
    from maskclip_apro.generator.models import load_clip as load

    with pytest.raises(ValueError, match="model.dense must be one of"):
        ViTDense(visual, "gem")
    with pytest.raises(ValueError, match="pos_interp"):
        ViTDense(visual, pos_interp="nearest")
    with pytest.raises(ValueError, match="model.vfm"):
        ViTDense(visual, "proxyclip")
    with pytest.raises(ValueError, match="naclip_sigma"):
        ViTDense(visual, "naclip", naclip_sigma=0)
    with pytest.raises(ValueError, match="model.proxy takes beta and gamma"):
        build_dense_backbone(visual, "sclip", proxy={"delta": 1})
    resnet, _ = load("tiny_resnet", None)
    with pytest.raises(ValueError, match="ResNet tower has none"):
        build_dense_backbone(resnet.visual, "naclip")
    assert build_dense_backbone(resnet.visual, "maskclip").patch_size == 32


# ---------------------------------------------------------------- invariants


def test_sclip_rows_sum_to_two():
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a = sclip_attention(q, k)
    torch.testing.assert_close(a.sum(-1), torch.full((2, 3, 13), 2.0, dtype=torch.float64), atol=1e-14, rtol=0)


def naclip_construction(grid, sigma):
    """Omega as NACLIP builds it: a (2gh-1, 2gw-1) Gaussian window, convolved ('same') with one-hot maps."""
    gh, gw = grid
    c = 1.0 / (sigma * math.sqrt(2))
    ys = torch.linspace(-(gh - 1) * c, (gh - 1) * c, 2 * gh - 1, dtype=torch.float64)
    xs = torch.linspace(-(gw - 1) * c, (gw - 1) * c, 2 * gw - 1, dtype=torch.float64)
    window = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2))
    onehot = torch.eye(gh * gw, dtype=torch.float64).reshape(gh * gw, 1, gh, gw)
    out = F.conv2d(onehot, window[None, None], padding="same").reshape(gh * gw, gh * gw)
    full = torch.zeros(1 + gh * gw, 1 + gh * gw, dtype=torch.float64)
    full[1:, 1:] = out
    return full


@pytest.mark.parametrize("grid,sigma", [((4, 3), 5.0), ((5, 7), 1.3), ((1, 6), 2.0)])
def test_naclip_omega_closed_form_and_invariants(grid, sigma):
    omega = naclip_omega(grid, sigma)
    torch.testing.assert_close(omega, naclip_construction(grid, sigma), atol=1e-14, rtol=0)
    assert torch.equal(omega, omega.T)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    assert torch.all(omega.diagonal()[1:] == 1)
    gw = grid[1]
    i, j = 1, grid[0] * gw - 1  # first and last patch
    dy, dx = (i - 1) // gw - j // gw, (i - 1) % gw - j % gw
    assert omega[i, 1 + j].item() == pytest.approx(math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma)), rel=1e-15)


def test_proxy_one_hot_features_give_identity_and_value_path(visual):
    """VFM features one-hot per CLIP patch on the CLIP grid: S = I, A = I, output = value path without residual."""
    x = random_tokens(visual)
    n = GRID[0] * GRID[1]
    onehot = torch.eye(n, dtype=torch.float64).T.reshape(1, n, *GRID).expand(2, -1, -1, -1)
    assert torch.equal(proxy_attention(onehot)[:, 0], torch.eye(n, dtype=torch.float64).expand(2, -1, -1))
    feats, _ = dense_last_block(visual, x, GRID, "proxyclip", vfm_features=onehot)
    last = visual.transformer.resblocks[-1]
    c = x.shape[-1]
    value = last.attn.out_proj(last.ln_1(x)[:, 1:] @ last.attn.in_proj_weight[2 * c :].T + last.attn.in_proj_bias[2 * c :])
    torch.testing.assert_close(as_tokens(feats), visual.ln_post(value) @ visual.proj, atol=1e-12, rtol=1e-12)


def test_proxy_region_constant_features_give_region_constant_output(visual):
    x = random_tokens(visual)
    region = torch.zeros(6, 4, dtype=torch.long)
    region[:3, :2], region[3:, 1:] = 1, 2
    codes = torch.eye(3, dtype=torch.float64)[region].permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    feats, _ = dense_last_block(visual, x, GRID, "proxyclip", vfm_features=codes)
    assert feats.shape[-2:] == (6, 4)
    for r in range(3):
        inside = feats[:, :, region == r]
        torch.testing.assert_close(inside, inside[..., :1].expand_as(inside), atol=1e-12, rtol=0)
    assert not torch.allclose(feats[:, :, 0, 0], feats[:, :, 5, 3])


def test_proxy_fully_masked_row_keeps_its_own_token():
    """A uniform map: mean(S) = 1 > 1/beta masks everything; each token attends to itself (no NaN)."""
    uniform = torch.ones(1, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(proxy_attention(uniform)[0, 0], torch.eye(9, dtype=torch.float64))


# ---------------------------------------------------------------- positional embedding (SCLIP-family rule)


def _cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_matrix(n_out, n_in, scale):
    """(n_out, n_in) 1-D bicubic weights sampling the source at (i + 0.5) / scale - 0.5, taps clamped."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += _cubic(src - tap)
    return m


@pytest.mark.parametrize("grid", [(21, 28), (7, 5), (14, 15)])
def test_offset_pos_interpolation_samples_at_g_plus_0_1(grid):
    g = torch.Generator().manual_seed(4)
    pos = torch.randn(1 + 14 * 14, 3, generator=g)
    out = interpolate_pos_embed_offset(pos, (14, 14), grid)
    assert out.shape == (1 + grid[0] * grid[1], 3) and torch.equal(out[0], pos[0])
    ry = _bicubic_matrix(grid[0], 14, (grid[0] + 0.1) / 14)
    rx = _bicubic_matrix(grid[1], 14, (grid[1] + 0.1) / 14)
    src = pos[1:].double().reshape(14, 14, 3)
    want = torch.einsum("ai,ijc,bj->abc", ry, src, rx).reshape(-1, 3)
    torch.testing.assert_close(out[1:].double(), want, atol=2e-5, rtol=1e-5)


def test_offset_pos_interpolation_is_identity_at_native_grid_and_differs_elsewhere():
    from maskclip_apro.generator.vit import interpolate_pos_embed

    pos = torch.randn(1 + 14 * 14, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(interpolate_pos_embed_offset(pos, (14, 14), (14, 14)), pos)
    a, b = interpolate_pos_embed_offset(pos, (14, 14), (21, 21)), interpolate_pos_embed(pos, (14, 14), (21, 21))
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3


def test_resample_patch_pos_size_mode_is_plain_resize():
    pos = torch.randn(16, 4, generator=torch.Generator().manual_seed(6))
    out = resample_patch_pos(pos, (4, 4), (6, 5), offset=0.0, antialias=False)
    grid = pos.reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(30, 4)
    assert torch.equal(out, want)


# ---------------------------------------------------------------- bad input


def test_bad_mode_and_shapes(visual):
    x = random_tokens(visual)
    with pytest.raises(ValueError, match="dense mode"):
        dense_last_block(visual, x, GRID, "gem")
    with pytest.raises(ValueError, match="4x4"):
        dense_last_block(visual, x, (4, 4), "sclip")
    with pytest.raises(ValueError, match="vfm_features"):
        dense_last_block(visual, x, GRID, "proxyclip")
    with pytest.raises(ValueError, match="vfm_features"):
        dense_last_block(visual, x, GRID, "naclip", vfm_features=torch.zeros(2, 3, 4, 3))
    with pytest.raises(ValueError, match="sigma"):
        dense_last_block(visual, x, GRID, "naclip", sigma=0.0)
    with pytest.raises(ValueError, match="ResidualAttentionBlock"):
        last_block_tokens("vanilla", torch.nn.Linear(2, 2), x, GRID)
