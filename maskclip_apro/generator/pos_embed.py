"""Positional-embedding resampling as the SCLIP-family and DINO code does it.

The SCLIP / ClearCLIP / NACLIP / ProxyCLIP repositories (their `clip/model.py` or
`open_clip/transformer.py`, `interpolate_pos_encoding`) and DINO (`vision_transformer.py`)
resample the (M, M) grid of patch embeddings to a (gh, gw) grid by bicubic interpolation
driven by a scale factor rather than an output size:

    F.interpolate(grid, scale_factor=((gh + 0.1) / M, (gw + 0.1) / M), mode="bicubic",
                  align_corners=False, recompute_scale_factor=False)

The output size is floor(M * (g + 0.1) / M) = g, but the sampling positions use the scale
factor itself: output pixel i samples the source at (i + 0.5) * M / (g + 0.1) - 0.5, not at
(i + 0.5) * M / g - 0.5 as a size-driven resize (maskclip_apro.generator.vit) does. The two
embeddings differ everywhere except at the native grid, where the official code skips the
resampling (so does this module). DINOv2 models with register tokens resample by size with
antialiasing instead (`interpolate_offset=0`, `interpolate_antialias=True` in DINOv2's hub code);
`offset=0` selects that form here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POS_OFFSET = 0.1  # the "+0.1" of DINO / SCLIP-family interpolate_pos_encoding


def resample_patch_pos(
    patch_pos: torch.Tensor,
    native: tuple[int, int],
    grid: tuple[int, int],
    offset: float = POS_OFFSET,
    antialias: bool = False,
) -> torch.Tensor:
    """(M0h*M0w, C) patch position embeddings (row-major) -> (gh*gw, C), computed in float32.

    offset > 0: bicubic with scale factor (g + offset) / M (module doc); offset == 0: bicubic to
    the output size. Unchanged (the same tensor) when grid == native.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset!r}")
    native, grid = (int(native[0]), int(native[1])), (int(grid[0]), int(grid[1]))
    if min(grid) < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if grid == native:
        return patch_pos
    c = patch_pos.shape[-1]
    if patch_pos.shape[0] != native[0] * native[1]:
        raise ValueError(f"{patch_pos.shape[0]} patch embeddings do not form the native {native} grid")
    x = patch_pos.reshape(1, native[0], native[1], c).permute(0, 3, 1, 2).float()
    if offset > 0:
        scale = ((grid[0] + offset) / native[0], (grid[1] + offset) / native[1])
        x = F.interpolate(
            x, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False, antialias=antialias
        )
    else:
        x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    if tuple(x.shape[-2:]) != grid:
        raise ValueError(f"resampling {native} by offset {offset} gave {tuple(x.shape[-2:])}, not {grid}")
    return x.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], c).to(patch_pos.dtype)


def interpolate_pos_embed_offset(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1 + M0h*M0w, C) CLIP positional embedding (class token first) -> (1 + gh*gw, C), SCLIP-family rule.

    Same signature as vit.interpolate_pos_embed, so a protocol can select either.
    """
    return torch.cat([pos[:1], resample_patch_pos(pos[1:], native, grid, POS_OFFSET, antialias=False)], dim=0)
