"""Image and label file readers with clear errors and a pixel limit (and the error a weights file
that cannot be loaded turns into).

Every reader names the file in its error: FileNotFoundError for a missing path,
ValueError for a file that exists but is not a usable image or label map. Writing is
maskclip_apro.writing's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

PathLike = str | os.PathLike

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
PIXEL_LIMIT_ENV = "MASKCLIP_MAX_IMAGE_PIXELS"
_PIL_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS or 89_478_485
_max_pixels: int | None = None


def set_max_image_pixels(limit: int | None) -> None:
    """Largest image (width x height) the readers decode; larger files are refused with a clear error.

    None restores the default: the environment variable MASKCLIP_MAX_IMAGE_PIXELS when set, else
    Pillow's decompression-bomb limit (89,478,485 pixels, about 9459 x 9459). The guard exists
    because a small compressed file can expand to gigabytes; raise it for trusted large photos.
    """
    global _max_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_image_pixels must be a positive integer or null, got {limit!r}")
    _max_pixels = limit


def max_image_pixels() -> int:
    """The pixel limit in force (see set_max_image_pixels)."""
    if _max_pixels is not None:
        return _max_pixels
    value = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not value:
        return _PIL_DEFAULT_LIMIT
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment variable {PIXEL_LIMIT_ENV}={value!r} must be a positive integer (pixels)")
    return int(value)


def _open(path: PathLike, what: str) -> Image.Image:
    """Open and fully decode a file, turning PIL's many failure modes into one clear error.

    The pixel limit is ours (max_image_pixels), checked from the header before decoding, so
    Pillow's own guard (a warning, then an error at twice its limit) is switched off meanwhile.
    """
    path = Path(path)
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} file {str(path)!r} {reason}")
    limit = max_image_pixels()
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with open(path, "rb") as f:
            try:
                im = Image.open(f)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise ValueError(f"cannot read {what} file {str(path)!r}: not an image ({e})") from None
            pixels = im.width * im.height
            if pixels > limit:
                raise ValueError(
                    f"{what} file {str(path)!r} is {im.width} x {im.height} = {pixels:,} pixels, over the limit of "
                    f"{limit:,} (a guard against decompression bombs); if the file is trusted, raise the limit with "
                    f"max_image_pixels=N or the environment variable {PIXEL_LIMIT_ENV}=N"
                )
            try:
                im.load()
            except (OSError, SyntaxError, ValueError) as e:
                raise ValueError(f"cannot read {what} file {str(path)!r}: corrupt or truncated ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    return im


def _composite_on_white(im: Image.Image) -> Image.Image:
    """RGBA -> RGB with transparent areas shown as white (as viewers display them)."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_to_8bit(wide: np.ndarray) -> np.ndarray:
    """16-bit values to 8 bits: value / 257, rounded (65535 -> 255); wider integers are clipped."""
    return np.clip(np.rint(wide.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (a new image; the argument is untouched)."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _array_image(array: np.ndarray) -> Image.Image:
    """A uint8 / uint16 array of shape (H, W), (H, W, 1), (H, W, 2: gray + alpha), (H, W, 3) or (H, W, 4)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)) or 0 in array.shape:
        raise ValueError(f"image array must have shape (H, W) or (H, W, 1-4 channels), got {array.shape}")
    if array.dtype == np.uint16:
        array = _wide_to_8bit(array)
    if array.dtype != np.uint8:
        raise ValueError(
            f"image array must be uint8 (or uint16), got {array.dtype}: float images are ambiguous "
            "([0, 1] or [0, 255]); convert with (x * 255).round().astype(np.uint8)"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def load_image(image: PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """An image file path, a PIL image or an array as uint8 (H, W, 3) RGB: one conversion for every input.

    EXIF orientation is applied (files and PIL images). Grayscale and palette images are
    expanded to RGB; images with transparency (RGBA, LA, palette or RGB/L with a transparent
    colour) are composited on white; 16-bit images are scaled to 8 bits (value / 257, rounded;
    wider integer images are clipped to that range). Arrays must be uint8 or uint16.
    """
    if isinstance(image, (str, os.PathLike)):
        name, im = f"image file {str(image)!r}", _open(image, "image")
    elif isinstance(image, Image.Image):
        name, im = "the PIL image" + (f" from {image.filename!r}" if getattr(image, "filename", "") else ""), image
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read {name}: corrupt or truncated ({e})") from None
    elif isinstance(image, np.ndarray):
        name, im = "the image array", _array_image(image)
    else:
        raise ValueError(f"image must be a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    try:
        im = _upright(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read {name}: bad EXIF data ({e})") from None
    if im.mode in _WIDE_MODES:
        gray = _wide_to_8bit(np.asarray(im))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(f"{name} holds floating-point pixels (mode F); expected an 8- or 16-bit image")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        im = _composite_on_white(im)
    elif im.mode != "RGB":
        im = im.convert("RGB")
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} decoded to shape {array.shape}, expected (H, W, 3)")
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


def weights_error(path: PathLike, what: str, error: BaseException) -> ValueError:
    """The one-line error for a weights file that torch, safetensors or timm could not load.

    A pickle holding more than tensors, and a corrupt file, both fail torch's tensors-only
    loader; its advice to re-run with weights_only=False (which runs the file's code) is not
    passed on.
    """
    import pickle

    if isinstance(error, (pickle.UnpicklingError, EOFError)):
        reason = ("not a tensors-only checkpoint: the file is corrupt or holds pickled Python objects, which are "
                  "not loaded (they can run code); save a state dict of tensors (torch.save(model.state_dict())) "
                  "or a .safetensors file")
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and "weights_only" not in line]
        reason = lines[0] if lines else type(error).__name__
    return ValueError(f"cannot read {what} {str(path)!r}: {reason}")


def read_weights(path: PathLike, what: str = "weights file", mmap: bool = False) -> dict:
    """The tensors of a weights file: .safetensors, or a torch file loaded tensors-only
    (weights_only=True; a checkpoint's "state_dict" or "model" entry when it has one).

    mmap: map a torch zip file instead of reading it (a cheap check of a large file). ValueError
    (weights_error) for a file that cannot be read or holds anything but tensors.
    """
    import pickle
    import zipfile

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} not found")
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise weights_error(p, what, e) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} {str(p)!r} does not hold a state dict of tensors")
    return obj
