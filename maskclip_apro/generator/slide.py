"""Pixel-space geometry of the SCLIP-family test harness (SCLIP, ClearCLIP, NACLIP, ProxyCLIP).

Their pipeline, per image (their `*_segmentor.py`, `forward_slide` / `forward_feature`, and
mmseg's `Resize(scale=img_scale, keep_ratio=True)`):

1. Resize keeping the aspect ratio (maskclip_apro.geometry.rescale_size, rounded as mmcv
   does; bilinear, no antialiasing), normalise with CLIP's mean / std.
2. Windows of `window` pixels every `stride` pixels, the last flush with the border (the same
   starts as maskclip.window_starts); a side shorter than the window is taken whole.
3. Per window, a map on the window's patch grid (cosine logits), bilinearly upsampled
   (align_corners=False) to the window's pixel size; SCLIP and NACLIP feed the window as is (a
   side that is not a multiple of the patch size loses its remainder in the patch embedding
   and the map is stretched back), ClearCLIP and ProxyCLIP first zero-pad it, centred, to a
   multiple of `pad_to` (the patch size, 56 for ProxyCLIP) and cut the padding off the
   upsampled map.
4. Overlaps are averaged per pixel; the result is resized bilinearly to the original image.

"Whole-image" inference (NACLIP on VOC) is one window covering the image.
Unlike the MaskCLIP generator (maskclip.py), which averages windows on the patch grid of an
image resized to patch multiples, this averages in pixel space at the resized image's size.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..geometry import rescale_size
from .maskclip import window_starts

CropFn = Callable[[torch.Tensor], torch.Tensor]


def slide_boxes(height: int, width: int, window: Optional[int], stride: Optional[int]) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) pixel boxes of the windows; window None -> one box covering the image."""
    if window is None:
        return [(0, 0, height, width)]
    if not window > 0 or stride is None or not 0 < stride:
        raise ValueError(f"window and stride must be positive, got window={window!r}, stride={stride!r}")
    wh, ww = min(window, height), min(window, width)
    return [(y, x, wh, ww) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]


def centred_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding to the next multiple, the odd pixel right / bottom."""
    pad_w = (-width) % multiple
    pad_h = (-height) % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def window_map(crop_fn: CropFn, crop: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
    """crop_fn's (B, M, gh, gw) map of one crop (B, 3, h, w), upsampled bilinearly to (B, M, h, w) (module doc, step 3)."""
    h, w = crop.shape[-2:]
    left = top = 0
    if pad_to is not None:
        left, right, top, bottom = centred_padding(h, w, pad_to)
        crop = F.pad(crop, (left, right, top, bottom))
    out = crop_fn(crop)
    out = F.interpolate(out, size=crop.shape[-2:], mode="bilinear", align_corners=False)
    return out[..., top : top + h, left : left + w]


def slide_average(
    crop_fn: CropFn,
    image: torch.Tensor,
    window: Optional[int],
    stride: Optional[int],
    pad_to: Optional[int] = None,
) -> torch.Tensor:
    """Per-pixel mean (B, M, H, W) of the upsampled window maps over the windows covering each pixel.

    image: (B, 3, H, W), normalised; crop_fn maps a crop to a map on its patch grid.
    """
    _, _, height, width = image.shape
    total = count = None
    for y, x, h, w in slide_boxes(height, width, window, stride):
        part = window_map(crop_fn, image[:, :, y : y + h, x : x + w], pad_to)
        if total is None:
            total = part.new_zeros(part.shape[0], part.shape[1], height, width)
            count = part.new_zeros(1, 1, height, width)
        total[:, :, y : y + h, x : x + w] += part
        count[:, :, y : y + h, x : x + w] += 1
    return total / count


def harness_resize(images: torch.Tensor, img_scale: Sequence[int]) -> torch.Tensor:
    """(B, 3, H, W) -> the keep-ratio size of `img_scale` (mmcv rounding), bilinear without antialiasing.

    mmseg resizes the uint8 image with OpenCV's INTER_LINEAR (the same sampling positions and
    weights, computed in fixed point and rounded to uint8): on uint8 input, round the result
    to reproduce it to within one grey level.
    """
    size = rescale_size(images.shape[-2], images.shape[-1], img_scale)
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def to_original(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, M, h, w) maps to the original image size."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
