"""Every file the package writes goes through here: atomically, with the umask's permissions.

- atomic_write / atomic_directory: a temporary next to the target, renamed into place when
  complete, so a crash or Ctrl-C never leaves a half-written file or checkpoint folder.
  Temporaries are named `.<name>.<host>-<pid>.<random>.tmp`; remove_stale_temporaries deletes
  those whose writer (on this host) is gone, and nothing else.
- Permissions: what a plain open() / mkdir() would give (0666 / 0777 less the umask), not
  tempfile's private 0600 / 0700.
- Formats: text and JSON (write_text, write_json), safetensors (save_safetensors: no pickle),
  label maps as palette PNGs (save_label_png), RGB images in the format of the extension
  (save_rgb).
- output_path places a file under an output folder and refuses names that would leave it;
  check_output_dir refuses an output folder that cannot be one (a file, under a file, read-only,
  a symbolic link inside it); lock_output_dir keeps two runs out of one output folder.

Readers live elsewhere: data/io.py (images, labels), student/checkpoint.py (checkpoints).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Optional

import numpy as np
import torch
from PIL import Image

from .palette import voc_palette

PathLike = str | os.PathLike

_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[a-z0-9_]+\.tmp$")


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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_temp_owner()}."


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Write `path` all-or-nothing: a temporary file in the same folder, then os.replace.

    Parent folders are created. On an exception the temporary is removed and `path` keeps its
    old content (or stays absent). A writer killed outright leaves its temporary behind for
    remove_stale_temporaries.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Fill a folder all-or-nothing: yields a temporary folder beside `path`, renamed to `path` when
    the block ends without an exception (an existing `path` is replaced); removed otherwise.

    Write the files inside with the functions of this module. Between removing an old `path`
    and the rename a crash can lose both (a checkpoint folder: the previous step's folder is
    still there, which is why checkpoints are kept under new names).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    """Delete the temporaries (files and folders) of atomic_write / atomic_directory that dead
    processes left in `folder` and its direct subfolders.

    Only entries named as this module names them, made on this host by a process that no longer
    runs, are removed; anything else (other files, a live writer's temporary) is left.
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
            if match is None or entry.is_symlink() or match["host"] != host or _process_alive(int(match["pid"])):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
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


def write_text(path: PathLike, text: str) -> None:
    """A UTF-8 text file, written atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: PathLike, payload: Any, indent: Optional[int] = 2) -> None:
    """JSON, written atomically; NumPy and torch scalars are written as numbers."""
    write_text(path, json.dumps(payload, indent=indent, default=float))


def save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Tensors (moved to the CPU, made contiguous) as a safetensors file, written atomically.

    The same tensors and metadata give the same bytes: safetensors writes the metadata in a hash
    map's order, which changes from run to run, so the header is rewritten with sorted keys.
    """
    from safetensors.torch import save

    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(_sorted_header(payload))


def _sorted_header(payload: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted, padded with spaces to 8 bytes as the
    format requires (tensor offsets are relative to the data, so the data is unchanged)."""
    size = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload[8 + size :]


def _as_label_array(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{name} values must be in [0, 255] for a PNG, got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.uint8)


def padded_palette(palette: np.ndarray | None) -> np.ndarray:
    """A palette (N, 3), N <= 256 (default: VOC's), as 256 uint8 colours with unused entries black."""
    if palette is None:
        return voc_palette(256)
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= palette.shape[0] <= 256:
        raise ValueError(f"palette must have shape (N, 3) with N <= 256, got {palette.shape}")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(palette)] = palette.astype(np.uint8)
    return full


def save_label_png(
    path: PathLike, labels: np.ndarray, palette: np.ndarray | None = None, *, grayscale: bool = False
) -> None:
    """Class indices (H, W) in [0, 255] as a palette (P mode) PNG, atomically.

    The pixel values are the class indices (the ignore index stays 255) whatever the palette
    (N, 3), which only sets the colours viewers show (default VOC's). grayscale=True writes an
    L-mode PNG instead, as mmseg's `*TrainIds.png` files are; both read back the same
    (data.io.load_label).
    """
    array = _as_label_array(labels)
    if grayscale:
        im = Image.fromarray(np.ascontiguousarray(array))
    else:
        im = Image.new("P", (array.shape[1], array.shape[0]))
        im.putpalette(padded_palette(palette).reshape(-1).tolist())
        im.frombytes(np.ascontiguousarray(array).tobytes())
    with atomic_write(path) as f:
        im.save(f, format="PNG")


def save_rgb(path: PathLike, image: np.ndarray) -> None:
    """A uint8 (H, W, 3) RGB image, atomically, in the format of the extension (.png, .jpg, ...)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {str(path)!r} from its extension")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format=fmt)


def check_output_dir(path: PathLike, links: bool = True) -> Path:
    """`path` as an output folder, or ValueError saying why it cannot be one: it or a folder above
    it is a file, the nearest existing folder cannot be written (a read-only file system, no
    permission), or (links=True) it holds a symbolic link (files are written only inside the
    folder, never through a link such as a linked labels/)."""
    path = Path(os.path.abspath(path))
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise ValueError(f"output_dir {str(path)!r} {what}; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {str(path)!r} cannot be written: {str(existing)!r} is on a read-only file "
                         "system or not writable by this user")
    if links and existing == path:
        linked = sorted(entry.name for entry in os.scandir(path) if entry.is_symlink())
        if linked:
            raise ValueError(f"output_dir {str(path)!r} holds symbolic link(s) {linked}; files are written only "
                             "inside output_dir, never through a link: remove the link or choose another output_dir")
    return path


LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_output_dir(path: PathLike) -> Iterator[Path]:
    """Hold `path` for one run: a second run on the same folder gets a ValueError naming the
    holder, so two runs never interleave their labels and records. The lock (flock on
    <path>/.lock) ends with the block or the process; the file stays."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not kept apart
        yield path
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"output_dir {str(path)!r} is in use by another run ({holder}); wait for it to end "
                             "or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)
