"""Dense features and keys from an open_clip VisionTransformer, in any of the last-block modes.

The tower runs unchanged up to the last block, which dense_attention.dense_last_block rebuilds
in the chosen mode (docs/generators.md). In the default mode "maskclip" the query-key
attention is replaced by its value path, keeping residual and MLP as MaskCLIP's official code
does (chongzhou96/MaskCLIP, mmseg/models/backbones/vit.py, `return_qkv`):
    v = x + ls1(W_out (W_v LN1(x) + b_v) + b_out)
    v = v + ls2(MLP(LN2(v)))
then ln_post and the projection, per patch token. The keys for key smoothing go through the
same output projection, with no residual, MLP or final norm (the official code projects q, k
and v alike and adds the residual to v only):
    k = W_out (W_k LN1(x) + b_k) + b_out

Input sizes that are not a multiple of the patch size p:
- remainder="pad" (MaskCLIP's protocol): zero-padded at the bottom and right to the next
  multiple (mmseg's PatchEmbed with padding="corner"), after normalisation, so the padding is
  the normalisation mean; the grid is ceil(H / p) x ceil(W / p).
- remainder="drop" (the SCLIP-family harness): the stride-p patch convolution ignores the last
  H mod p rows and W mod p columns, as CLIP's own conv1 does; the grid is floor(H / p) x floor(W / p).

Positional embeddings: pos_interp="size" resizes them bicubically (align_corners=False, no
antialias, mmseg's resize_pos_embed) to the grid; "offset" uses the SCLIP-family rule with the
scale factor (g + 0.1) / M (pos_embed.py). Both leave the native grid unchanged.

ProxyCLIP's mode needs a vision foundation model (vfm.VFMBackbone): it sees the same input
un-normalised with the generator's mean / std (it applies its own normalisation), cut to a
multiple of its own patch size; with remainder="pad" it sees the padded input, so both grids
cover the same pixels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from .dense_attention import ATTENTION_MODES, NACLIP_SIGMA, PROXY_BETA, PROXY_GAMMA, check_last_block, dense_last_block
from .pos_embed import interpolate_pos_embed_offset

POS_INTERPOLATIONS = ("size", "offset")
REMAINDERS = ("pad", "drop")


def interpolate_pos_embed(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh0*gw0, C) positional embedding (class token first) -> (1 + gh*gw, C), bicubic."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    c = pos.shape[1]
    patch_pos = patch_pos.reshape(1, native[0], native[1], c).permute(0, 3, 1, 2)
    work = torch.promote_types(pos.dtype, torch.float32)  # half precision is interpolated in float32
    patch_pos = F.interpolate(patch_pos.to(work), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], c).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right so that H and W are multiples of `multiple`."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) without its last H mod `multiple` rows and W mod `multiple` columns."""
    h, w = x.shape[-2] // multiple * multiple, x.shape[-1] // multiple * multiple
    if min(h, w) == 0:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than one {multiple}x{multiple} patch")
    return x[..., :h, :w]


class ViTDense(nn.Module):
    """(B, 3, H, W) normalised image -> features (B, D, h, w) (not normalised), keys (B, C, h, w).

    The grid (h, w) is the patch grid of the input (module doc), or the VFM's for proxyclip.
    mode: a dense_attention.ATTENTION_MODES entry; naclip_sigma (patches), proxy_beta /
    proxy_gamma and vfm (with the mean / std the input was normalised with) feed the modes that
    use them.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        mode: str = "maskclip",
        *,
        pos_interp: str = "size",
        remainder: str = "pad",
        naclip_sigma: float = NACLIP_SIGMA,
        proxy_beta: float = PROXY_BETA,
        proxy_gamma: float = PROXY_GAMMA,
        vfm: Optional[nn.Module] = None,
        mean: Optional[torch.Tensor] = None,
        std: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise ValueError("ViT towers with an attentional pooler or without a projection are not supported")
        check_last_block(visual.transformer.resblocks[-1])
        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {visual.patch_size} are not supported")
        if mode not in ATTENTION_MODES:
            raise ValueError(f"model.dense must be one of {ATTENTION_MODES}, got {mode!r}")
        if pos_interp not in POS_INTERPOLATIONS:
            raise ValueError(f"generator.pos_interp must be one of {POS_INTERPOLATIONS}, got {pos_interp!r}")
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        if not naclip_sigma > 0:
            raise ValueError(f"model.naclip_sigma must be positive, got {naclip_sigma!r}")
        if (mode == "proxyclip") != (vfm is not None):
            raise ValueError("a vision foundation model (model.vfm) is used by model.dense=proxyclip and no other mode")
        if vfm is not None and (mean is None or std is None):
            raise ValueError("proxyclip needs the input's normalisation mean and std to un-normalise it for the VFM")
        self.visual = visual
        self.patch_size = int(ph)
        self.mode, self.pos_interp, self.remainder = mode, pos_interp, remainder
        self.naclip_sigma = float(naclip_sigma)
        self.proxy_beta, self.proxy_gamma = float(proxy_beta), float(proxy_gamma)
        self.vfm = vfm
        if vfm is not None:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) CLIP patch grid of an input of height x width pixels."""
        p = self.patch_size
        if self.remainder == "drop":
            return height // p, width // p
        return -(-height // p), -(-width // p)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tokens entering the last block (B, 1 + gh*gw, C), batch first, and the grid (gh, gw)."""
        v = self.visual
        tokens = v.conv1(x.to(v.conv1.weight.dtype))  # the tower runs in its weights' dtype
        b, c, gh, gw = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(tokens.dtype).expand(b, 1, c)
        interpolate = interpolate_pos_embed if self.pos_interp == "size" else interpolate_pos_embed_offset
        pos = interpolate(v.positional_embedding, tuple(v.grid_size), (gh, gw))
        tokens = v.ln_pre(torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype))

        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            tokens = tokens.transpose(0, 1)
        for block in v.transformer.resblocks[:-1]:
            tokens = block(tokens)
        if not batch_first:
            tokens = tokens.transpose(0, 1)
        return tokens, (gh, gw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.patch_size
        x_clip = pad_to_multiple(x, p) if self.remainder == "pad" else crop_to_multiple(x, p)
        tokens, grid = self.tokens(x_clip)
        params: dict = {}
        if self.mode == "naclip":
            params["sigma"] = self.naclip_sigma
        elif self.mode == "proxyclip":
            seen = x_clip if self.remainder == "pad" else x
            rgb = seen.float() * self.std + self.mean
            params = dict(
                vfm_features=self.vfm(crop_to_multiple(rgb, self.vfm.patch_size)),
                beta=self.proxy_beta,
                gamma=self.proxy_gamma,
            )
        return dense_last_block(self.visual, tokens, grid, mode=self.mode, **params)
