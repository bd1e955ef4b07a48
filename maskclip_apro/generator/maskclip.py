"""The MaskCLIP generator: short-side resize, sliding windows, dense features, text logits.

Geometry: the short side is resized to `short_side` (a multiple of the patch size p) and the
long side to the nearest multiple of p to its aspect-preserving length (an aspect change below
p / long side), so the resized image H' x W' is exactly the (H'/p) x (W'/p) patch grid times p.
Windows of `window` pixels (clipped to the image where it is smaller) start every `stride`
pixels, the last one flush with the far edge (mmseg's slide inference); all lie on the patch
grid. Per window: logits = s * cos(feature, text) (max over synonyms, background rule). On the
global grid, logits, keys and features are the mean over the windows covering a patch;
features are renormalised after averaging, so logits == s * cos(features, text) holds exactly
where a single window covers a patch. mode="whole" runs the resized image once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .text import TextClassifier

WINDOW_BATCH = 8  # windows (times images) per forward pass
MODES = ("slide", "whole")


@dataclass
class GeneratorOutput:
    """logits (B, K, h, w); keys (B, C, h, w) or None; features (B, D, h, w) unit; image (B, 3, H', W') in [0, 1]."""

    logits: torch.Tensor
    keys: Optional[torch.Tensor]
    features: torch.Tensor
    image: torch.Tensor


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` (clipped to `size`) every `stride`, the last flush with the end."""
    if size <= window:
        return [0]
    count = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(count)]


def stitch(tiles: Sequence[tuple[int, int, torch.Tensor]], grid: tuple[int, int]) -> torch.Tensor:
    """Mean of (y, x, (B, C, th, tw)) tiles placed on a (gh, gw) grid, over the tiles covering each cell."""
    first = tiles[0][2]
    total = first.new_zeros(first.shape[0], first.shape[1], *grid)
    count = first.new_zeros(1, 1, *grid)
    for y, x, tile in tiles:
        th, tw = tile.shape[-2:]
        total[:, :, y : y + th, x : x + tw] += tile
        count[:, :, y : y + th, x : x + tw] += 1
    if bool((count == 0).any()):
        raise ValueError(f"tiles leave cells of the {grid} grid uncovered")
    return total / count


def resized_size(height: int, width: int, short_side: Optional[int], patch: int) -> tuple[int, int]:
    """Target (H', W'): short side -> short_side (None: kept), both sides rounded to multiples of `patch`."""
    if min(height, width) < patch:
        raise ValueError(f"image of size {height}x{width} is smaller than one patch ({patch}x{patch} pixels)")
    scale = 1.0 if short_side is None else short_side / min(height, width)
    h = max(patch, round(height * scale / patch) * patch)
    w = max(patch, round(width * scale / patch) * patch)
    return h, w


class MaskCLIPGenerator(nn.Module):
    """Images (B, 3, H, W) float RGB in [0, 1] -> GeneratorOutput on the resized image's patch grid."""

    def __init__(
        self,
        backbone: nn.Module,
        classifier: TextClassifier,
        class_names: Sequence[str],
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        logit_scale: float = 100.0,
        mode: str = "slide",
        short_side: Optional[int] = 448,
        window: int = 448,
        stride: int = 224,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = int(backbone.patch_size)
        p = self.patch_size
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale!r}")
        for name, value in (("short_side", short_side), ("window", window), ("stride", stride)):
            if name == "short_side" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % p:
                raise ValueError(f"{name} must be a positive multiple of the patch size {p}, got {value!r}")
        if stride > window:
            raise ValueError(f"stride ({stride}) must not exceed window ({window}): windows would leave gaps")
        self.classifier = classifier
        self.class_names = list(class_names)
        self.num_classes = classifier.num_classes
        self.logit_scale = float(logit_scale)
        self.mode, self.short_side, self.window, self.stride = mode, short_side, window, stride
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def has_keys(self) -> bool:
        """Whether outputs carry last-block keys (ViT), which key smoothing needs."""
        return bool(self.backbone.provides_keys)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Short-side resize (bilinear, antialiased) to the patch-aligned size; unchanged if already there."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
            raise ValueError("images must be finite floating-point RGB in [0, 1]")
        size = resized_size(images.shape[2], images.shape[3], self.short_side, self.patch_size)
        images = images.to(self.device, torch.float32)
        if size == tuple(images.shape[-2:]):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) pixel boxes of the windows for a resized image."""
        if self.mode == "whole":
            return [(0, 0, height, width)]
        wh, ww = min(self.window, height), min(self.window, width)
        return [
            (y, x, wh, ww)
            for y in window_starts(height, self.window, self.stride)
            for x in window_starts(width, self.window, self.stride)
        ]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> GeneratorOutput:
        image = self.resize(images)
        b, _, height, width = image.shape
        p = self.patch_size
        normed = (image - self.mean) / self.std
        boxes = self.windows(height, width)
        logits, keys, feats = [], [], []
        for start in range(0, len(boxes), WINDOW_BATCH):
            chunk = boxes[start : start + WINDOW_BATCH]
            crops = torch.cat([normed[:, :, y : y + h, x : x + w] for y, x, h, w in chunk])
            f, k = self.backbone(crops)
            f = F.normalize(f.float(), dim=1)
            z = self.classifier(f, self.logit_scale)
            for i, (y, x, _, _) in enumerate(chunk):
                part = slice(i * b, (i + 1) * b)
                logits.append((y // p, x // p, z[part]))
                feats.append((y // p, x // p, f[part]))
                if k is not None:
                    keys.append((y // p, x // p, k[part].float()))
        grid = (height // p, width // p)
        return GeneratorOutput(
            logits=stitch(logits, grid),
            keys=stitch(keys, grid) if keys else None,
            features=F.normalize(stitch(feats, grid), dim=1),
            image=image,
        )


def build_dense_backbone(visual: nn.Module) -> nn.Module:
    """ViTDense or ResNetDense, chosen from the image tower's class."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    from .resnet import ResNetDense
    from .vit import ViTDense

    if isinstance(visual, VisionTransformer):
        return ViTDense(visual)
    if isinstance(visual, ModifiedResNet):
        return ResNetDense(visual)
    raise ValueError(f"unsupported image tower {type(visual).__name__}: need an open_clip ViT or ModifiedResNet")


def build_generator(
    model: str,
    pretrained: Optional[str],
    class_names: Sequence[str],
    *,
    templates: Union[str, Sequence[str]] = "maskclip",
    background: Optional[dict] = None,
    logit_scale: float = 100.0,
    mode: str = "slide",
    short_side: Optional[int] = 448,
    window: int = 448,
    stride: int = 224,
    cache_dir: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
) -> MaskCLIPGenerator:
    """A MaskCLIP generator for `class_names` from an open_clip model and checkpoint (see models.load_clip)."""
    from .models import image_mean_std, load_clip
    from .templates import resolve_templates
    from .text import build_text_classifier, parse_class_names

    parse_class_names(class_names)  # fail on a bad vocabulary before loading weights
    template_list = resolve_templates(templates)
    clip, identity = load_clip(model, pretrained, device)
    backbone = build_dense_backbone(clip.visual)
    classifier, display = build_text_classifier(
        clip, model, identity, class_names, template_list, background=background, cache_dir=cache_dir
    )
    mean, std = image_mean_std(clip)
    gen = MaskCLIPGenerator(
        backbone, classifier, display, mean, std,
        logit_scale=logit_scale, mode=mode, short_side=short_side, window=window, stride=stride,
    )
    gen.identity = identity  # which weights: saved results made with other weights are not reused
    return gen.to(device).eval()
