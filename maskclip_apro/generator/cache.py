"""Disk cache of text embeddings: one safetensors file per (model, checkpoint, templates, names).

Files are written atomically (maskclip_apro.writing) and read with safetensors (no
unpickling). The names are stored in the metadata and checked on load. A file
that cannot be read, names other classes, has another embedding width or holds NaN or inf
values is a miss: a warning names the file, and the embeddings are recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..writing import save_safetensors

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/maskclip_apro/text, ~/.cache/maskclip_apro/text when unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "maskclip_apro" / "text"


def cache_path(cache_dir: Path, model: str, identity: str, templates: Sequence[str], names: Sequence[str]) -> Path:
    """File for the embeddings of `names`, keyed by model, checkpoint identity, templates and names."""
    key = json.dumps(
        {"v": CACHE_VERSION, "model": model, "checkpoint": identity, "templates": list(templates), "names": list(names)}
    )
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def load_cached(path: Path, names: Sequence[str], width: Optional[int] = None) -> Optional[torch.Tensor]:
    """The cached (M, D) embeddings of `names` (D == width when given), or None on a miss (module doc)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads(f.metadata().get("names", "null"))
            emb = f.get_tensor("embeddings")
    except Exception as err:  # a corrupt or foreign file is a miss; it is rewritten
        return _stale(path, f"it cannot be read ({type(err).__name__})")
    if stored != list(names) or emb.dim() != 2 or emb.shape[0] != len(names):
        return _stale(path, "it holds other class names")
    if width is not None and emb.shape[1] != width:
        return _stale(path, f"its embeddings are {emb.shape[1]} wide, the model's {width}")
    if not bool(torch.isfinite(emb).all()):
        return _stale(path, "it holds NaN or inf values")
    return emb


def _stale(path: Path, reason: str) -> None:
    warnings.warn(f"text-embedding cache file {str(path)!r} is not usable ({reason}): recomputing it", stacklevel=3)
    return None


def save_cached(path: Path, emb: torch.Tensor, names: Sequence[str]) -> None:
    """The embeddings with their class names in the metadata, written atomically (maskclip_apro.writing)."""
    save_safetensors(path, {"embeddings": emb}, metadata={"names": json.dumps(list(names))})
