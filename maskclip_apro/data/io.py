"""Image and label file IO with clear errors, and atomic writes.

Every reader names the file in its error: FileNotFoundError for a missing path,
ValueError for a file that exists but is not a usable image or label map.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .palette import voc_palette

PathLike = str | os.PathLike

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(path: PathLike, what: str) -> Image.Image:
    """Open and fully decode a file, turning PIL's many failure modes into one clear error."""
    path = Path(path)
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} file {str(path)!r} {reason}")
    with open(path, "rb") as f:
        try:
            im = Image.open(f)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read {what} file {str(path)!r}: not an image ({e})") from None
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read {what} file {str(path)!r}: corrupt or truncated ({e})") from None
    return im


def _composite_on_white(im: Image.Image) -> Image.Image:
    """RGBA -> RGB with transparent areas shown as white (as viewers display them)."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_image(path: PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) RGB.

    EXIF orientation is applied. Grayscale and palette images are expanded to RGB;
    images with transparency (RGBA, LA, palette with a transparent index) are composited
    on white; 16-bit images are scaled to 8 bits (value / 257, rounded; wider integer
    images are clipped to that range).
    """
    im = _open(path, "image")
    try:
        im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image file {str(path)!r}: bad EXIF data ({e})") from None
    if im.mode in _WIDE_MODES:
        wide = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(f"image file {str(path)!r} holds floating-point pixels (mode F); expected an 8- or 16-bit image")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        im = _composite_on_white(im)
    elif im.mode != "RGB":
        im = im.convert("RGB")
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image file {str(path)!r} decoded to shape {array.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(array)


def load_label(path: PathLike) -> np.ndarray:
    """Read a label map: palette (P) or grayscale (L) PNG -> uint8 (H, W) of class indices.

    16/32-bit integer label images give int32. Colour (RGB) label images are refused:
    their classes cannot be recovered without a colour table.
    """
    im = _open(path, "label")
    if im.mode in ("P", "L"):
        return np.array(im, dtype=np.uint8)
    if im.mode in _WIDE_MODES:
        return np.array(im).astype(np.int32)
    raise ValueError(
        f"label file {str(path)!r} has image mode {im.mode!r}; expected a palette (P) or grayscale (L) "
        "PNG whose pixel values are class indices"
    )


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Write `path` all-or-nothing: a temp file in the same directory, then os.replace.

    Parent directories are created. On an exception the temp file is removed and `path`
    keeps its old content (or stays absent), so a crash never leaves a half-written file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _as_label_array(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{name} values must be in [0, 255] for a PNG, got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.uint8)


def _as_palette(palette: np.ndarray | None) -> np.ndarray:
    if palette is None:
        return voc_palette(256)
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= palette.shape[0] <= 256:
        raise ValueError(f"palette must have shape (N, 3) with N <= 256, got {palette.shape}")
    return palette.astype(np.uint8)


def save_label_png(path: PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save class indices as a palette (P mode) PNG, atomically. palette: (N, 3), default VOC."""
    im = _palette_image(_as_label_array(labels), _padded_palette(palette))
    with atomic_write(path) as f:
        im.save(f, format="PNG")


def _padded_palette(palette: np.ndarray | None) -> np.ndarray:
    """The palette as 256 colours (unused entries black)."""
    given = _as_palette(palette)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(given)] = given
    return full


def _palette_image(array: np.ndarray, palette256: np.ndarray) -> Image.Image:
    im = Image.new("P", (array.shape[1], array.shape[0]))
    im.putpalette(palette256.reshape(-1).tolist())
    im.frombytes(np.ascontiguousarray(array).tobytes())
    return im


def _format_for(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {str(path)!r} from its extension")
    return fmt


def save_overlay(
    path: PathLike,
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> None:
    """Save `image` blended with the colours of `labels` (weight alpha), atomically.

    Pixels labelled ignore_index are left as in the image. The format follows the
    extension of `path` (.png, .jpg, ...).
    """
    path = Path(path)
    fmt = _format_for(path)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    array = _as_label_array(labels)
    if array.shape != image.shape[:2]:
        raise ValueError(f"labels shape {array.shape} does not match image shape {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = _padded_palette(palette)[array].astype(np.float32)
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    keep = array == ignore_index
    blend[keep] = image[keep]
    out = Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8), mode="RGB")
    with atomic_write(path) as f:
        out.save(f, format=fmt)
