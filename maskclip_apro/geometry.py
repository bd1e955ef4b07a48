"""Image geometry shared by inference and training: the keep-ratio rescale of mmseg / mmcv.

A dataset's standard scale `img_scale = (a, b)` means: resize keeping the aspect ratio so that
the long side is at most max(a, b) and the short side at most min(a, b), as large as both
bounds allow (images are scaled up as well as down). MaskCLIP's test pipelines use
(2048, 512) for Pascal VOC and COCO-Stuff (short side 512 unless the long side would pass
2048) and (520, 520) for Pascal Context (long side 520).
"""

from __future__ import annotations

from typing import Sequence


def check_img_scale(img_scale: Sequence[int], name: str = "img_scale") -> tuple[int, int]:
    """(a, b) as two positive integers, or ValueError naming `name`."""
    try:
        values = tuple(img_scale)
    except TypeError:
        raise ValueError(f"{name} must be a pair of positive integers [long, short], got {img_scale!r}") from None
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a pair of positive integers [long, short], got {img_scale!r}")
    return values[0], values[1]


def rescale_size(height: int, width: int, img_scale: Sequence[int]) -> tuple[int, int]:
    """(H', W') of the keep-ratio rescale to `img_scale` (module doc), rounded as mmcv does."""
    a, b = check_img_scale(img_scale)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    factor = min(max(a, b) / max(height, width), min(a, b) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)
