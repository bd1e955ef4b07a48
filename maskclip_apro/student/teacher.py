"""Online pseudo labels: the frozen MaskCLIP teacher and the refiner chain of the training-free path.

On each training crop: generator -> softmax -> refiner chain (the `refine` preset: KS, PD, APro,
PAMR, ... with the same parameters as scripts/refine.py) -> hard label = argmax of the chain's
label scores (Chain.refine: the logits without refiners, the official head's output after KS /
PD, else the chain's probabilities), bilinearly upsampled to the crop. When the chain holds an
APro step, that step's separate
maps (seed Table 7: GP and LP side by side for "apro", one map for a cascade) are also returned as
soft targets for the L1 loss, each with the weight of the propagation it ends with (GP or LP).
Padded crops (`padded`): "crop" (default) runs the teacher on the padded crop as it is, the
padding included, at the crop's own scale, as the official MaskCLIP+ head does (`self.clip(img)`
on the padded training image, chongzhou96/MaskCLIP mmseg/models/decode_heads/maskclip_plus_head.py);
"valid" runs it on the valid rectangle alone (which the generator then rescales to its short side).
Either way the padding gets ignore (255) / zero targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from ..refiners import Chain
from ..refiners.apro import APro
from ..refiners.chain import step_with_scores
from ..segmenter import Segmenter, labels_at

# The propagation each APro mode's maps end with ("parallel" returns [GP, LP]).
LAST_PROPAGATION = {"parallel": ("gp", "lp"), "gp": ("gp",), "lp": ("lp",), "lp_gp": ("gp",), "gp_lp": ("lp",)}


@dataclass
class Targets:
    """hard (B, H, W) int64 with 255 = ignore; soft: refined probability maps (B, K, H, W) with
    their L1 weights."""

    hard: torch.Tensor
    soft: List[torch.Tensor] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)


class Teacher:
    """Frozen generator + refiner chain; call with crops (B, 3, H, W) in [0, 1] and a valid mask (B, H, W).

    gp_weight / lp_weight: L1 weights of GP- and LP-refined soft targets (APro's official heads:
    2 and 1, CircleRadon/APro mmdet/models/dense_heads/box_solov2_head.py). padded: "crop" | "valid",
    what the teacher sees of a padded crop (module docstring).
    """

    PADDED = ("crop", "valid")

    def __init__(
        self,
        generator: Callable[[torch.Tensor], Any],
        chain: Optional[Chain] = None,
        num_classes: Optional[int] = None,
        gp_weight: float = 2.0,
        lp_weight: float = 1.0,
        padded: str = "crop",
    ):
        if padded not in self.PADDED:
            raise ValueError(f"the teacher's padded-crop input must be one of {self.PADDED}, got {padded!r}")
        self.padded = padded
        self.generator = generator
        self.chain = chain or Chain([])
        apro = [i for i, r in enumerate(self.chain.refiners) if isinstance(r, APro)]
        if len(apro) > 1:
            raise ValueError(f"the teacher's refiner chain {self.chain.name!r} holds {len(apro)} APro steps; use at most one")
        self.apro_index = apro[0] if apro else None
        self.weights: List[float] = []
        if self.apro_index is not None:
            by_name = {"gp": float(gp_weight), "lp": float(lp_weight)}
            self.weights = [by_name[p] for p in LAST_PROPAGATION[self.chain.refiners[self.apro_index].mode]]
        self.num_classes = num_classes

    def _label(self, images: torch.Tensor) -> Targets:
        out = self.generator(images)
        if self.num_classes is not None and out.logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the teacher scores {out.logits.shape[1]} classes but the dataset has {self.num_classes}; "
                "check the vocabulary / background settings"
            )
        probs, guidance = Segmenter.probabilities(out, images)
        scores: Optional[torch.Tensor] = out.logits.float()
        soft: List[torch.Tensor] = []
        for i, refiner in enumerate(self.chain.refiners):
            if i == self.apro_index:
                soft = refiner.targets(probs, guidance)
                probs, scores = soft[0] if len(soft) == 1 else sum(soft) / len(soft), None
            else:
                probs, scores = step_with_scores(refiner, probs, guidance, scores)
        size = tuple(images.shape[-2:])
        soft = [m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in soft]
        hard = labels_at(probs if scores is None else scores, size)
        return Targets(hard=hard, soft=soft, weights=list(self.weights) if soft else [])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, valid: torch.Tensor) -> Targets:
        full = valid.flatten(1).all(dim=1)
        b, _, h, w = images.shape
        if bool(full.all()) or self.padded == "crop":
            out = self._label(images)
            out.hard[~valid] = IGNORE_INDEX
            for m in out.soft:
                m.mul_(valid.unsqueeze(1).to(m.dtype))
            return out
        hard = torch.full((b, h, w), IGNORE_INDEX, dtype=torch.long, device=images.device)
        soft: List[torch.Tensor] = []
        weights: List[float] = []
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
                weights = part.weights
            for dst, src in zip(soft, part.soft):
                dst[idx, :, ys, xs] = src
        hard[~valid] = IGNORE_INDEX
        return Targets(hard=hard, soft=soft, weights=weights)
