"""Colour palettes for label images."""

from __future__ import annotations

import numpy as np


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: (num_classes, 3) uint8.

    Class c gets its colour by spreading the bits of c over the three channels, most
    significant first (bit 3k of c to bit 7-k of red, 3k+1 to green, 3k+2 to blue), so
    0 is black, 1 dark red, 255 (VOC's ignore) a light beige.
    """
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in [1, 256], got {num_classes}")
    ids = np.arange(num_classes)
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(8):
        for channel in range(3):
            bit = (ids >> (3 * k + channel)) & 1
            palette[:, channel] |= (bit << (7 - k)).astype(np.uint8)
    return palette
