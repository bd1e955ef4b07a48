"""APro as a refiner: GP over the image's minimum spanning tree and LP, combined (docs/refiners.md).

Both read the ImageNet-normalised image (`Guidance.normalized_image()`), as the official APro
heads read the network input, so zeta_g, zeta_h and zeta_s are in the official units (one unit
is about 0.226 in [0, 1] pixel terms). `refine=apro_official` holds the official heads' values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from ..apro import Tree, build_tree, local_propagation, propagate, reweight
from ..checks import check_int, check_map, check_positive
from .base import Guidance

MODES = ("parallel", "gp", "lp", "lp_gp", "gp_lp")
SECOND_PASSES = (None, "output", "features")


def guide_size(height: int, width: int, long_side: Optional[int]) -> tuple[int, int]:
    """(H', W') with the long side capped at `long_side` (None keeps the full size)."""
    if long_side is None or max(height, width) <= long_side:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) to `size`, antialiased when shrinking if `antialias`;
    unchanged if already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias and shrink)


def work_size(image_size: tuple[int, int], grid_size: tuple[int, int], scale: Optional[float]) -> tuple[int, int]:
    """The image size with its long side capped at `scale` x the long side of the probabilities' grid.

    None keeps the image size. Relative to the unary's grid (MaskCLIP's patch grid), a setting
    means the same for any image size and generator resolution.
    """
    if scale is None:
        return tuple(image_size)
    return guide_size(*image_size, max(1, round(scale * max(grid_size))))


class APro:
    """Global (GP) and local (LP) affinity propagation on the MaskCLIP probabilities.

    Resolutions, relative to the grid of the probabilities (h, w), or guidance.grid when set, and
    capped at the image size (None: the image size): LP and the output run on the normalised
    image resized to `lp_scale` x the grid's long side, GP on it resized to `gp_scale` x (its
    result is upsampled bilinearly to the output size). The probabilities are resized bilinearly
    to each. With MaskCLIP's 16-px patches, `lp_scale=4` is a stride-4 map (the official heads'
    masks: stride 4 to 16).

    `mode`: "parallel" = mean(GP(P), LP(P)) (`targets` returns both, the training targets),
    "gp", "lp", or the cascades "lp_gp" = GP(LP(P)) and "gp_lp" = LP(GP(P)). The defaults are
    `refine=apro`'s, calibrated on MaskCLIP-like unaries (docs/calibration.md).

    GP: psi(i, j) = exp(-maxedge(i, j) / zeta_g^2) on the MST of the normalised image, edge
    weights its squared L2 differences. `second_pass` propagates the pass-1 result again on the
    same tree topology with zeta_h: "output" re-weights the edges of each class map by that map's
    own pass-1 values (the official heads' second pass, one mask at a time); "features" by the
    L2-normalised dense CLIP features (one tree for all classes).

    LP: `iters` steps of y_i <- sum_j psi_s(i, j) y_j / sum_j psi_s(i, j) over the in-image
    pixels of the k x k window, psi_s(i, j) = exp(-|I_i - I_j|^2 / zeta_s^2).

    `antialias`: whether the guide image is antialiased when shrunk to the GP / LP resolutions.
    The official heads shrink it with plain bilinear F.interpolate (CircleRadon/APro,
    box_solov2_head.py; `refine=apro_official`: false); `refine=apro`'s ζ were calibrated with
    the antialiased guide (true).
    """

    def __init__(
        self,
        mode: str = "parallel",
        zeta_g: float = 0.1,
        zeta_s: float = 0.5,
        kernel_size: int = 5,
        iters: int = 20,
        second_pass: Optional[str] = None,
        zeta_h: float = 0.07,
        gp_scale: Optional[float] = 2.0,
        lp_scale: Optional[float] = 4.0,
        backend: str = "auto",
        antialias: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"APro mode must be one of {MODES}, got {mode!r}")
        if second_pass not in SECOND_PASSES:
            raise ValueError(f"apro second_pass must be null, 'output' or 'features', got {second_pass!r}")
        self.mode = mode
        self.zeta_g = check_positive("apro zeta_g", zeta_g)
        self.zeta_s = check_positive("apro zeta_s", zeta_s)
        self.zeta_h = check_positive("apro zeta_h", zeta_h)
        self.kernel_size = check_int("apro kernel_size", kernel_size, 1)
        self.iters = check_int("apro iters", iters, 0)
        self.second_pass = second_pass
        self.gp_scale = check_positive("apro gp_scale", gp_scale, optional=True)
        self.lp_scale = check_positive("apro lp_scale", lp_scale, optional=True)
        self.backend = backend
        if not isinstance(antialias, bool):
            raise ValueError(f"apro antialias must be true or false, got {antialias!r}")
        self.antialias = antialias
        self.name = {"parallel": "apro", "lp_gp": "lp>gp", "gp_lp": "gp>lp"}.get(mode, mode)

    def _second(self, tree: Tree, out: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        if self.second_pass == "features":
            if guidance.features is None:
                raise ValueError("apro second_pass='features' needs guidance.features (dense CLIP features)")
            high = F.normalize(resize(guidance.features.float(), out.shape[-2:]), dim=1)
            return propagate(reweight(tree, high, backend=self.backend), out, self.zeta_h, backend=self.backend)
        b, k, h, w = out.shape  # "output": one tree per image and class, weighted by that class's map
        per_class = replace(tree, **{f: getattr(tree, f).repeat_interleave(k, dim=0) for f in Tree.ARRAYS})
        maps = out.reshape(b * k, 1, h, w)
        return propagate(reweight(per_class, maps, backend=self.backend), maps, self.zeta_h,
                         backend=self.backend).reshape(b, k, h, w)

    def gp(self, probs: torch.Tensor, guide: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        """GP (one or two passes) of probs (B, K, H, W) on the normalised guide (B, 3, H, W)."""
        tree = build_tree(guide, backend=self.backend)
        out = propagate(tree, probs, self.zeta_g, backend=self.backend)
        return out if self.second_pass is None else self._second(tree, out, guidance)

    def lp(self, probs: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """LP of probs (B, K, H, W) on the normalised guide (B, 3, H, W)."""
        return local_propagation(
            probs, guide, zeta_s=self.zeta_s, kernel_size=self.kernel_size, iters=self.iters, backend=self.backend
        )

    def targets(self, probs: torch.Tensor, guidance: Guidance) -> list[torch.Tensor]:
        """The refined maps at the output resolution: [GP, LP] in parallel mode, else one map.

        Training uses them as separate soft targets (the APro paper's GP-LP-P, its Table 7); the
        refiner's output is their mean.
        """
        check_map("probs", probs)
        image = check_map("guidance.image", guidance.image)
        normalized = guidance.normalized_image().float()
        grid = probs.shape[-2:] if guidance.grid is None else guidance.grid
        out_size = work_size(image.shape[-2:], grid, self.lp_scale)
        gp_size = work_size(image.shape[-2:], grid, self.gp_scale)
        out_guide = resize(normalized, out_size, self.antialias)
        gp_guide = resize(normalized, gp_size, self.antialias)
        probs = probs.float()

        def gp(p: torch.Tensor) -> torch.Tensor:
            return resize(self.gp(resize(p, gp_size), gp_guide, guidance), out_size)

        def lp(p: torch.Tensor) -> torch.Tensor:
            return self.lp(resize(p, out_size), out_guide)

        if self.mode == "gp":
            return [gp(probs)]
        if self.mode == "lp":
            return [lp(probs)]
        if self.mode == "lp_gp":
            return [gp(lp(probs))]
        if self.mode == "gp_lp":
            return [lp(gp(probs))]
        return [gp(probs), lp(probs)]

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        maps = self.targets(probs, guidance)
        return maps[0] if len(maps) == 1 else sum(maps) / len(maps)
