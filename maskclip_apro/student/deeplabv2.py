"""DeepLabv2: a dilated timm ResNet (output stride 8) and the ASPP-v2 head, upsampled to the input."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import read_state_dict

BN_MODES = ("frozen", "train", "sync")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ASPPv2(nn.Module):
    """Four parallel 3x3 convolutions with dilations 6/12/18/24 whose outputs are summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        if not dilations:
            raise ValueError("dilations must name at least one dilation rate")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.convs:  # DeepLab's init for the classifier
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """timm ResNet trunk at output stride 8 + ASPP-v2; logits are bilinearly resized to the input.

    Input: images (B, 3, H, W) float in [0, 1]; ImageNet mean/std normalisation happens inside.

    pretrained: False (random init), True (timm's pretrained tag; downloads on a user's machine) or
    the path of a local ResNet state dict (.safetensors, or .pth/.bin loaded with weights_only).
    bn: "frozen" keeps BatchNorm statistics fixed (affine weights still train), "train" uses
    per-process batch statistics, "sync" uses SyncBatchNorm under multi-GPU training (GPU only).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: Union[bool, str, None] = False,
        dilations: Sequence[int] = (6, 12, 18, 24),
        bn: str = "frozen",
        backbone_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        self.num_classes = int(num_classes)
        self.backbone_name = backbone
        self.bn = bn
        path = pretrained if isinstance(pretrained, (str, os.PathLike)) else None
        self.backbone = timm.create_model(
            backbone,
            features_only=True,
            output_stride=8,
            out_indices=(4,),
            pretrained=bool(pretrained) and path is None,
            **dict(backbone_kwargs or {}),
        )
        if path is not None:
            load_backbone(self.backbone, str(path))
        channels = self.backbone.feature_info.channels()[-1]
        self.head = ASPPv2(channels, self.num_classes, dilations)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-8 feature map (B, C, ceil(H/8), ceil(W/8))."""
        return self.backbone((x - self.mean) / self.std)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> "DeepLabV2":
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Load ImageNet ResNet weights from a local file; classifier keys (fc.*) are dropped."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"pretrained backbone file {path} does not fit the backbone: " + describe_mismatch(missing, unexpected, shapes))
    backbone.load_state_dict(state)


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str], limit: int = 8) -> str:
    """A short human-readable list of mismatched state-dict keys."""

    def few(keys: Sequence[str]) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {few(shapes)}")
    return "; ".join(parts)
