"""Image and label file IO with clear errors, and atomic writes.

Every reader names the file in its error: FileNotFoundError for a missing path,
ValueError for a file that exists but is not a usable image or label map.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .palette import voc_palette

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


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_owner() -> str:
    """host tag + pid in temporary names, so a later run can tell a dead writer's leftovers."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}-{os.getpid()}"


_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[a-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Write `path` all-or-nothing: a temp file in the same directory, then os.replace.

    Parent directories are created. On an exception the temp file is removed and `path`
    keeps its old content (or stays absent), so a crash never leaves a half-written file.
    The file gets the permissions a plain open() would give (0666 less the umask). A writer
    killed outright leaves `.<name>.<host>-<pid>.<random>.tmp`; remove_stale_temporaries
    deletes those once that process is gone.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_temp_owner()}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine; True where that cannot be asked safely."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete atomic_write's temporaries left in `folder` and its direct subfolders by dead processes.

    Only files named as atomic_write names them, written from this host by a process that no
    longer runs, are removed; anything else (other files, a live writer's temporary) is left.
    Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _temp_owner().split("-")[0]
    removed = []
    for directory in [folder, *(d for d in folder.iterdir() if d.is_dir() and not d.is_symlink())]:
        for entry in os.scandir(directory):
            match = _TEMP_NAME.match(entry.name)
            if (match is None or not entry.is_file(follow_symlinks=False) or match["host"] != host
                    or _process_alive(int(match["pid"]))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def output_path(root: PathLike, *parts: str) -> Path:
    """root/parts..., refused (ValueError naming the parts) when it would lie outside root.

    Every file a command writes is placed with this, so a sample id such as '../../x' or an
    absolute path can never put a file outside the output folder. The check is on the path
    text ('..' and absolute parts), not on symlinks the user made inside the folder.
    """
    base = os.path.abspath(root)
    target = os.path.normpath(os.path.join(base, *(str(p) for p in parts)))
    if "\x00" in target or os.path.commonpath([base, target]) != base or target == base:
        joined = "/".join(str(p) for p in parts)
        raise ValueError(f"refusing to write {joined!r}: it would land outside the output folder {base!r}")
    return Path(target)


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
    colours = _padded_palette(palette)
    blended = np.empty_like(image)
    for top in range(0, image.shape[0], 256):  # in bands of rows: float copies of a large photo add up
        rows = slice(top, top + 256)
        blend = (1.0 - alpha) * image[rows].astype(np.float32) + alpha * colours[array[rows]].astype(np.float32)
        keep = array[rows] == ignore_index
        blend[keep] = image[rows][keep]
        blended[rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    out = Image.fromarray(blended, mode="RGB")
    with atomic_write(path) as f:
        out.save(f, format=fmt)
