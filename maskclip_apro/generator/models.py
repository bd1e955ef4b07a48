"""Loading open_clip models: names, pretrained tags, local checkpoints, activations, normalisation.

Activation: OpenAI's CLIP weights were trained with QuickGELU (x * sigmoid(1.702 x)); open_clip
builds that for a "-quickgelu" model name or an "openai" tag. A local checkpoint file is
recognised as OpenAI's when it is a TorchScript archive (OpenAI's released .pt files) or holds
OpenAI's integer entries (input_resolution, context_length, vocab_size); the model is then
built with QuickGELU whatever its name says, with a warning. An open_clip-format copy of
OpenAI's weights carries no such mark: use the "-quickgelu" name for it.

The image tower's activation and LayerNorm eps can be set apart from the weights' own
(`act`, `ln_eps` of configure_image_tower): MaskCLIP's ViT runs OpenAI weights with exact GELU
and eps 1e-6, while its text embeddings come from OpenAI's own model (QuickGELU, eps 1e-5).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
ACTIVATIONS = ("quick_gelu", "gelu")
NORMALIZATIONS = ("imagenet", "model")
OPENAI_ENTRIES = ("input_resolution", "context_length", "vocab_size")
REACH_TIMEOUT_S = 3.0


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


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict stored in a checkpoint file, and whether the file is OpenAI's (module doc).

    Reads safetensors, torch.save'd state dicts (weights_only, no arbitrary unpickling), dicts
    with a "state_dict" entry, and TorchScript archives (OpenAI's .pt files). Anything else is
    a ValueError naming the file.
    """
    where = f"model.pretrained file {str(path)!r}"
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            jit = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                checkpoint = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # every reader has its own error types; all mean "not a checkpoint"
        raise ValueError(f"{where} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if (
        not isinstance(checkpoint, Mapping)
        or not checkpoint
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items())
    ):
        raise ValueError(f"{where} holds no state dict (a mapping of parameter names to tensors)")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in checkpoint.items()}
    openai = jit or any(k in state for k in OPENAI_ENTRIES)
    for key in OPENAI_ENTRIES:
        state.pop(key, None)
    return state, openai


def load_state(clip: nn.Module, state: dict[str, torch.Tensor], model: str, path: Path) -> None:
    """Load a state dict into an open_clip model (open_clip's own adjustments), or ValueError."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed

    try:
        if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        scale = getattr(clip, "logit_scale", None)
        if "logit_scale" in state and scale is not None and state["logit_scale"].ndim != scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
        resize_pos_embed(state, clip)
        missing, unexpected = clip.load_state_dict(state, strict=False)
    except Exception as err:  # shape mismatches surface as RuntimeError, odd layouts as others
        raise ValueError(
            f"model.pretrained file {str(path)!r} does not fit model {model!r}: {str(err).splitlines()[0][:300]}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"model.pretrained file {str(path)!r} does not fit model {model!r}: {len(missing)} missing "
            f"parameters (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


@contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub look-ups answer from the local cache only, without any network request."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached now (None if a TCP connection opens quickly)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        return f"{host}:{port} is unreachable: {err}"
    return None


def create_from_tag(model: str, tag: str, quick_gelu: bool) -> nn.Module:
    """open_clip's model with a pretrained tag: from the local cache when there, else downloaded.

    Without network a download attempt fails at once with a message saying how to pass a local
    file, instead of the hub client's retries.
    """
    silenced = logging.root.manager.disable
    logging.disable(max(silenced, logging.ERROR))  # open_clip logs the expected cache miss as an error
    try:
        with hub_offline():
            return open_clip.create_model(model, pretrained=tag, force_quick_gelu=quick_gelu)
    except RuntimeError as err:
        if not str(err).startswith("Failed to download"):
            raise
    finally:
        logging.disable(silenced)
    reason = hub_unreachable()
    if reason is not None:
        raise ValueError(
            f"model.pretrained={tag!r} for {model} is not in the local cache and must be downloaded, but {reason}. "
            f"Offline, pass a local checkpoint file instead: model.pretrained=/path/to/open_clip_pytorch_model.bin "
            f"(.bin, .pt, .safetensors, or OpenAI's own {model}.pt)"
        )
    return open_clip.create_model(model, pretrained=tag, force_quick_gelu=quick_gelu)


def load_clip(
    model: str, pretrained: Optional[str], device: Union[str, torch.device] = "cpu"
) -> tuple[nn.Module, str]:
    """An open_clip model in eval mode and a string identifying its weights (for the text cache).

    pretrained: None -> random weights drawn from a fixed seed, so smoke runs and reruns agree
    (nothing downloads); an open_clip tag such as "openai" (from the local cache, else
    downloaded; QuickGELU is set from the tag's config); otherwise a local checkpoint file
    (read_checkpoint; OpenAI's files are recognised and get QuickGELU, see the module doc).
    """
    register_tiny_configs()
    if not isinstance(model, str) or model not in open_clip.list_models():
        raise ValueError(
            f"model {model!r} is not an open_clip model name (e.g. ViT-B-16, ViT-L-14, RN50, RN101, RN50x16) "
            f"nor one of the tiny test models {TINY_MODELS}"
        )
    name_quick = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model(model, pretrained=None)
        identity = "random:" + text_weights_fingerprint(clip)
        quick = name_quick
    elif pretrained in open_clip.list_pretrained_tags_by_model(model):
        quick = name_quick or bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
        clip = create_from_tag(model, pretrained, quick)
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
        state, openai = read_checkpoint(path)
        quick = name_quick or openai
        if openai and not name_quick:
            alias = f"{model}-quickgelu"
            hint = f" (name it {alias} to say so)" if alias in open_clip.list_models() else ""
            warnings.warn(
                f"{str(path)!r} holds OpenAI CLIP weights, trained with QuickGELU, but {model} builds exact GELU: "
                f"building it with QuickGELU instead{hint}",
                stacklevel=2,
            )
        clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=quick)
        load_state(clip, state, model, path)
        stat = path.stat()
        identity = f"file:{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    identity += ":quick_gelu" if quick else ""
    return clip.to(device).eval(), identity


def check_tower_settings(act: Optional[str], ln_eps: Optional[float]) -> None:
    """ValueError unless act is one of ACTIVATIONS or None and ln_eps a positive number or None."""
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"model.act must be one of {ACTIVATIONS} or null, got {act!r}")
    if ln_eps is not None and (isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not ln_eps > 0):
        raise ValueError(f"model.ln_eps must be a positive number or null, got {ln_eps!r}")


def configure_image_tower(visual: nn.Module, act: Optional[str] = None, ln_eps: Optional[float] = None) -> None:
    """Set a ViT image tower's MLP activation and LayerNorm eps in place (None: keep the model's).

    Only the image tower changes: the text tower keeps what its weights need. ResNet towers
    have neither GELU nor LayerNorm, so both settings leave them unchanged.
    """
    from open_clip.transformer import QuickGELU, VisionTransformer

    check_tower_settings(act, ln_eps)
    if not isinstance(visual, VisionTransformer):
        return
    if act is not None:
        for i, block in enumerate(visual.transformer.resblocks):
            if not isinstance(getattr(block, "mlp", None), nn.Sequential) or not hasattr(block.mlp, "gelu"):
                raise ValueError(f"model.act cannot be set: image block {i} has no open_clip MLP activation")
            block.mlp.gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
    if ln_eps is not None:
        for module in visual.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(ln_eps)


def check_normalize(normalize: str) -> None:
    """ValueError unless normalize is one of NORMALIZATIONS."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"generator.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def image_mean_std(clip: nn.Module, normalize: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """Input normalisation constants as (3,) tensors: ImageNet's, or the model's own (CLIP's)."""
    check_normalize(normalize)
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        cfg = open_clip.get_model_preprocess_cfg(clip)
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
