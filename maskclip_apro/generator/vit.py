"""MaskCLIP dense features and keys from an open_clip VisionTransformer.

The tower runs unchanged up to the last block. In the last block the query-key attention is
replaced by its value path, keeping residual and MLP as MaskCLIP's official code does
(chongzhou96/MaskCLIP, mmseg/models/backbones/vit.py, `return_qkv`; computed by
dense_attention.dense_last_block, mode "maskclip"):
    v = x + ls1(W_out (W_v LN1(x) + b_v) + b_out)
    v = v + ls2(MLP(LN2(v)))
then ln_post and the projection, per patch token. The keys for key smoothing go through the
same output projection, with no residual, MLP or final norm (the official code projects q, k
and v alike and adds the residual to v only):
    k = W_out (W_k LN1(x) + b_k) + b_out

Input sizes that are not a multiple of the patch size are zero-padded at the bottom and right
to the next multiple (mmseg's PatchEmbed with padding="corner"), after normalisation, so the
padding is the normalisation mean. Positional embeddings are interpolated bicubically
(align_corners=False, no antialias, as mmseg's resize_pos_embed) to the padded patch grid; at
the native grid that interpolation is exactly the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from .dense_attention import check_last_block, dense_last_block


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


class ViTDense(nn.Module):
    """(B, 3, H, W) normalised image -> features (B, D, h, w) (not normalised), keys (B, C, h, w).

    h = ceil(H / p), w = ceil(W / p): the grid of the zero-padded input (module doc). The last
    block is dense_attention.dense_last_block in its "maskclip" mode.
    """

    def __init__(self, visual: VisionTransformer) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise ValueError("ViT towers with an attentional pooler or without a projection are not supported")
        check_last_block(visual.transformer.resblocks[-1])
        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {visual.patch_size} are not supported")
        self.visual = visual
        self.patch_size = int(ph)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) patch grid of an input of height x width pixels."""
        p = self.patch_size
        return -(-height // p), -(-width // p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        tokens = v.conv1(pad_to_multiple(x, self.patch_size))
        b, c, gh, gw = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(tokens.dtype).expand(b, 1, c)
        pos = interpolate_pos_embed(v.positional_embedding, tuple(v.grid_size), (gh, gw))
        tokens = v.ln_pre(torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype))

        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            tokens = tokens.transpose(0, 1)
        for block in v.transformer.resblocks[:-1]:
            tokens = block(tokens)
        if not batch_first:
            tokens = tokens.transpose(0, 1)
        return dense_last_block(v, tokens, (gh, gw), mode="maskclip")
