"""Online pseudo labels from the frozen MaskCLIP teacher, optionally refined by APro (design 3.4, 5).

On each training crop: generator -> softmax -> bilinear upsampling to the crop -> APro targets.
Modes (seed Table 7): "none" (plain MaskCLIP+: hard labels only), "gp_lp_parallel" (GP and LP
targets side by side, hard label = argmax of their mean), "lp_gp" = GP(LP(P)), "gp_lp" = LP(GP(P)).
Padded crop pixels (outside the image) never reach the teacher: padded crops are labelled on
their valid rectangle alone and get ignore (255) / zero targets outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping

import torch
import torch.nn.functional as F

from ..refiners.apro import APro
from ..refiners.base import Guidance

TARGET_MODES = ("none", "gp_lp_parallel", "lp_gp", "gp_lp")
APRO_MODES = {"gp_lp_parallel": "parallel", "lp_gp": "lp_gp", "gp_lp": "gp_lp"}
IGNORE = 255


@dataclass
class Targets:
    """hard (B, H, W) int64 with 255 = ignore; soft: refined probability maps (B, K, H, W)."""

    hard: torch.Tensor
    soft: List[torch.Tensor] = field(default_factory=list)


class Teacher:
    """Frozen generator + APro; call with crops (B, 3, H, W) in [0, 1] and a valid mask (B, H, W)."""

    def __init__(
        self,
        generator: Callable[[torch.Tensor], Any],
        mode: str = "none",
        apro: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
    ):
        """apro: keyword arguments of refiners.apro.APro (zeta_g, zeta_s, kernel_size, iters, backend)."""
        if mode not in TARGET_MODES:
            raise ValueError(f"target.mode must be one of {TARGET_MODES}, got {mode!r}")
        self.generator = generator
        self.mode = mode
        self.refiner = None
        if mode in APRO_MODES:
            self.refiner = APro(mode=APRO_MODES[mode], guide_long_side=None, **dict(apro or {}))
        self.num_classes = num_classes

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher softmax upsampled to the crop size, (B, K, H, W)."""
        logits = self.generator(images).logits.float()
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the teacher scores {logits.shape[1]} classes but the dataset has {self.num_classes}; "
                "check the vocabulary / background settings"
            )
        probs = torch.softmax(logits, dim=1)
        return F.interpolate(probs, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def refine(self, probs: torch.Tensor, images: torch.Tensor) -> List[torch.Tensor]:
        """The soft targets of the configured mode at the crop resolution (empty for "none")."""
        if self.refiner is None:
            return []
        return self.refiner.targets(probs, Guidance(image=images))

    def _label(self, images: torch.Tensor) -> Targets:
        probs = self.probabilities(images)
        soft = self.refine(probs, images)
        mean = probs if not soft else sum(soft) / len(soft)
        return Targets(hard=mean.argmax(dim=1), soft=soft)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, valid: torch.Tensor) -> Targets:
        full = valid.flatten(1).all(dim=1)
        b, _, h, w = images.shape
        if bool(full.all()):
            return self._label(images)
        hard = torch.full((b, h, w), IGNORE, dtype=torch.long, device=images.device)
        soft: List[torch.Tensor] = []
        groups = [(full.nonzero().flatten().tolist(), None)] + [([i], i) for i in (~full).nonzero().flatten().tolist()]
        for idx, single in groups:
            if not idx:
                continue
            if single is None:
                ys, xs = slice(None), slice(None)
            else:
                rows = valid[single].any(dim=1).nonzero()
                cols = valid[single].any(dim=0).nonzero()
                ys = slice(int(rows.min()), int(rows.max()) + 1)
                xs = slice(int(cols.min()), int(cols.max()) + 1)
            part = self._label(images[idx][..., ys, xs])
            hard[idx, ys, xs] = part.hard
            if not soft:
                soft = [torch.zeros(b, t.shape[1], h, w, device=images.device) for t in part.soft]
            for dst, src in zip(soft, part.soft):
                dst[idx, :, ys, xs] = src
        hard[~valid] = IGNORE
        return Targets(hard=hard, soft=soft)
