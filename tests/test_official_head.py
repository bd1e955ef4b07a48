"""Dense features and keys against a float64 recomputation of MaskCLIP's official code.

The oracles below are written from chongzhou96/MaskCLIP (mmseg/models/backbones/vit.py with
return_qkv, mmseg/models/utils/embed.py's corner padding, mmseg/models/backbones/resnet.py's
ResNetClip, mmseg/models/decode_heads/maskclip_head.py) and read only the model's state_dict().
Every parameter is perturbed first, so biases, LayerNorm and BatchNorm statistics all matter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.generator import build_generator
from maskclip_apro.constants import IMAGENET_MEAN, IMAGENET_STD
from maskclip_apro.geometry import rescale_size

NAMES = ["background", "cat", "dog"]
ACTS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module")
def generators(cache):
    """Perturbed tiny generators, one per (model, act, ln_eps), built once."""
    built = {}

    def get(model, act=None, eps=None, **kw):
        key = (model, act, eps, tuple(sorted(kw.items())))
        if key not in built:
            gen = build_generator(model, None, NAMES, act=act, ln_eps=eps, cache_dir=str(cache), **kw)
            perturb(gen.backbone.visual, seed=len(built) + 1)
            built[key] = gen
        return built[key]

    return get


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Random offsets on every parameter and BatchNorm statistic (positive variances)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in module.state_dict().items() if v.is_floating_point()}


# ---------------------------------------------------------------- ViT, as mmseg's VisionTransformer


def layer_norm(x, sd, prefix, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def ffn(x, sd, p, act):
    h = ACTS[act](x @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def encoder_layer(x, sd, p, heads, act, eps):
    """TransformerEncoderLayer.forward(x, return_qkv=True) -> (x, q, k, v)."""
    n, length, c = x.shape
    w_out, b_out = sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"]
    qkv = layer_norm(x, sd, p + "ln_1", eps) @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    # return_qkv: q, k and v alike through the output projection; residual and FFN on v only
    # layer scale: an open_clip extension (1 for OpenAI's and MaskCLIP's models), on the residual branches
    g1, g2 = sd.get(p + "ls_1.gamma", 1.0), sd.get(p + "ls_2.gamma", 1.0)
    q, k, v = (t @ w_out.T + b_out for t in qkv.view(n, length, 3, c).unbind(2))
    v = x + g1 * v
    v = v + g2 * ffn(layer_norm(v, sd, p + "ln_2", eps), sd, p, act)
    # the layer's ordinary output: multi-head attention, then the FFN
    d = c // heads
    qh, kh, vh = (t.reshape(n, length, heads, d).transpose(1, 2) for t in qkv.view(n, length, 3, c).unbind(2))
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    x = x + g1 * ((attn @ vh).transpose(1, 2).reshape(n, length, c) @ w_out.T + b_out)
    x = x + g2 * ffn(layer_norm(x, sd, p + "ln_2", eps), sd, p, act)
    return x, q, k, v


def official_vit(visual, image, act, eps):
    """(features (B, D, h, w) before normalisation, keys (B, C, h, w)) from the official ViT + head."""
    sd = state(visual)
    patch = visual.patch_size[0]
    width = sd["class_embedding"].shape[0]
    heads = visual.transformer.resblocks[0].attn.num_heads
    layers = len(visual.transformer.resblocks)
    x = image.double()
    b, _, h, w = x.shape
    # AdaptivePadding(padding="corner"): zeros at the bottom and right up to whole patches
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    x = F.pad(x, [0, gw * patch - w, 0, gh * patch - h])
    tokens = F.conv2d(x, sd["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    tokens = torch.cat([sd["class_embedding"].expand(b, 1, width), tokens], dim=1)
    pos = sd["positional_embedding"][None]
    if tokens.shape[1] != pos.shape[1]:  # _pos_embeding resizes only when the token count differs
        n0 = math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:].reshape(1, n0, n0, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    tokens = layer_norm(tokens + pos, sd, "ln_pre", eps)  # pre_norm (norm0)
    for i in range(layers):
        tokens, q, k, v = encoder_layer(tokens, sd, f"transformer.resblocks.{i}.", heads, act, eps)
    v = layer_norm(v, sd, "ln_post", eps)  # final_norm applied to v
    to_map = lambda t: t[:, 1:].reshape(b, gh, gw, -1).permute(0, 3, 1, 2)  # noqa: E731
    feats = torch.einsum("bchw,cd->bdhw", to_map(v), sd["proj"])  # the head's 1x1 conv `proj`
    return feats, to_map(k)


@pytest.mark.parametrize(
    "act, eps, size", [("gelu", 1e-6, (64, 64)), ("gelu", 1e-6, (75, 101)), ("quick_gelu", 1e-5, (48, 80))]
)
def test_vit_features_and_keys_equal_the_official_code_in_float64(generators, act, eps, size):
    """Native grid (no position interpolation), odd sizes (corner padding, bicubic positions), both activations."""
    backbone = copy.deepcopy(generators("tiny_vit", act, eps).backbone).double()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    feats, keys = official_vit(backbone.visual, x, act, eps)
    ours_f, ours_k = backbone(x)
    assert ours_f.shape[-2:] == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    torch.testing.assert_close(ours_f, feats, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours_k, keys, atol=1e-10, rtol=1e-10)


def test_vit_layer_scale_applies_to_the_value_path_only(cache):
    """open_clip towers with layer scale: gamma on the value path's residual branches, not on the keys."""
    from open_clip.transformer import LayerScale

    gen = build_generator("tiny_vit", None, NAMES, img_scale=None, cache_dir=str(cache))
    for block in gen.backbone.visual.transformer.resblocks:
        block.ls_1, block.ls_2 = LayerScale(64, 1.0), LayerScale(64, 1.0)
    perturb(gen.backbone.visual, seed=9)
    backbone = copy.deepcopy(gen.backbone).double()
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    feats, keys = official_vit(backbone.visual, x, "gelu", 1e-5)
    ours_f, ours_k = backbone(x)
    torch.testing.assert_close(ours_f, feats, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours_k, keys, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- ResNet, as mmseg's ResNetClip


def batch_norm(x, sd, p):
    shape = (1, -1, 1, 1)
    scale = sd[p + ".weight"].view(shape) / torch.sqrt(sd[p + ".running_var"].view(shape) + 1e-5)
    return (x - sd[p + ".running_mean"].view(shape)) * scale + sd[p + ".bias"].view(shape)


def official_resnet_trunk(sd, x, layers):
    x = F.relu(batch_norm(F.conv2d(x, sd["conv1.weight"], stride=2, padding=1), sd, "bn1"))
    x = F.relu(batch_norm(F.conv2d(x, sd["conv2.weight"], padding=1), sd, "bn2"))
    x = F.relu(batch_norm(F.conv2d(x, sd["conv3.weight"], padding=1), sd, "bn3"))
    x = F.avg_pool2d(x, 2)  # style='clip' stem pool
    for i, blocks in enumerate(layers, start=1):
        for j in range(blocks):
            p = f"layer{i}.{j}."
            stride = 2 if i > 1 and j == 0 else 1
            out = F.relu(batch_norm(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
            out = F.relu(batch_norm(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2"))
            if stride > 1:
                out = F.avg_pool2d(out, stride)  # Bottleneck style='clip'
            out = batch_norm(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3")
            identity = x
            if p + "downsample.0.weight" in sd:  # avg_down: AvgPool2d(stride), 1x1 conv, BN
                pooled = F.avg_pool2d(x, stride) if stride > 1 else x
                identity = batch_norm(F.conv2d(pooled, sd[p + "downsample.0.weight"]), sd, p + "downsample.1")
            x = F.relu(out + identity)
    return x


def official_resnet(visual, image):
    """MaskClipHead, ResNet branch: feat = c_proj(v_proj(x)), k = k_proj(x), per position."""
    sd = state(visual)
    layers = [len(getattr(visual, f"layer{i}")) for i in range(1, 5)]
    x = official_resnet_trunk(sd, image.double(), layers)
    conv = lambda t, name: F.conv2d(t, sd[f"attnpool.{name}.weight"][:, :, None, None], sd[f"attnpool.{name}.bias"])  # noqa: E731
    return conv(conv(x, "v_proj"), "c_proj"), conv(x, "k_proj")


@pytest.mark.parametrize("size", [(64, 96), (75, 101), (33, 40)])
def test_resnet_features_and_keys_equal_the_official_code_in_float64(generators, size):
    """Multiples of 32 and odd sizes (the strided stages floor, as ResNetClip's)."""
    backbone = copy.deepcopy(generators("tiny_resnet").backbone).double()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    feats, keys = official_resnet(backbone.visual, x)
    ours_f, ours_k = backbone(x)
    assert ours_f.shape[-2:] == feats.shape[-2:] == backbone.grid(*size)
    assert ours_k.shape[1] == backbone.visual.attnpool.k_proj.in_features  # trunk width, no c_proj
    torch.testing.assert_close(ours_f, feats, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours_k, keys, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- the whole generator (float32)


@pytest.mark.parametrize("model", ["tiny_vit", "tiny_resnet"])
def test_generator_logits_are_the_official_cosine_on_the_keep_ratio_image(generators, model):
    """Keep-ratio resize, ImageNet normalisation, dense features, cosine to the text: as mmseg's test path."""
    gen = generators(model, "gelu", 1e-6, img_scale=(120, 80))
    image = torch.rand(1, 3, 75, 101, generator=torch.Generator().manual_seed(6))
    out = gen(image)
    size = rescale_size(75, 101, (120, 80))
    resized = F.interpolate(image.double(), size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    normed = (resized - mean) / std
    if model == "tiny_vit":
        feats, keys = official_vit(gen.backbone.visual, normed, "gelu", 1e-6)
    else:
        feats, keys = official_resnet(gen.backbone.visual, normed)
    unit = F.normalize(feats, dim=1)
    text = gen.classifier.embeddings.double()  # one name per class here
    cosine = torch.einsum("bdhw,kd->bkhw", unit, text)
    assert out.image.shape[-2:] == size
    torch.testing.assert_close(out.features.double(), feats, atol=1e-4, rtol=1e-4)  # before normalisation
    torch.testing.assert_close(out.keys.double(), keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits.double(), 100.0 * cosine, atol=1e-3, rtol=1e-4)
