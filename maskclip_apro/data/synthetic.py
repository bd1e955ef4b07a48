"""A seeded in-memory dataset of coloured, textured shapes with exact masks.

Each region is colour-coherent (its class colour plus a mild class texture and pixel
noise) and classes differ strongly in colour, so an edge-aware refiner can repair a
noisy unary; this makes it a test bed for refiners and the metric without any files.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..constants import IGNORE_INDEX
from .base import LabelledBy, Sample, Source, check_limit

CLASS_NAMES = ["background", "ball", "box", "kite", "ring"]
_COLOURS = np.array(
    [[120, 130, 120], [210, 50, 40], [40, 80, 210], [235, 205, 40], [150, 50, 180]], dtype=np.float64
)
_SIZE_RANGE = (64, 96)


def _ellipse(yy, xx, cy, cx, r, rng):
    ry, rx = r * rng.uniform(0.7, 1.0, size=2)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _box(yy, xx, cy, cx, r, rng):
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    a, b = r * rng.uniform(0.6, 1.0, size=2)
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def _kite(yy, xx, cy, cx, r, rng):
    angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, size=3)
    py, px = cy + r * 1.2 * np.sin(angles), cx + r * 1.2 * np.cos(angles)
    sides = []
    for k in range(3):
        j = (k + 1) % 3
        sides.append((px[j] - px[k]) * (yy - py[k]) - (py[j] - py[k]) * (xx - px[k]))
    return (sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0) | (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)


def _ring(yy, xx, cy, cx, r, rng):
    d = np.hypot(yy - cy, xx - cx)
    return (d <= r) & (d >= r * rng.uniform(0.4, 0.6))


_SHAPES = {1: _ellipse, 2: _box, 3: _kite, 4: _ring}


def _texture(cls: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Brightness offset (H, W) that gives each class its own mild texture."""
    if cls == 0:
        return 12.0 * np.sin(yy / 9.0) * np.cos(xx / 13.0)
    if cls == 1:
        return -25.0 * np.clip(np.hypot(yy - cy, xx - cx) / r, 0, 1)
    if cls == 2:
        return 10.0 * np.where((yy // 3) % 2 == 0, 1.0, -1.0)
    if cls == 3:
        return 10.0 * np.where(((yy // 4) + (xx // 4)) % 2 == 0, 1.0, -1.0)
    return np.zeros_like(yy)


class SyntheticDataset(LabelledBy):
    """num_images seeded images of background plus 2-3 of: ball, box, kite, ring.

    size: (H, W), an int for square images, or None for sizes drawn in [64, 96].
    The split name enters the seed, so "train" and "val" differ. ignore_boundary marks
    the one-pixel seam between regions as 255, as VOC marks object outlines.
    """

    def __init__(
        self,
        num_images: int = 8,
        size: int | tuple[int, int] | list[int] | None = None,
        seed: int = 0,
        split: str = "val",
        ignore_boundary: bool = True,
        limit: int | None = None,
    ) -> None:
        check_limit(limit)
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if len(hw) != 2 or min(hw) < 16:
                raise ValueError(f"size must be an int or (H, W) with both >= 16, got {size!r}")
            size = (int(hw[0]), int(hw[1]))
        self.num_images = min(num_images, limit) if limit is not None else num_images
        self.size = size
        self.seed = seed
        self.split = split
        self.ignore_boundary = ignore_boundary
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_images

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for SyntheticDataset of length {len(self)}")
        return index % len(self)

    def source(self, index: int) -> Source:
        """Name and generation parameters of sample `index` (see SegDataset.source)."""
        index = self._index(index)
        drawn = f"synthetic seed={self.seed} split={self.split} size={self.size} index={index}"
        return Source(f"synthetic_{self.split}_{index:04d}", drawn, f"{drawn} ignore_boundary={self.ignore_boundary}")

    def __getitem__(self, index: int) -> Sample:
        index = self._index(index)
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), index])
        image, label = self._draw(rng)
        return Sample(f"synthetic_{self.split}_{index:04d}", image, label)

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.size if self.size is not None else tuple(int(v) for v in rng.integers(*_SIZE_RANGE, size=2, endpoint=True))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        label = np.zeros((h, w), dtype=np.uint8)
        shade = _texture(0, yy, xx, 0, 0, 1) + 20.0 * (yy / h - 0.5)
        image = _COLOURS[0] + rng.uniform(-10, 10, size=3) + shade[..., None]
        classes = rng.permutation(np.arange(1, len(CLASS_NAMES)))[: rng.integers(2, 4, endpoint=True)]
        for cls in classes:
            r = rng.uniform(0.18, 0.3) * min(h, w)
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            mask = _SHAPES[int(cls)](yy, xx, cy, cx, r, rng)
            colour = _COLOURS[cls] + rng.uniform(-15, 15, size=3)
            region = colour + _texture(int(cls), yy, xx, cy, cx, r)[..., None]
            image[mask] = region[mask]
            label[mask] = cls
        image += rng.normal(0.0, 3.0, size=image.shape)
        if self.ignore_boundary:
            seam = np.zeros((h, w), dtype=bool)
            seam[:, :-1] |= label[:, :-1] != label[:, 1:]
            seam[:-1, :] |= label[:-1, :] != label[1:, :]
            label = np.where(seam, IGNORE_INDEX, label).astype(np.uint8)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), label
