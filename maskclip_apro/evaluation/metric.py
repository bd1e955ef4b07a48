"""Confusion-matrix segmentation metrics: mIoU, per-class IoU, pixel and class accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..constants import IGNORE_INDEX


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Accept numpy arrays and torch tensors (on any device) without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {x.dtype}")
    return x


class ConfusionMatrix:
    """Accumulated (K, K) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth is ignore_index are skipped. Any other ground-truth or
    predicted value outside [0, K) is an error, not silently dropped.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> ConfusionMatrix:
        """Add one image (H, W) or a batch (B, H, W) of predicted and true labels."""
        pred = _to_numpy(pred, "pred")
        gt = _to_numpy(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} does not match gt shape {gt.shape}")
        if pred.ndim not in (2, 3):
            raise ValueError(f"pred and gt must be (H, W) or (B, H, W), got shape {pred.shape}")
        k = self.num_classes
        valid = gt != self.ignore_index
        p = pred[valid].astype(np.int64)
        g = gt[valid].astype(np.int64)
        if p.size:
            if p.min() < 0 or p.max() >= k:
                raise ValueError(f"pred values must be in [0, {k}), got [{p.min()}, {p.max()}] on labelled pixels")
            if g.min() < 0 or g.max() >= k:
                raise ValueError(
                    f"gt values must be in [0, {k}) or ignore_index {self.ignore_index}, got [{g.min()}, {g.max()}]"
                )
        self.matrix += np.bincount(g * k + p, minlength=k * k).reshape(k, k)
        return self

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a matrix of {other.num_classes} classes (ignore {other.ignore_index}) into one of "
                f"{self.num_classes} classes (ignore {self.ignore_index})"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add other's counts into this matrix (in place) and return self."""
        self._check_compatible(other)
        self.matrix += other.matrix
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.matrix = self.matrix + other.matrix
        return out

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self) -> dict[str, Any]:
        """Metrics as fractions in [0, 1].

        IoU_c = TP / (TP + FP + FN), nan when class c is in neither gt nor pred; mIoU is
        the mean over the others (nan if none). Acc_c = TP / (gt pixels of c), nan when c
        is absent from gt; mAcc its mean. aAcc = correct / labelled pixels.
        """
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt_count = m.sum(axis=1)
        union = gt_count + m.sum(axis=0) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        total = m.sum()
        return {
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
            "num_pixels": int(total),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ConfusionMatrix:
        try:
            cm = cls(int(state["num_classes"]), int(state.get("ignore_index", IGNORE_INDEX)))
            matrix = np.asarray(state["matrix"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a ConfusionMatrix state: {e}") from None
        if matrix.shape != cm.matrix.shape or (matrix < 0).any():
            raise ValueError(f"confusion matrix must be non-negative {cm.matrix.shape}, got shape {matrix.shape}")
        cm.matrix = matrix
        return cm


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
