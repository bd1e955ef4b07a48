"""Pickle-free checkpoints: safetensors for tensors, JSON for the rest; atomic writes; exact resume.

Layout of a training checkpoint (one folder per saved step, `latest.json` points at the newest):

    checkpoints/step_00000100/model.safetensors        student weights (+ metadata: architecture)
    checkpoints/step_00000100/train_state.safetensors  optimizer tensors, RNG states
    checkpoints/step_00000100/train_state.json         step, optimizer param groups and scalars,
                                                       scheduler and AMP scaler states
    checkpoints/latest.json                            {"step": 100, "dir": "step_00000100"}

A folder is written under a temporary name and renamed when complete; `latest.json` is replaced
atomically afterwards, so an interrupted save never hides the previous checkpoint (writing is
maskclip_apro.writing's; a killed run's temporary folder is removed by the next run's
remove_stale_temporaries).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from torch import nn

from ..data.io import read_weights
from ..writing import atomic_directory, save_safetensors, write_json

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"
LATEST = "latest.json"


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loaded with weights_only=True (data.io.read_weights)."""
    return read_weights(path, "weights file")


def model_metadata(model: nn.Module) -> Dict[str, str]:
    """Architecture description stored alongside the weights."""
    return {
        "format": "maskclip_apro.deeplabv2",
        "backbone": str(getattr(model, "backbone_name", type(model).__name__)),
        "head": str(getattr(model, "head_name", "")),
        "num_classes": str(getattr(model, "num_classes", "")),
    }


def save_model(model: nn.Module, path: Path) -> None:
    """Student weights as safetensors (atomic)."""
    save_safetensors(path, model.state_dict(), metadata=model_metadata(model))


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str], limit: int = 8) -> str:
    """A short human-readable list of mismatched state-dict keys."""

    def few(keys: Sequence[str]) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {few(shapes)}")
    return "; ".join(parts)


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None when `state` has exactly the keys and shapes of `own`, else a description of the difference."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or shapes:
        return describe_mismatch(missing, unexpected, shapes)
    return None


def load_model(model: nn.Module, path: Path) -> None:
    """Load student weights; a file of another architecture raises ValueError naming the keys."""
    state = read_state_dict(str(path))
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem is not None:
        raise ValueError(
            f"checkpoint {path} does not match the student architecture ({_describe(_file_metadata(path))} in the "
            f"file, {_describe(model_metadata(model))} expected): {problem}"
        )
    model.load_state_dict(state)


def _file_metadata(path: Path) -> Dict[str, str]:
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _describe(meta: Mapping[str, str]) -> str:
    if "backbone" not in meta:
        return "unknown architecture"
    head = f", {meta['head']} head" if meta.get("head") else ""
    return f"{meta['backbone']}{head} with {meta.get('num_classes', '?')} classes"


def _split_optimizer(opt_state: Mapping[str, Any]) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Optional[Any] = None,
    keep: int = 1,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write checkpoint `step` under root/, point latest.json at it, drop all but `keep` newest."""
    root = Path(root)
    name = f"step_{step:08d}"
    final = root / name
    with atomic_directory(final) as tmp:
        save_model(model, tmp / MODEL_FILE)
        tensors, opt_meta = _split_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_safetensors(tmp / STATE_FILE, tensors)
        meta = {
            "step": step,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "extra": extra or {},
        }
        write_json(tmp / STATE_JSON, meta, indent=1)
    write_json(root / LATEST, {"step": step, "dir": name}, indent=None)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


CHECKPOINT_NAME = re.compile(r"step_[0-9]{8,}")


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The folder latest.json points at, or None when there is no checkpoint.

    The pointer may only name a checkpoint folder of `root` itself (step_<N>, not a link): one
    that leads elsewhere (`../other_run`, an absolute path, a symbolic link) is refused.
    """
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"checkpoint pointer {pointer} is corrupt") from None
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name) or (Path(root) / name).is_symlink():
        raise ValueError(f"checkpoint pointer {pointer} names {name!r}, not a checkpoint folder (step_<N>) of "
                         f"{Path(root)}; refusing to follow it")
    folder = Path(root) / name
    if not (folder / STATE_JSON).is_file():
        raise FileNotFoundError(f"checkpoint {folder} named by {pointer} is missing or incomplete")
    return folder


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Optional[Any] = None,
) -> Dict[str, Any]:
    """Restore everything save_checkpoint wrote; returns the JSON metadata (with "step")."""
    folder = Path(folder)
    load_model(model, folder / MODEL_FILE)
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {folder / STATE_JSON}: {e}") from None
    tensors = read_state_dict(str(folder / STATE_FILE))
    optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta
