"""The text classifier: class names (with synonyms) through prompt templates, cached on disk.

Each class line may hold synonyms "a, b, c"; each name is embedded as the mean of its
L2-normalised prompt embeddings, renormalised; a class scores the max over its synonyms.

Background (a dataset whose class 0 is background):
- None: the class list is used as is ("background" is just another name).
- {"mode": "prompts", "names": [...]}: class 0 is scored by the max over those names.
- {"mode": "threshold", "thresh": t}: class 0 gets no text. Its logit is
      z_0 = logsumexp_k(z_k, k >= 1) + log(t),
  so the softmax over all K classes gives P(0) = t / (1 + t) everywhere and P(k) = p_k / (1 + t),
  p = softmax of the foreground logits alone: the argmax is background exactly where
  max_k p_k < t (an exact tie p_max == t also goes to background, index 0 coming first).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from .cache import cache_path, default_cache_dir, load_cached, save_cached

PROMPT_BATCH = 256


def parse_class_names(class_names: Sequence[str]) -> list[list[str]]:
    """Each class line -> its synonyms ("a, b" -> ["a", "b"]); rejects empty lists and duplicates."""
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of names, got {class_names!r}")
    classes = []
    for i, line in enumerate(class_names):
        if not isinstance(line, str):
            raise ValueError(f"class_names[{i}] must be a string, got {type(line).__name__}")
        names = [n.strip() for n in line.split(",")]
        if not all(names):
            raise ValueError(f"class_names[{i}] = {line!r} has an empty name")
        classes.append(names)
    seen: dict[str, int] = {}
    dups = []
    for i, names in enumerate(classes):
        key = names[0].lower()
        if key in seen:
            dups.append(f"{names[0]!r} (classes {seen[key]} and {i})")
        seen.setdefault(key, i)
    if dups:
        raise ValueError(f"duplicate class names in class_names: {', '.join(dups)}")
    return classes


def parse_background(background: Optional[Mapping[str, Any]], num_classes: int) -> Optional[dict]:
    """Validate the background setting; returns None or a dict with mode and names/thresh."""
    if background is None:
        return None
    if not isinstance(background, Mapping) or background.get("mode") not in ("prompts", "threshold"):
        raise ValueError(
            "background must be None, {'mode': 'prompts', 'names': [...]} or {'mode': 'threshold', 'thresh': t}, "
            f"got {background!r}"
        )
    if num_classes < 2:
        raise ValueError("background needs class 0 (background) and at least one foreground class in class_names")
    if background["mode"] == "prompts":
        names = background.get("names")
        if isinstance(names, str) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"background names must be a non-empty list of non-empty strings, got {names!r}")
        return {"mode": "prompts", "names": [n.strip() for n in names]}
    thresh = background.get("thresh")
    if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 < thresh <= 1:
        raise ValueError(f"background thresh must be a number in (0, 1], got {thresh!r}")
    return {"mode": "threshold", "thresh": float(thresh)}


def _trimmable(clip: nn.Module) -> bool:
    return (
        isinstance(clip, open_clip.CLIP)
        and getattr(clip, "attn_mask", None) is not None
        and clip.text_pool_type in ("argmax", "eos")
    )


def encode_tokens(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Text features (N, D), not normalised, with the context trimmed to the longest real prompt.

    With a causal mask no token sees a later one, so dropping the trailing padding columns
    (and slicing the positional embedding and mask) leaves the pooled EOT feature unchanged.
    Models without a causal mask or with other pooling run the full context.
    """
    if not _trimmable(clip):
        return clip.encode_text(tokens)
    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x @ clip.text_projection if clip.text_projection is not None else x


def encode_prompts(clip: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of the prompts, PROMPT_BATCH at a time."""
    device = next(clip.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), PROMPT_BATCH):
            tokens = tokenizer(list(prompts[start : start + PROMPT_BATCH])).to(device)
            out.append(F.normalize(encode_tokens(clip, tokens).float(), dim=-1))
    return torch.cat(out)


def name_embeddings(clip: nn.Module, tokenizer: Any, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(M, D): per name, the mean of its normalised prompt embeddings, renormalised."""
    prompts = [t.format(n) for n in names for t in templates]
    emb = encode_prompts(clip, tokenizer, prompts).reshape(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def text_width(clip: nn.Module) -> Optional[int]:
    """The width D of the model's text embeddings (None when the model does not say)."""
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if isinstance(proj, torch.Tensor) and proj.dim() == 2:
        return int(proj.shape[1])
    return None


class TextClassifier(nn.Module):
    """Class logits from unit features: s * cos to each name, max over a class's names.

    embeddings (M, D) unit rows; owner (M,) the class of each name; threshold: background rule
    of the module docstring (class 0 has no names then).
    """

    def __init__(
        self, embeddings: torch.Tensor, owner: torch.Tensor, num_classes: int, threshold: Optional[float] = None
    ) -> None:
        super().__init__()
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.register_buffer("owner", owner, persistent=False)
        self.num_classes = num_classes
        self.threshold = threshold

    def forward(self, features: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """features (B, D, h, w), unit norm over D -> logits (B, K, h, w)."""
        name_logits = logit_scale * torch.einsum("bdhw,md->bmhw", features, self.embeddings.to(features.dtype))
        b, _, h, w = name_logits.shape
        logits = name_logits.new_full((b, self.num_classes, h, w), float("-inf"))
        index = self.owner.view(1, -1, 1, 1).expand_as(name_logits)
        logits.scatter_reduce_(1, index, name_logits, reduce="amax", include_self=True)
        if self.threshold is not None:
            logits[:, 0] = torch.logsumexp(logits[:, 1:], dim=1) + math.log(self.threshold)
        return logits


def build_text_classifier(
    clip: nn.Module,
    model: str,
    identity: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    background: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[Union[str, Path]] = None,
) -> tuple[TextClassifier, list[str]]:
    """The classifier for `class_names` and the display names (first synonym of each line)."""
    classes = parse_class_names(class_names)
    bg = parse_background(background, len(classes))
    if bg is not None and bg["mode"] == "prompts":
        classes[0] = bg["names"]
    elif bg is not None:
        classes[0] = []
    names: list[str] = []
    owner: list[int] = []
    for k, synonyms in enumerate(classes):
        for n in synonyms:
            names.append(n)
            owner.append(k)
    unique = list(dict.fromkeys(names))

    path = cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), model, identity, templates, unique)
    emb = load_cached(path, unique, text_width(clip))
    if emb is None:
        emb = name_embeddings(clip, open_clip.get_tokenizer(model), unique, templates).cpu()
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(
                f"the text tower of {model} gives NaN or inf embeddings: its weights are broken (check model.pretrained)"
            )
        try:
            save_cached(path, emb, unique)
        except OSError as err:  # a read-only cache costs time, not correctness
            warnings.warn(f"could not write the text-embedding cache {path}: {err}", stacklevel=2)
    row_of = {n: i for i, n in enumerate(unique)}
    rows = torch.tensor([row_of[n] for n in names], dtype=torch.long)
    classifier = TextClassifier(
        embeddings=emb[rows],
        owner=torch.tensor(owner, dtype=torch.long),
        num_classes=len(classes),
        threshold=bg["thresh"] if bg is not None and bg["mode"] == "threshold" else None,
    )
    display = [line.split(",")[0].strip() for line in class_names]
    return classifier, display
