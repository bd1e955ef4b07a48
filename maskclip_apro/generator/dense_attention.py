"""The last block of an open_clip ViT rebuilt for dense prediction, one function per attention form.

The tower runs unchanged to the last block; x (B, 1 + N, C) are the tokens entering it (class
token first, batch first) on a (gh, gw) patch grid. With y = ln_1(x) over all tokens,
q, k, v = y W_in^T + b_in (rows 0:C, C:2C, 2C:3C of `in_proj_weight` / `in_proj_bias`), split
into H heads of size d (head h owns channels h*d:(h+1)*d, as nn.MultiheadAttention does),
s = d^-0.5, and o = concat_h(A_h v_h) W_out^T + b_out, the modes are:

    mode        A_h (softmax over the last axis)                 z (fed to ln_post, proj)
    vanilla     softmax(s q k^T)                                 x + ls_1(o), then z + ls_2(MLP(ln_2(z)))
    maskclip    identity (value path)                            as vanilla
    sclip       softmax(s q q^T) + softmax(s k k^T)              as vanilla
    clearclip   softmax(s q q^T)                                 o
    naclip      softmax(s k k^T + Omega)                         o
    proxyclip   softmax(S'), S' from a vision foundation model   o, on the VFM's grid

The class token takes part in the attention (as key, value and query) and is dropped from the
output. `vanilla` is CLIP's own last block (a check of the unpacking). NACLIP's Omega is
exp(-|p_i - p_j|^2 / (2 sigma^2)) over patch-grid positions, 0 on the class token's row and
column (NACLIP `clip/model.py`, `gaussian_window` / `get_attention_addition`: an unnormalised
Gaussian, peak 1, added to the logits). ProxyCLIP (its `open_clip/transformer.py`,
`custom_attn`) uses only the patch tokens: S = cosine similarities of the VFM patch features
(h x w grid), S' = gamma (S - beta mean(S)) with entries < 0 set to -inf, and the CLIP values
v (patch tokens only) upsampled bilinearly from (gh, gw) to (h, w).

Keys (for key smoothing), every mode: the last block's patch keys through the attention's
output projection, W_out (W_k y + b_k) + b_out, as MaskCLIP's official code computes them; for
proxyclip upsampled bilinearly to the VFM grid like the values. LayerScale (identity in every
CLIP checkpoint these methods use) scales o in the residual modes only, as open_clip's block
does; the modes without residual return o as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip")
DENSE_NAMES = {  # how results name the generator of each mode
    "vanilla": "CLIP", "maskclip": "MaskCLIP", "sclip": "SCLIP", "clearclip": "ClearCLIP", "naclip": "NACLIP",
    "proxyclip": "ProxyCLIP",
}
RESIDUAL_MODES = ("vanilla", "maskclip", "sclip")  # z = x + o, then the MLP; the others return o
NACLIP_SIGMA = 5.0
PROXY_BETA = 1.2
PROXY_GAMMA = 3.0


@dataclass
class DenseTokens:
    """tokens (B, h*w, C): patch tokens to feed ln_post / proj; keys (B, h*w, C); grid (h, w), row-major."""

    tokens: torch.Tensor
    keys: torch.Tensor
    grid: tuple[int, int]


# ---------------------------------------------------------------- attention forms


def vanilla_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(s q k^T) for per-head (B, H, N, d) queries and keys."""
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


def sclip_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention softmax(s q q^T) + softmax(s k k^T); rows sum to 2."""
    s = q.shape[-1] ** -0.5
    return torch.softmax((q @ q.transpose(-1, -2)) * s, dim=-1) + torch.softmax((k @ k.transpose(-1, -2)) * s, dim=-1)


def clearclip_attention(q: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's query-query attention softmax(s q q^T)."""
    return torch.softmax((q @ q.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


def naclip_omega(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, dtype=torch.float64, device=None) -> torch.Tensor:
    """(1 + N, 1 + N) neighbourhood term: exp(-|p_i - p_j|^2 / (2 sigma^2)) between patches, 0 for the class token."""
    if not sigma > 0:
        raise ValueError(f"NACLIP sigma must be positive, got {sigma!r}")
    gh, gw = grid
    yy, xx = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64, device=device), torch.arange(gw, dtype=torch.float64, device=device),
        indexing="ij",
    )
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)
    dist2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)
    omega = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.float64, device=device)
    omega[1:, 1:] = torch.exp(-dist2 / (2.0 * sigma * sigma))
    return omega.to(dtype)


def naclip_attention(k: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """NACLIP's attention softmax(s k k^T + Omega), Omega (N, N) shared by batch and heads."""
    return torch.softmax((k @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5 + omega, dim=-1)


def proxy_attention(features: torch.Tensor, beta: float = PROXY_BETA, gamma: float = PROXY_GAMMA) -> torch.Tensor:
    """ProxyCLIP's attention (B, 1, M, M) from VFM features (B, Cv, h, w), M = h*w, shared by all heads.

    S = cosine similarities, S' = gamma (S - beta mean(S)) (the mean over each image's M x M
    entries), entries < 0 set to -inf, softmax over the last axis. A row with no entry >= 0
    (possible only when mean(S) > 1 / beta, e.g. a uniform image) has no defined softmax
    (the official code yields NaN there); it keeps its own token: A_ii = 1.
    """
    f = F.normalize(features.flatten(2), dim=1)
    sim = f.transpose(1, 2) @ f
    sim = (sim - beta * sim.mean(dim=(1, 2), keepdim=True)) * gamma
    masked = sim < 0
    empty = masked.all(dim=-1, keepdim=True)
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(masked & ~(eye & empty), float("-inf"))
    return torch.softmax(sim, dim=-1)[:, None]


# ---------------------------------------------------------------- the block


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _upsample(t: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, gh*gw, C) tokens -> (B, h*w, C), bilinear (align_corners=False) per channel."""
    b, _, c = t.shape
    m = t.transpose(1, 2).reshape(b, c, *grid)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.reshape(b, c, size[0] * size[1]).transpose(1, 2)


def check_last_block(block: nn.Module) -> None:
    """ValueError unless `block` is an open_clip ResidualAttentionBlock with a packed in-projection."""
    from open_clip.transformer import ResidualAttentionBlock

    if not isinstance(block, ResidualAttentionBlock) or not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        raise ValueError(f"unsupported ViT block type {type(block).__name__} (need open_clip ResidualAttentionBlock)")
    if block.attn.in_proj_weight is None or hasattr(block, "ln_1_kv"):
        raise ValueError("unsupported attention layout in the last ViT block (separate q/k/v projections)")


def last_block_tokens(
    mode: str,
    block: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    *,
    sigma: float = NACLIP_SIGMA,
    vfm_features: Optional[torch.Tensor] = None,
    beta: float = PROXY_BETA,
    gamma: float = PROXY_GAMMA,
) -> DenseTokens:
    """The last block in `mode` (module doc) on tokens x (B, 1 + gh*gw, C); vfm_features (B, Cv, h, w) for proxyclip."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"dense mode must be one of {ATTENTION_MODES}, got {mode!r}")
    check_last_block(block)
    b, n, c = x.shape
    gh, gw = int(grid[0]), int(grid[1])
    if n != 1 + gh * gw:
        raise ValueError(f"{n} tokens do not match a class token plus the {gh}x{gw} patch grid")
    if (mode == "proxyclip") != (vfm_features is not None):
        raise ValueError("vfm_features are required by mode 'proxyclip' and taken by no other mode")
    attn = block.attn
    heads = attn.num_heads
    y = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q = b_k = b_v = None
    if attn.in_proj_bias is not None:
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    k = F.linear(y, w_k, b_k)
    keys = attn.out_proj(k[:, 1:])
    out_grid = (gh, gw)

    if mode == "maskclip":
        o = attn.out_proj(F.linear(y[:, 1:], w_v, b_v))
    elif mode == "proxyclip":
        if vfm_features.dim() != 4 or vfm_features.shape[0] != b:
            raise ValueError(f"vfm_features must be (B={b}, C, h, w), got {tuple(vfm_features.shape)}")
        out_grid = (int(vfm_features.shape[2]), int(vfm_features.shape[3]))
        v = _upsample(F.linear(y[:, 1:], w_v, b_v), (gh, gw), out_grid)
        a = proxy_attention(vfm_features.to(v.dtype), beta, gamma)
        o = attn.out_proj(_merge(a @ _heads(v, heads)))
        keys = _upsample(keys, (gh, gw), out_grid)
    else:
        q, kh, v = _heads(F.linear(y, w_q, b_q), heads), _heads(k, heads), _heads(F.linear(y, w_v, b_v), heads)
        if mode == "vanilla":
            a = vanilla_attention(q, kh)
        elif mode == "sclip":
            a = sclip_attention(q, kh)
        elif mode == "clearclip":
            a = clearclip_attention(q)
        else:
            a = naclip_attention(kh, naclip_omega((gh, gw), sigma, dtype=kh.dtype, device=kh.device))
        o = attn.out_proj(_merge(a @ v))[:, 1:]

    if mode in RESIDUAL_MODES:
        z = x[:, 1:] + block.ls_1(o)
        z = z + block.ls_2(block.mlp(block.ln_2(z)))
    else:
        z = o
    return DenseTokens(tokens=z, keys=keys, grid=out_grid)


def project_tokens(visual: nn.Module, dense: DenseTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """ln_post and proj of the tower, per token: features (B, D, h, w) (not normalised), keys (B, C, h, w)."""
    feats = visual.ln_post(dense.tokens) @ visual.proj
    b = feats.shape[0]
    h, w = dense.grid
    return (
        feats.transpose(1, 2).reshape(b, -1, h, w),
        dense.keys.transpose(1, 2).reshape(b, -1, h, w),
    )


def dense_last_block(
    visual: nn.Module, x: torch.Tensor, grid: tuple[int, int], mode: str = "maskclip", **params
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, D, h, w), keys (B, C, h, w)) of an open_clip VisionTransformer's last block in `mode`.

    x: the tokens entering the last block, (B, 1 + gh*gw, C), batch first. params: sigma
    (naclip), vfm_features, beta, gamma (proxyclip). The same return as the generator's
    ViTDense.forward, so a dense backbone can route every mode through this call.
    """
    if visual.proj is None:
        raise ValueError("ViT towers without a projection are not supported")
    dense = last_block_tokens(mode, visual.transformer.resblocks[-1], x, grid, **params)
    return project_tokens(visual, dense)

