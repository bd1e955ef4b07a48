"""ProxyCLIP's vision foundation model (VFM): a timm ViT whose patch features drive the proxy attention.

ProxyCLIP (`proxyclip_segmentor.py`, `forward_feature`) feeds the VFM the same crop as CLIP,
re-normalised with the ImageNet mean / std, and takes the output tokens of the last block after
the final LayerNorm (DINO's `get_intermediate_layers(x)[0]`, DINOv2's
`get_intermediate_layers(x, reshape=True)[0]`), patch tokens only (class and register tokens
dropped). The queries, keys and values it hooks are not used.

Positional embeddings follow each model's own hub code: DINO (and DINOv2 without registers)
resample with the scale factor (g + 0.1) / M, bicubic, no antialiasing; DINOv2 with registers
resamples to the size, bicubic, antialiased (maskclip_apro.generator.pos_embed).

    vfm = load_vfm("vit_base_patch8_224.dino", pretrained=True)   # timm downloads the weights
    feats = vfm(images)   # images (B, 3, H, W) RGB in [0, 1] -> (B, C, H/8, W/8)
    values = vfm.values(images)   # the last block's attention values (LPOSS's affinity features)
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .pos_embed import POS_OFFSET, resample_patch_pos

DEFAULT_VFM = "vit_base_patch8_224.dino"
DINOV2_VFM = "vit_base_patch14_reg4_dinov2.lvd142m"
LPOSS_VFM = "vit_base_patch16_224.dino"  # LPOSS: DINO ViT-B/16, last-block values
# Random-weight test models (no download): a timm architecture and its small dimensions.
TINY_VFMS = {
    "tiny_dino": ("vit_base_patch8_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2)),
    "tiny_dinov2_reg": ("vit_base_patch14_reg4_dinov2", dict(img_size=28, embed_dim=32, depth=2, num_heads=2)),
    "tiny_dino16": ("vit_base_patch16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2)),
}


class VFMBackbone(nn.Module):
    """RGB images in [0, 1] (B, 3, H, W), H and W multiples of the patch size -> patch features (B, C, H/p, W/p)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer) or model.pos_embed is None:
            raise ValueError(
                f"the VFM must be a timm VisionTransformer with absolute position embeddings, got {type(model).__name__}"
            )
        ph, pw = model.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"non-square VFM patches {model.patch_embed.patch_size} are not supported")
        self.model = model
        self.patch_size = int(ph)
        self.native = tuple(int(g) for g in model.patch_embed.grid_size)
        registers = model.reg_token is not None
        self.pos_offset = 0.0 if registers else POS_OFFSET
        self.pos_antialias = registers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tokens entering the first block (B, prefix + h*w, C) and the patch grid (h, w)."""
        m = self.model
        p = self.patch_size
        b, _, h, w = images.shape
        if h % p or w % p:
            raise ValueError(f"VFM input {h}x{w} is not a multiple of its patch size {p}")
        x = m.patch_embed(((images - self.mean) / self.std).to(m.pos_embed.dtype))
        if x.dim() == 3:  # a model built without dynamic_img_size flattens the grid
            x = x.reshape(b, h // p, w // p, -1)
        grid = (h // p, w // p)
        c = x.shape[-1]
        x = x.reshape(b, grid[0] * grid[1], c)
        pos = m.pos_embed[0]
        lead = 0 if m.no_embed_class else m.num_prefix_tokens
        patch_pos = resample_patch_pos(pos[lead:], self.native, grid, self.pos_offset, self.pos_antialias)
        prefix = []
        if m.cls_token is not None:
            prefix.append(m.cls_token.expand(b, -1, -1))
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(b, -1, -1))
        if m.no_embed_class:
            x = torch.cat([*prefix, x + patch_pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + torch.cat([pos[:lead], patch_pos])
        return m.norm_pre(m.patch_drop(m.pos_drop(x))), grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, grid = self.tokens(images)
        x = m.norm(m.blocks(x))
        return x[:, m.num_prefix_tokens :].transpose(1, 2).reshape(x.shape[0], -1, *grid)

    def values(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's attention values of the patch tokens (B, C, h, w), heads concatenated.

        What LPOSS hooks on DINO (`models/lposs/lposs.py`, enc_type_feats "v"): the last third of
        the last block's qkv projection of its LayerNorm'd input, class and register tokens dropped.
        """
        m = self.model
        x, grid = self.tokens(images)
        for block in m.blocks[:-1]:
            x = block(x)
        last = m.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))
        c = qkv.shape[-1] // 3
        v = qkv[:, m.num_prefix_tokens :, 2 * c :]
        return v.transpose(1, 2).reshape(x.shape[0], c, *grid)


def load_vfm(
    name: str = DEFAULT_VFM, pretrained: Union[bool, str, None] = True, device: Union[str, torch.device] = "cpu"
) -> VFMBackbone:
    """A VFM in eval mode.

    name: a timm model name with its pretrained tag (default DINO ViT-B/8,
    "vit_base_patch8_224.dino"; DINOv2 ViT-B/14 with registers,
    "vit_base_patch14_reg4_dinov2.lvd142m"), or a tiny test model (TINY_VFMS).
    pretrained: True -> the tag's weights (timm downloads them on first use); a path -> a local
    checkpoint (a timm or official DINO / DINOv2 state dict); None or False -> random weights
    from a fixed seed (nothing downloads).
    """
    import timm

    if name in TINY_VFMS:
        arch, kwargs = TINY_VFMS[name]
        if pretrained is True:
            raise ValueError(f"the tiny test VFM {name!r} has no pretrained weights (pretrained=None or a file)")
    else:
        arch, kwargs = name, {}
        if not timm.is_model(name.split(".")[0]):
            raise ValueError(f"VFM {name!r} is not a timm model name (e.g. {DEFAULT_VFM}, {DINOV2_VFM})")
    options = dict(kwargs, num_classes=0, dynamic_img_size=True)
    if pretrained is None or pretrained is False:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, **options)
    elif pretrained is True:
        model = timm.create_model(arch, pretrained=True, **options)
    else:
        path = Path(str(pretrained)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"VFM checkpoint file {str(path)!r} not found; pass a local timm / DINO state dict, "
                f"or pretrained=True to download the weights of {name!r}"
            )
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **options)
    return VFMBackbone(model).to(device).eval()

