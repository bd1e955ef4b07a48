"""MaskCLIP dense features from an open_clip ModifiedResNet (design section 2).

The attention pool is replaced by its value and output projections applied at every spatial
position (two 1x1 convolutions built from the pool's v_proj and c_proj weights):
    f = c_proj(v_proj(x)) per position.
The pool's positional embedding is ignored, as in MaskCLIP's official head (it would have to
be added before v_proj and interpolated to the grid; MaskCLIP does neither).

Exact relation with the pooled output: if every token entering the pool is the same vector t
(e.g. a map whose positions all equal x with a zero positional embedding), every value is
v_proj(t), each head's attention weights sum to one, so attnpool(x) = c_proj(v_proj(t)) =
the dense feature at every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn

RESNET_STRIDE = 32


def attnpool_dense(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """(B, E, h, w) trunk features -> (B, D, h, w): c_proj(v_proj(x)) as two 1x1 convolutions."""
    v = F.conv2d(x, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
    return F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)


class ResNetDense(nn.Module):
    """(B, 3, H, W) normalised image -> features (B, D, H/32, W/32) (not normalised), keys None."""

    provides_keys = False

    def __init__(self, visual: ModifiedResNet) -> None:
        super().__init__()
        if not isinstance(getattr(visual, "attnpool", None), AttentionPool2d):
            raise ValueError("the ResNet tower has no open_clip AttentionPool2d to take v_proj/c_proj from")
        self.visual = visual
        self.patch_size = RESNET_STRIDE

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.stem(x)
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return attnpool_dense(self.visual.attnpool, self.trunk(x)), None
