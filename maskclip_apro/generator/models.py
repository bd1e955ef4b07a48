"""Loading open_clip models: names, pretrained tags, local checkpoints, and the tiny test configs."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


@lru_cache(maxsize=None)
def register_tiny_configs() -> None:
    """Make tiny_vit / tiny_resnet (random-weight test models) known to open_clip, once."""
    open_clip.add_model_config(CONFIG_DIR)


def text_weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every non-image parameter: identifies random weights for the text cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("visual."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_clip(
    model: str, pretrained: Optional[str], device: Union[str, torch.device] = "cpu"
) -> tuple[nn.Module, str]:
    """An open_clip model in eval mode and a string identifying its weights (for the text cache).

    pretrained: None -> random weights drawn from a fixed seed, so smoke runs and reruns agree
    (nothing downloads); an open_clip tag such as "openai"
    (open_clip downloads it on first use; QuickGELU is set from the tag's config); otherwise a
    local checkpoint file (open_clip loads it with weights_only=True). OpenAI weights from a file
    need a "-quickgelu" model name, e.g. "ViT-B-16-quickgelu".
    """
    register_tiny_configs()
    if not isinstance(model, str) or model not in open_clip.list_models():
        raise ValueError(
            f"model {model!r} is not an open_clip model name (e.g. ViT-B-16, ViT-L-14, RN50, RN101, RN50x16) "
            f"nor one of the tiny test models {TINY_MODELS}"
        )
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model(model, pretrained=None)
        identity = "random:" + text_weights_fingerprint(clip)
    elif pretrained in open_clip.list_pretrained_tags_by_model(model):
        quick_gelu = bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
        clip = open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=quick_gelu)
        identity = f"tag:{pretrained}"
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise FileNotFoundError(
                f"pretrained checkpoint file {str(path)!r} not found. Offline, pass the path of a local "
                f"open_clip checkpoint (.bin/.pt/.safetensors state dict) for {model}; with network access "
                f"pass a pretrained tag instead ({', '.join(tags) if tags else 'none exist for this model'})."
            )
        clip = open_clip.create_model(model, pretrained=str(path))
        stat = path.stat()
        identity = f"file:{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    return clip.to(device).eval(), identity


def image_mean_std(clip: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's normalisation constants as (3,) tensors."""
    cfg = open_clip.get_model_preprocess_cfg(clip)
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
