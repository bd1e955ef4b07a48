"""MaskCLIP dense features and keys from an open_clip ModifiedResNet.

The attention pool is replaced by its projections applied at every spatial position of the
trunk output x (1x1 convolutions built from the pool's weights), as MaskCLIP's official head
does (chongzhou96/MaskCLIP, mmseg/models/decode_heads/maskclip_head.py, ResNet branch):
    f = c_proj(v_proj(x))        dense features
    k = k_proj(x)                keys for key smoothing (no c_proj: the official head leaves them
                                 in the trunk's width, e.g. 2048 for RN50)
The pool's positional embedding is not used (it would have to be interpolated to the grid;
MaskCLIP does neither). The trunk runs on any input size: its stride-2 stages floor odd sizes,
exactly as the official ResNetClip backbone does (AvgPool2d(2) in both).

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


def pointwise(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear layer applied at every position of a (B, C, h, w) map (a 1x1 convolution)."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def attnpool_dense(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """(B, E, h, w) trunk features -> (B, D, h, w): c_proj(v_proj(x)) per position."""
    return pointwise(pool.c_proj, pointwise(pool.v_proj, x))


class ResNetDense(nn.Module):
    """(B, 3, H, W) normalised image -> features (B, D, h, w) (not normalised), keys (B, E, h, w)."""

    def __init__(self, visual: ModifiedResNet) -> None:
        super().__init__()
        if not isinstance(getattr(visual, "attnpool", None), AttentionPool2d):
            raise ValueError("the ResNet tower has no open_clip AttentionPool2d to take its projections from")
        self.visual = visual
        self.patch_size = RESNET_STRIDE

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) output grid for height x width pixels: ceil(n / 2) in the stem, then four floor halvings."""
        def size(n: int) -> int:
            n = (n + 1) // 2  # stride-2 3x3 convolution with padding 1
            for _ in range(4):  # stem pool and the three strided stages
                n //= 2
            return n

        return size(height), size(width)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.stem(x.to(v.conv1.weight.dtype))  # the tower runs in its weights' dtype
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.trunk(x)
        pool = self.visual.attnpool
        return attnpool_dense(pool, x), pointwise(pool.k_proj, x)
