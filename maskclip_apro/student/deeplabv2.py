"""DeepLabv2 student: a dilated timm ResNet (output stride 8) and one of two ASPP-v2 heads.

Heads:
- "text" (MaskCLIP+): four dilated 3x3 conv + BN + ReLU branches (6/12/18/24), summed, to
  `channels` features; then a frozen 1x1 classifier made of the teacher's unit CLIP text
  embeddings (no feature normalisation, no scale: chongzhou96/MaskCLIP,
  mmseg/models/decode_heads/maskclip_plus_head.py and aspp_headv2.py).
- "aspp" (DeepLabv2 as published): four dilated 3x3 convolutions straight to K logits, summed.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..generator.text import TextClassifier
from .checkpoint import read_state_dict, state_dict_mismatch

BN_MODES = ("frozen", "train", "sync")
HEADS = ("aspp", "text")
# mmcv / mmseg ResNetV1c checkpoints (open-mmlab://resnet50_v1c) name the deep stem `stem.*`;
# timm names the same layers conv1.{0,1,3,4,6} and bn1.
MMCV_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
             "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def _branch(in_channels: int, out_channels: int, dilation: int, bias: bool) -> nn.Conv2d:
    """mmseg's ASPP branch convolution: 1x1 for dilation 1, else a 3x3 with padding = dilation."""
    k = 1 if dilation == 1 else 3
    return nn.Conv2d(in_channels, out_channels, k, padding=0 if k == 1 else dilation, dilation=dilation, bias=bias)


class ASPPv2(nn.Module):
    """DeepLabv2's classifier: parallel dilated convolutions to K logits whose outputs are summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        if not dilations:
            raise ValueError("dilations must name at least one dilation rate")
        self.convs = nn.ModuleList(_branch(in_channels, num_classes, d, bias=True) for d in dilations)
        for conv in self.convs:  # DeepLab's init for the classifier
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class ASPPFeatures(nn.Module):
    """mmseg's ASPPHeadV2 without its classifier: per dilation conv (no bias) + BN + ReLU, summed."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        if not dilations:
            raise ValueError("dilations must name at least one dilation rate")
        self.branches = nn.ModuleList(
            nn.Sequential(_branch(in_channels, channels, d, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for d in dilations
        )
        for branch in self.branches:  # mmcv ConvModule's init: kaiming (fan_out, relu); BN weight 1, bias 0
            nn.init.kaiming_normal_(branch[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class TextEmbeddingClassifier(TextClassifier):
    """The MaskCLIP+ classifier: logit_k = max over class k's names of <feature, t_name>.

    The rows are the teacher's unit text embeddings (same names, templates and synonyms), kept
    frozen as persistent buffers so a saved student is self-contained. Features are neither
    normalised nor scaled (the official head's norm_feat=False). A class without names (class 0
    under the teacher's threshold background) gets a learned embedding, L2-normalised in the
    forward pass, as the official head's `cls_bg` background.
    """

    def __init__(self, embeddings: torch.Tensor, owner: torch.Tensor, num_classes: int) -> None:
        super().__init__(embeddings.detach().clone(), owner.detach().clone(), int(num_classes), threshold=None)
        for name in ("embeddings", "owner"):
            self.register_buffer(name, getattr(self, name), persistent=True)
        named = set(self.owner.tolist())
        unnamed = [k for k in range(self.num_classes) if k not in named]
        if unnamed not in ([], [0]):
            raise ValueError(f"every class but class 0 needs a text embedding; classes {unnamed} have none")
        self.background = nn.Parameter(torch.randn(1, embeddings.shape[1])) if unnamed else None

    @classmethod
    def from_teacher(cls, classifier: Any) -> "TextEmbeddingClassifier":
        """Copy the rows of the teacher's text classifier (maskclip_apro.generator.text.TextClassifier)."""
        return cls(classifier.embeddings.float().cpu(), classifier.owner.cpu(), classifier.num_classes)

    @property
    def width(self) -> int:
        return int(self.embeddings.shape[1])

    def forward(self, features: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
        logits = super().forward(features, logit_scale)
        if self.background is not None:
            bg = F.normalize(self.background, dim=-1).to(features.dtype)
            logits = torch.cat([logit_scale * F.conv2d(features, bg[:, :, None, None]), logits[:, 1:]], dim=1)
        return logits


class DeepLabV2(nn.Module):
    """timm ResNet trunk at output stride 8 + an ASPP-v2 head; logits are bilinearly resized to the input.

    Input: images (B, 3, H, W) float in [0, 1]; ImageNet mean/std normalisation happens inside.

    backbone: a timm ResNet name; "resnet50c" / "resnet101c" are ResNet-v1c (deep 3x3 stem, plain
    1x1 shortcut), the trunk of MaskCLIP+. timm's output-stride-8 dilation (first block of a
    dilated stage at the previous dilation) is mmseg's contract_dilation.
    pretrained: False (random init), True (timm's pretrained tag; downloads on a user's machine) or
    the path of a local ResNet state dict (.safetensors, or .pth/.bin; mmcv's `stem.*` names accepted).
    bn: "frozen" keeps BatchNorm statistics fixed (affine weights still train), "train" uses batch
    statistics, "sync" is "train" synchronised across processes (see `sync_batchnorm`).
    head: "text" needs `text` (the teacher's text classifier); its ASPP width `channels` defaults
    to the text-embedding width (512 for ViT-B/16, 1024 for RN50, as the official configs).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: Union[bool, str, None] = False,
        dilations: Sequence[int] = (6, 12, 18, 24),
        bn: str = "frozen",
        backbone_kwargs: Optional[Mapping[str, Any]] = None,
        head: str = "aspp",
        channels: Optional[int] = None,
        text: Optional[Any] = None,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if bn not in BN_MODES:
            raise ValueError(f"student.bn must be one of {BN_MODES}, got {bn!r}")
        if head not in HEADS:
            raise ValueError(f"student.head must be one of {HEADS}, got {head!r}")
        self.num_classes = int(num_classes)
        self.backbone_name = backbone
        self.head_name = head
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
        in_channels = self.backbone.feature_info.channels()[-1]
        if head == "aspp":
            self.head = ASPPv2(in_channels, self.num_classes, dilations)
            self.classifier = None
        else:
            if text is None:
                raise ValueError("student.head=text needs the teacher's text classifier (its CLIP text embeddings)")
            self.classifier = text if isinstance(text, TextEmbeddingClassifier) else TextEmbeddingClassifier.from_teacher(text)
            if self.classifier.num_classes != self.num_classes:
                raise ValueError(
                    f"the text classifier scores {self.classifier.num_classes} classes but the student has {self.num_classes}"
                )
            width = self.classifier.width if channels is None else int(channels)
            if width != self.classifier.width:
                raise ValueError(
                    f"student.channels={width} but the text embeddings are {self.classifier.width}-d; "
                    "the text head's ASPP must output the embedding width (student.channels=null)"
                )
            self.head = ASPPFeatures(in_channels, width, dilations)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-8 feature map (B, C, ceil(H/8), ceil(W/8))."""
        return self.backbone((x - self.mean) / self.std)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        if self.classifier is not None:
            out = self.classifier(out)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> "DeepLabV2":
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def sync_batchnorm(model: DeepLabV2, world_size: int, device: torch.device) -> nn.Module:
    """SyncBatchNorm for bn="sync" when several processes train on CUDA; the model unchanged otherwise.

    On the CPU (gloo) and in single-process runs BatchNorm stays per-process, whatever bn says.
    """
    if model.bn == "sync" and world_size > 1 and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Load ImageNet ResNet weights from a local file; classifier keys (fc.*) are dropped."""
    state = {}
    for key, value in read_state_dict(path).items():
        if key.startswith("fc."):
            continue
        for old, new in MMCV_STEM.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    problem = state_dict_mismatch(backbone.state_dict(), state)
    if problem is not None:
        raise ValueError(f"pretrained backbone file {path} does not fit the backbone: {problem}")
    backbone.load_state_dict(state)
