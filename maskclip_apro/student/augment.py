"""Training augmentation with the semantics of mmseg 0.x's pipeline as MaskCLIP+ configures it.

Resize(img_scale, ratio_range=(0.5, 2.0)) -> RandomCrop(crop, cat_max_ratio=0.75) -> RandomFlip(0.5)
-> PhotoMetricDistortion -> Normalize -> Pad(crop, pad 0, label 255)
(chongzhou96/MaskCLIP, configs/maskclip_plus/anno_free/*.py; transforms in
mmseg/datasets/pipelines/transforms.py). The image stays uint8 until the distortion is done, as in
mmseg (cv2 rounds after each step). Padding happens after flipping, at the bottom and right; its
colour is the student's normalisation mean, so it is 0 after normalisation as mmseg's pad value.

All randomness comes from a torch.Generator the caller seeds from (seed, sample position), so a
crop is the same whichever process, worker or resumed run draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from ..geometry import check_img_scale, rescale_size

CAT_MAX_TRIES = 10
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
HSV_SHIFT = 12
# OpenCV's 8-bit RGB->HSV lookup tables (hue range 180), rounded to nearest as cv::saturate_cast.
_SDIV = torch.tensor([0] + [round((255 << HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int64)
_HDIV = torch.tensor([0] + [round((180 << HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int64)
# OpenCV's HSV->RGB sectors: for each sector, which of (v, p, q, t) become (b, g, r).
_SECTORS = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]], dtype=torch.int64)


@dataclass
class AugmentParams:
    """crop: output size; img_scale: base keep-ratio scale [long, short] (None: the image's own size);
    scale: ratio range; cat_max_ratio: mmseg's crop rule (1 = off); pad_value: RGB in [0, 1]."""

    crop: int
    img_scale: Optional[Tuple[int, int]] = None
    scale: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 1.0
    flip: bool = True
    photometric: bool = True
    pad_value: Tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if int(self.crop) < 8:
            raise ValueError(f"crop must be >= 8 pixels, got {self.crop}")
        lo, hi = (float(v) for v in self.scale)
        if not 0 < lo <= hi:
            raise ValueError(f"augment.scale must be [min, max] with 0 < min <= max, got {list(self.scale)}")
        self.scale = (lo, hi)
        if self.img_scale is not None:
            self.img_scale = check_img_scale(tuple(self.img_scale), "augment.img_scale")
        if not 0 < float(self.cat_max_ratio) <= 1:
            raise ValueError(f"augment.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if len(self.pad_value) != 3:
            raise ValueError(f"pad_value must be an RGB triple, got {self.pad_value!r}")


@dataclass
class Crop:
    """image (3, c, c) float in [0, 1]; label (c, c) int64 (255 = ignore and padding) or None;
    valid (c, c) bool: inside the image (the top-left rectangle), False on padding."""

    image: torch.Tensor
    label: Optional[torch.Tensor]
    valid: torch.Tensor


def rng_for(seed: int, position: int) -> torch.Generator:
    """A generator seeded from (seed, position): the per-sample randomness of the run."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 0x9E3779B1 + int(position) * 0x85EBCA77 + 1) % (2**63))
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi) (numpy's randint convention)."""
    return int(torch.randint(lo, hi, (), generator=g))


def resize_uint8(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, h, w): bilinear on pixel centres, no antialiasing, rounded
    (cv2.INTER_LINEAR on 8-bit images, up to its fixed-point weights)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_nearest(label: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(H, W) integer map -> (h, w), source index floor(i * H / h) (cv2.INTER_NEAREST)."""
    if tuple(label.shape) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)


def random_scale_size(height: int, width: int, params: AugmentParams, g: torch.Generator) -> Tuple[int, int]:
    """mmseg Resize(img_scale, ratio_range, keep_ratio=True): scale the base scale by a random ratio
    (int-truncated per side), then the keep-ratio rescale to it. No img_scale: base = (W, H)."""
    ratio = _uniform(g, *params.scale)
    base = params.img_scale if params.img_scale is not None else (width, height)
    scale = (max(1, int(base[0] * ratio)), max(1, int(base[1] * ratio)))
    return rescale_size(height, width, scale)


def crop_box(height: int, width: int, crop: int, g: torch.Generator,
             label: Optional[torch.Tensor] = None, cat_max_ratio: float = 1.0) -> Tuple[int, int]:
    """(top, left) of mmseg's RandomCrop.

    With cat_max_ratio < 1 and a label map, a box is redrawn (up to 10 times) unless its crop
    holds at least two categories (255 not counted) and none covers cat_max_ratio or more of the
    counted pixels; after 10 redraws the last box is kept unchecked.
    """

    def draw() -> Tuple[int, int]:
        top = _randint(g, 0, max(height - crop, 0) + 1)
        left = _randint(g, 0, max(width - crop, 0) + 1)
        return top, left

    top, left = draw()
    if cat_max_ratio < 1 and label is not None:
        for _ in range(CAT_MAX_TRIES):
            part = label[top : top + crop, left : left + crop].reshape(-1).long()
            counts = torch.bincount(part[part != IGNORE_INDEX])
            counts = counts[counts > 0]
            if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
                break
            top, left = draw()
    return top, left


@dataclass(frozen=True)
class PhotometricDraws:
    """The random choices of one PhotoMetricDistortion call; None = that step is skipped.

    brightness: added offset; contrast: factor; contrast_first: mmseg's mode 1 (contrast right
    after brightness, else last); saturation: factor; hue: offset in OpenCV hue units (0-179).
    """

    brightness: Optional[float]
    contrast_first: bool
    contrast: Optional[float]
    saturation: Optional[float]
    hue: Optional[int]


def draw_photometric(g: torch.Generator) -> PhotometricDraws:
    """Draw in mmseg's order: each step happens with probability 0.5; hue offset in [-18, 18)."""
    brightness = _uniform(g, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) if _randint(g, 0, 2) else None
    contrast_first = bool(_randint(g, 0, 2))
    contrast = None
    if contrast_first and _randint(g, 0, 2):
        contrast = _uniform(g, *CONTRAST_RANGE)
    saturation = _uniform(g, *SATURATION_RANGE) if _randint(g, 0, 2) else None
    hue = _randint(g, -HUE_DELTA, HUE_DELTA) if _randint(g, 0, 2) else None
    if not contrast_first and _randint(g, 0, 2):
        contrast = _uniform(g, *CONTRAST_RANGE)
    return PhotometricDraws(brightness, contrast_first, contrast, saturation, hue)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """uint8 -> float32 x * alpha + beta, clipped to [0, 255], truncated back to uint8."""
    return (x.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)


def rgb_to_hsv_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3, H, W) -> uint8 HSV with OpenCV's 8-bit rules (H in [0, 180), S and V in [0, 255])."""
    r, g, b = image.long()
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    s = (diff * _SDIV[v] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.div(h * _HDIV[diff] + (1 << (HSV_SHIFT - 1)), 1 << HSV_SHIFT, rounding_mode="floor")
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).to(torch.uint8)


def _one_minus_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 1 - a * b rounded once (the fused multiply-subtract OpenCV's compiled code uses)."""
    return (1.0 - a.double() * b.double()).float()


def hsv_to_rgb_uint8(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 HSV (3, H, W) (OpenCV's 8-bit ranges) -> uint8 RGB as OpenCV's vectorised 8-bit path
    computes it: float32 arithmetic with fused multiply-subtracts, results truncated. (Its scalar
    tail, the last pixels of a row whose width is not a multiple of the vector size, rounds
    instead; that difference of at most 1 is not reproduced.)"""
    inv255 = torch.tensor(1.0, dtype=torch.float32) / 255.0
    h = hsv[0].float() * (torch.tensor(6.0, dtype=torch.float32) / 180.0)
    s = hsv[1].float() * inv255
    v = hsv[2].float() * inv255
    sector = torch.trunc(h)
    h = h - sector
    table = torch.stack([v, v * (1 - s), v * _one_minus_product(s, h), v * _one_minus_product(s, 1 - h)])  # v, p, q, t
    index = _SECTORS[torch.remainder(sector.long(), 6)].permute(2, 0, 1)
    bgr = torch.gather(table, 0, index)
    return torch.trunc(bgr.flip(0) * 255.0).clamp_(0, 255).to(torch.uint8)


def photometric_distortion(image: torch.Tensor, draws: PhotometricDraws) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a uint8 RGB (3, H, W) image for given draws."""
    x = image
    if draws.brightness is not None:
        x = _convert(x, beta=draws.brightness)
    if draws.contrast_first and draws.contrast is not None:
        x = _convert(x, alpha=draws.contrast)
    if draws.saturation is not None:
        hsv = rgb_to_hsv_uint8(x)
        hsv[1] = _convert(hsv[1], alpha=draws.saturation)
        x = hsv_to_rgb_uint8(hsv)
    if draws.hue is not None:
        hsv = rgb_to_hsv_uint8(x)
        hsv[0] = ((hsv[0].long() + draws.hue) % 180).to(torch.uint8)
        x = hsv_to_rgb_uint8(hsv)
    if not draws.contrast_first and draws.contrast is not None:
        x = _convert(x, alpha=draws.contrast)
    return x


def augment(image: np.ndarray, label: Optional[np.ndarray], params: AugmentParams, g: torch.Generator) -> Crop:
    """uint8 (H, W, 3) [+ label (H, W), 255 = ignore] -> one training crop (see Crop).

    The label is resized (nearest), cropped and flipped with the image; it also drives the
    cat_max_ratio rule.
    """
    c = int(params.crop)
    h, w = image.shape[:2]
    nh, nw = random_scale_size(h, w, params, g)
    x = resize_uint8(torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1), (nh, nw))
    y = None
    if label is not None:
        y = resize_nearest(torch.from_numpy(np.asarray(label).astype(np.int64)), (nh, nw))
    top, left = crop_box(nh, nw, c, g, y, float(params.cat_max_ratio))
    x = x[:, top : top + c, left : left + c]
    y = y[top : top + c, left : left + c] if y is not None else None
    if params.flip and bool(torch.rand((), generator=g) < 0.5):
        x = x.flip(-1)
        y = y.flip(-1) if y is not None else None
    if params.photometric:
        x = photometric_distortion(x, draw_photometric(g))
    ch, cw = x.shape[-2:]
    out = torch.tensor(params.pad_value, dtype=torch.float32).view(3, 1, 1).repeat(1, c, c)
    out[:, :ch, :cw] = x.float() / 255.0
    valid = torch.zeros(c, c, dtype=torch.bool)
    valid[:ch, :cw] = True
    out_label = None
    if y is not None:
        out_label = torch.full((c, c), IGNORE_INDEX, dtype=torch.long)
        out_label[:ch, :cw] = y
    return Crop(out, out_label, valid)

