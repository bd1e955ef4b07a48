"""APro as a refiner: GP over the image's minimum spanning tree and LP, combined (design 3.4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..apro import build_tree, local_propagation, propagate, reweight
from .base import Guidance

MODES = ("parallel", "gp", "lp", "lp_gp", "gp_lp")


def guide_size(height: int, width: int, long_side: Optional[int]) -> tuple[int, int]:
    """(H', W') with the long side capped at `long_side` (None keeps the full size)."""
    if long_side is None or max(height, width) <= long_side:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class APro:
    """Global (GP) and local (LP) affinity propagation on the MaskCLIP probabilities.

    The probabilities are upsampled (bilinear) to the guidance resolution: the image with
    its long side capped at `guide_long_side`. `mode` picks the combination:
    "parallel" = mean(GP(P), LP(P)) (the training-free default), "gp", "lp", or the
    cascades "lp_gp" = GP(LP(P)) and "gp_lp" = LP(GP(P)).
    `second_pass` propagates the pass-1 result again over the same tree topology with edge
    weights from high-level guidance, as the official code's two passes do: "features" (the CLIP
    dense features, L2-normalised) or "output" (the pass-1 result itself), with `zeta_h`.
    """

    def __init__(
        self,
        mode: str = "parallel",
        zeta_g: float = 0.1,
        zeta_s: float = 0.15,
        kernel_size: int = 5,
        iters: int = 20,
        second_pass: Optional[str] = None,
        zeta_h: float = 0.5,
        guide_long_side: Optional[int] = 512,
        backend: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"APro mode must be one of {MODES}, got {mode!r}")
        if second_pass not in (None, "features", "output"):
            raise ValueError(f"second_pass must be None, 'features' or 'output', got {second_pass!r}")
        if guide_long_side is not None and int(guide_long_side) < 1:
            raise ValueError(f"guide_long_side must be a positive integer or None, got {guide_long_side!r}")
        self.mode = mode
        self.zeta_g = zeta_g
        self.zeta_s = zeta_s
        self.kernel_size = kernel_size
        self.iters = iters
        self.second_pass = second_pass
        self.zeta_h = zeta_h
        self.guide_long_side = guide_long_side
        self.backend = backend
        self.name = {"parallel": "apro", "lp_gp": "lp>gp", "gp_lp": "gp>lp"}.get(mode, mode)

    def _gp(self, probs: torch.Tensor, image: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        tree = build_tree(image, backend=self.backend)
        out = propagate(tree, probs, self.zeta_g, backend=self.backend)
        if self.second_pass is None:
            return out
        if self.second_pass == "features":
            if guidance.features is None:
                raise ValueError("second_pass='features' needs guidance.features (dense CLIP features)")
            high = F.interpolate(guidance.features.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
            high = F.normalize(high, dim=1)
        else:
            high = out
        return propagate(reweight(tree, high), out, self.zeta_h, backend=self.backend)

    def _lp(self, probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return local_propagation(
            probs, image, zeta_s=self.zeta_s, kernel_size=self.kernel_size, iters=self.iters, backend=self.backend
        )

    def targets(self, probs: torch.Tensor, guidance: Guidance) -> list[torch.Tensor]:
        """The refined maps at the guidance resolution: [GP, LP] in parallel mode, else one map.

        Training uses them as separate soft targets (seed Table 7, GP-LP-P); the refiner's
        output is their mean.
        """
        size = guide_size(*guidance.image.shape[-2:], self.guide_long_side)
        image = guidance.image.float()
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        probs = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
        if self.mode == "gp":
            return [self._gp(probs, image, guidance)]
        if self.mode == "lp":
            return [self._lp(probs, image)]
        if self.mode == "lp_gp":
            return [self._gp(self._lp(probs, image), image, guidance)]
        if self.mode == "gp_lp":
            return [self._lp(self._gp(probs, image, guidance), image)]
        return [self._gp(probs, image, guidance), self._lp(probs, image)]

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        maps = self.targets(probs, guidance)
        return maps[0] if len(maps) == 1 else sum(maps) / len(maps)
