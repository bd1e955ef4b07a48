"""Side-by-side panels: titled columns of RGB images of equal height."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .data.io import atomic_write
from .data.palette import voc_palette


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Class indices (H, W) to RGB with the VOC palette (255 = ignore stays white)."""
    colours = voc_palette(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    rgb = colours[np.clip(labels, 0, len(colours) - 1)]
    rgb[labels == 255] = 255
    return rgb


def make_panel(columns: Sequence[tuple[str, np.ndarray]], height: int = 240) -> np.ndarray:
    """Each (title, uint8 (H, W, 3) image) resized to `height` and placed left to right under its title."""
    title_h = 18
    tiles = []
    for title, image in columns:
        im = Image.fromarray(image)
        width = max(1, round(im.width * height / im.height))
        tile = Image.new("RGB", (width, height + title_h), "white")
        tile.paste(im.resize((width, height), Image.NEAREST), (0, title_h))
        ImageDraw.Draw(tile).text((4, 3), title, fill="black")
        tiles.append(np.asarray(tile))
    return np.concatenate(tiles, axis=1)


def save_rgb(path, image: np.ndarray) -> None:
    """A uint8 (H, W, 3) image as PNG, written atomically."""
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")
