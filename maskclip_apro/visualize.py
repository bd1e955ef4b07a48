"""Pictures of label maps: colours, overlays, and side-by-side panels with a legend of the classes shown."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .constants import IGNORE_INDEX
from .data.vocab import primary_name
from .writing import padded_palette, save_rgb

IGNORE_COLOUR = (255, 255, 255)
TITLE_HEIGHT = 18
SWATCH = 12  # legend swatch side (pixels), a 1-px black outline around the class colour
LEGEND_ROW = 18


def colorize(labels: np.ndarray, palette: Optional[np.ndarray] = None) -> np.ndarray:
    """Class indices (H, W) to uint8 RGB with `palette` (N, 3) (default VOC's); the ignore index is white."""
    labels = np.asarray(labels)
    rgb = padded_palette(palette)[np.clip(labels, 0, 255)]
    rgb[labels == IGNORE_INDEX] = IGNORE_COLOUR
    return rgb


def overlay(image: np.ndarray, labels: np.ndarray, palette: Optional[np.ndarray] = None, alpha: float = 0.5) -> np.ndarray:
    """`image` uint8 (H, W, 3) blended with the colours of `labels` (H, W) at weight alpha; pixels
    at the ignore index keep the image's colour."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image shape {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = padded_palette(palette)
    blended = np.empty_like(image)
    for top in range(0, image.shape[0], 256):  # in bands of rows: float copies of a large photo add up
        rows = slice(top, top + 256)
        band = labels[rows]
        blend = (1.0 - alpha) * image[rows].astype(np.float32) + alpha * colours[np.clip(band, 0, 255)].astype(np.float32)
        keep = band == IGNORE_INDEX
        blend[keep] = image[rows][keep]
        blended[rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return blended


def save_overlay(
    path: str | Path, image: np.ndarray, labels: np.ndarray, palette: Optional[np.ndarray] = None, alpha: float = 0.5
) -> None:
    """overlay(image, labels, palette, alpha), written atomically in the format of the extension."""
    save_rgb(path, overlay(image, labels, palette, alpha))


def legend_entries(
    label_maps: Sequence[np.ndarray], class_names: Sequence[str], palette: Optional[np.ndarray] = None
) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every class that occurs in `label_maps`, by class index, then ("ignore",
    white) when the ignore index occurs. Names are the first synonym of each class line."""
    present = sorted(set().union(*(np.unique(np.asarray(m)).tolist() for m in label_maps))) if label_maps else []
    colours = padded_palette(palette)
    entries = []
    for c in present:
        if c == IGNORE_INDEX:
            continue
        name = primary_name(class_names[c]) if 0 <= c < len(class_names) else f"class {c}"
        entries.append((name, tuple(int(v) for v in colours[c])))
    if IGNORE_INDEX in present:
        entries.append(("ignore", IGNORE_COLOUR))
    return entries


def _legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int) -> np.ndarray:
    """A white strip `width` wide: swatch and name per entry, left to right, wrapping into rows."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, row = [], 4, 0
    for name, _ in entries:
        span = SWATCH + 4 + int(np.ceil(draw.textlength(name))) + 12
        if x > 4 and x + span > width:
            x, row = 4, row + 1
        places.append((x, row * LEGEND_ROW + 3))
        x += span
    strip = Image.new("RGB", (width, (row + 1) * LEGEND_ROW + 3), "white")
    draw = ImageDraw.Draw(strip)
    for (name, colour), (x, y) in zip(entries, places):
        draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=colour, outline=(0, 0, 0))
        draw.text((x + SWATCH + 4, y), name, fill="black")
    return np.asarray(strip)


def make_panel(
    columns: Sequence[tuple[str, np.ndarray]],
    height: int = 240,
    class_names: Optional[Sequence[str]] = None,
    palette: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Columns left to right, each resized to `height` under its title; uint8 (H', W', 3).

    A column is (title, image): a uint8 (H, W, 3) RGB image shown as it is, or a label map
    (H, W) of class indices shown in the palette's colours (colorize). With `class_names`, a
    legend under the columns names the classes that occur in the label maps, each beside its
    colour.
    """
    tiles, maps = [], []
    for title, image in columns:
        image = np.asarray(image)
        if image.ndim == 2:
            maps.append(image)
            image = colorize(image, palette)
        im = Image.fromarray(image)
        width = max(1, round(im.width * height / im.height))
        tile = Image.new("RGB", (width, height + TITLE_HEIGHT), "white")
        tile.paste(im.resize((width, height), Image.NEAREST), (0, TITLE_HEIGHT))
        ImageDraw.Draw(tile).text((4, 3), title, fill="black")
        tiles.append(np.asarray(tile))
    panel = np.concatenate(tiles, axis=1)
    if class_names is None or not maps:
        return panel
    return np.concatenate([panel, _legend(legend_entries(maps, class_names, palette), panel.shape[1])], axis=0)
