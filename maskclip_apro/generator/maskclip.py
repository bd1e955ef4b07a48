"""The MaskCLIP generator: resize, normalise, dense features and keys, text logits.

Resize (one of, in this order of precedence):
- short_side: the short side goes to short_side and each side to the nearest multiple of the
  patch size p (aspect change below p / side), antialiased bilinear. The resized image is then
  exactly a patch grid, which the sliding-window mode needs.
- img_scale = (a, b): mmcv's keep-ratio rule (maskclip_apro.geometry.rescale_size), plain
  bilinear (half-pixel centres, no antialias, as OpenCV's INTER_LINEAR that mmcv calls). MaskCLIP's
  test protocol; the size is not rounded: the backbone handles the remainder as the official
  code does (ViT: zero padding to the next multiple of p; ResNet: its strided layers floor).
- neither: the input size is kept.

Normalisation: (image - mean) / std with the constants given (ImageNet's or the model's).

Inference: mode="whole" runs the image once; the output grid is the backbone's (ceil(H/p) x
ceil(W/p) for a ViT). mode="slide" zero-pads the normalised image to a multiple of p, runs
windows of `window` pixels (clipped to the image where it is smaller) every `stride` pixels,
the last one flush with the far edge (mmseg's slide inference), all on the patch grid; per
window logits = s * cos(feature, text) (max over synonyms, background rule); on the global
grid logits, keys and features are the mean over the windows covering a patch, so
logits == s * cos(features, text) holds exactly where a single window covers a patch.

The dense backbone (vit.ViTDense, resnet.ResNetDense) builds the last block in the mode
`dense` names (maskclip, or the other attention forms of dense_attention.py, ViT only); the
SCLIP-family harness (mode "harness") is harness.HarnessGenerator; build.build_generator makes
either.

The output grid covers the (padded) image; callers map it onto the resized image by stretching
it to H' x W' (bilinear, align_corners=False), as mmseg does with the head's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import check_img_scale, rescale_size
from .text import TextClassifier
from .vit import pad_to_multiple

WINDOW_BATCH = 8  # windows (times images) per forward pass
MODES = ("slide", "whole")


@dataclass
class GeneratorOutput:
    """A generator's dense output for a batch.

    logits (B, K, h, w): s * cos(feature, class text), max over a class's names; keys (B, C, h, w):
    the last block's keys (key smoothing); features (B, D, h, w): the dense projected CLIP
    features, not normalised; image (B, 3, H', W') in [0, 1]: the resized image the model saw.
    h x w is the patch grid of the resized image (padded to whole patches for a ViT under
    MaskCLIP's protocol). pixel_cos (B, M, H, W): the SCLIP-family harness's cosine per text
    query at the input image's size (harness.HarnessGenerator; None otherwise). windows: the
    harness's per-window outputs when it has a VFM (harness.py: features, text, boxes, values,
    vfm_patch; None otherwise).
    """

    logits: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    image: torch.Tensor
    pixel_cos: Optional[torch.Tensor] = None
    windows: Optional[dict] = None


def check_images(images: torch.Tensor) -> None:
    """ValueError unless `images` is a finite floating-point (B, 3, H, W) tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite floating-point RGB in [0, 1]")


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
    """Images (B, 3, H, W) float RGB in [0, 1] -> GeneratorOutput on the resized image's patch grid.

    model: the open_clip model whose image tower `backbone` wraps (kept for introspection and
    further text encoding; `generator.model`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: TextClassifier,
        class_names: Sequence[str],
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        model: Optional[nn.Module] = None,
        name: str = "MaskCLIP",
        logit_scale: float = 100.0,
        mode: str = "whole",
        short_side: Optional[int] = None,
        img_scale: Optional[Sequence[int]] = (2048, 512),
        window: int = 448,
        stride: int = 224,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = model
        self.name = name
        self.patch_size = int(backbone.patch_size)
        p = self.patch_size
        if mode not in MODES:
            raise ValueError(f"generator.mode must be one of {MODES}, got {mode!r}")
        if not logit_scale > 0:
            raise ValueError(f"generator.logit_scale must be positive, got {logit_scale!r}")
        for name, value in (("short_side", short_side), ("window", window), ("stride", stride)):
            if name == "short_side" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % p:
                raise ValueError(f"generator.{name} must be a positive multiple of the patch size {p}, got {value!r}")
        if stride > window:
            raise ValueError(f"generator.stride ({stride}) must not exceed window ({window}): windows would leave gaps")
        self.img_scale = None if img_scale is None else check_img_scale(img_scale, "generator.img_scale")
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

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of an input of height x width under this generator's resize rule (module doc)."""
        if self.short_side is not None:
            return resized_size(height, width, self.short_side, self.patch_size)
        size = (height, width) if self.img_scale is None else rescale_size(height, width, self.img_scale)
        if min(size) < self.patch_size:
            raise ValueError(
                f"image of size {height}x{width} (resized to {size[0]}x{size[1]}) is smaller than one patch "
                f"({self.patch_size}x{self.patch_size} pixels)"
            )
        return size

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """The resized batch (module doc); unchanged if already at the target size."""
        check_images(images)
        size = self.resized_size(images.shape[2], images.shape[3])
        images = images.to(self.device, torch.float32)
        if size == tuple(images.shape[-2:]):
            return images
        antialias = self.short_side is not None
        out = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        return out.clamp_(0, 1)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) pixel boxes of the sliding windows on a patch-aligned image."""
        wh, ww = min(self.window, height), min(self.window, width)
        return [
            (y, x, wh, ww)
            for y in window_starts(height, self.window, self.stride)
            for x in window_starts(width, self.window, self.stride)
        ]

    def head(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, keys and features (not normalised) of a normalised batch, on the backbone's grid."""
        f, k = self.backbone(normed)
        f = f.float()
        return self.classifier(F.normalize(f, dim=1), self.logit_scale), k.float(), f

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> GeneratorOutput:
        image = self.resize(images)
        normed = (image - self.mean) / self.std
        if self.mode == "whole":
            logits, keys, feats = self.head(normed)
            return GeneratorOutput(logits=logits, keys=keys, features=feats, image=image)
        p = self.patch_size
        normed = pad_to_multiple(normed, p)
        b, _, height, width = normed.shape
        boxes = self.windows(height, width)
        tiles: tuple[list, list, list] = ([], [], [])
        for start in range(0, len(boxes), WINDOW_BATCH):
            chunk = boxes[start : start + WINDOW_BATCH]
            crops = torch.cat([normed[:, :, y : y + h, x : x + w] for y, x, h, w in chunk])
            outputs = self.head(crops)
            for i, (y, x, _, _) in enumerate(chunk):
                for store, out in zip(tiles, outputs):
                    store.append((y // p, x // p, out[i * b : (i + 1) * b]))
        grid = (height // p, width // p)
        logits, keys, feats = (stitch(store, grid) for store in tiles)
        return GeneratorOutput(logits=logits, keys=keys, features=feats, image=image)
