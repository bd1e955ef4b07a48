"""Logits to labels as the SCLIP-family harness does it (SCLIP, ClearCLIP, NACLIP, ProxyCLIP).

Their `postprocess_result`, per image, on the query-level cosine logits z (one channel per
class-file name, at the original image size, after the optional PAMR):

1. p = softmax over all queries of (logit_scale * z); the per-dataset scale is 40 by default
   (SCLIP: 65 for VOC21, 50 for Context60 and COCO-Object; ClearCLIP: 50).
2. Each class takes the max of p over its queries (synonyms): P_k = max_{i: owner_i = k} p_i.
   This differs from a softmax over per-class max logits: the argmax is the same, P is not
   (the denominator runs over every query), so prob_thd compares other numbers.
3. area_thd (SCLIP, VOC21 only: 0.1): with A_k the number of pixels whose argmax is class k,
   every foreground class k >= 1 with A_k <= area_thd * sum_{j>=1} A_j gets P_k = 0.
4. labels = argmax_k P_k (ties to the lowest index), set to 0 where max_k P_k < prob_thd.

NACLIP also renormalises P to sum to one for its stored scores; the labels do not change.
"""

from __future__ import annotations

from typing import Optional

import torch


def class_max(query_probs: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, M, H, W) query probabilities -> (B, K, H, W): each class the max over its queries (step 2)."""
    owner = torch.as_tensor(owner, dtype=torch.long, device=query_probs.device)
    if query_probs.dim() != 4 or owner.shape != (query_probs.shape[1],):
        raise ValueError(
            f"query maps (B, M, H, W) and owner (M,) disagree: {tuple(query_probs.shape)} vs {tuple(owner.shape)}"
        )
    if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= num_classes):
        raise ValueError(f"owner holds class indices outside [0, {num_classes})")
    missing = sorted(set(range(num_classes)) - set(owner.tolist()))
    if missing:
        raise ValueError(f"classes {missing[:5]} have no query")
    b, _, h, w = query_probs.shape
    out = query_probs.new_zeros(b, num_classes, h, w)
    index = owner.view(1, -1, 1, 1).expand_as(query_probs)
    return out.scatter_reduce_(1, index, query_probs, reduce="amax", include_self=True)


def class_probabilities(
    name_logits: torch.Tensor, owner: torch.Tensor, num_classes: int, logit_scale: float
) -> torch.Tensor:
    """(B, M, H, W) query logits -> (B, K, H, W) class probabilities (module doc, steps 1-2)."""
    if name_logits.dim() != 4:
        raise ValueError(f"query logits must be (B, M, H, W), got {tuple(name_logits.shape)}")
    return class_max(torch.softmax(logit_scale * name_logits, dim=1), owner, num_classes)


def area_filter(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """Zero the foreground classes predicted on at most area_thd of the predicted foreground (module doc, step 3)."""
    if not 0 <= area_thd <= 1:
        raise ValueError(f"area_thd must be in [0, 1], got {area_thd!r}")
    k = probs.shape[1]
    pred = probs.argmax(dim=1)
    area = torch.stack([torch.bincount(p.reshape(-1), minlength=k) for p in pred])[:, 1:]
    area = area.double()
    keep = (area > area_thd * area.sum(dim=1, keepdim=True)).to(probs.dtype)
    out = probs.clone()
    out[:, 1:] *= keep[:, :, None, None]
    return out


def threshold_labels(probs: torch.Tensor, prob_thd: float = 0.0) -> torch.Tensor:
    """argmax over classes (B, H, W), 0 (background) where the max probability is below prob_thd."""
    return probs.argmax(dim=1).masked_fill(probs.amax(dim=1) < prob_thd, 0)


def harness_labels(
    name_logits: torch.Tensor,
    owner: torch.Tensor,
    num_classes: int,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities (B, K, H, W) after the area rule, labels (B, H, W)): the whole module doc."""
    probs = class_probabilities(name_logits, owner, num_classes, logit_scale)
    if area_thd is not None:
        probs = area_filter(probs, area_thd)
    return probs, threshold_labels(probs, prob_thd)
