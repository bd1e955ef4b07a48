"""The predictor: MaskCLIP unary, a refiner chain, labels at the input size.

    seg = Segmenter.from_pretrained(model="vit_b16", vocab="voc21", refine="apro")
    pred = seg(Image.open("cat.jpg"))
    pred.labels, pred.probs
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.io import load_image
from .refiners import Chain, Guidance

ImageLike = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class Prediction:
    """labels (H, W) int64 at the input size; probs (K, h, w) refined, at the refiner's resolution."""

    labels: np.ndarray
    probs: torch.Tensor
    class_names: list[str]
    times: dict[str, float] = field(default_factory=dict)


def to_tensor(image: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) to float (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1)[None].float().div_(255.0)


def _bilinear_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Source indices (i0, i1) and weights (w0, w1) of bilinear resampling along one axis.

    The rule of F.interpolate(mode="bilinear", align_corners=False): output pixel j samples the
    input at (j + 0.5) * n_in / n_out - 0.5, clamped to the first and last input pixel.
    """
    src = ((torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w1 = (src - i0).clamp_(0, 1).float()
    return i0, i1, 1 - w1, w1


_TIE_MARGIN = 1e-5  # relative to the cell's largest value; float32 rounding of the interpolation is < 1e-6


def labels_at(probs: torch.Tensor, size: tuple[int, int], tile_elements: int = 1 << 20) -> torch.Tensor:
    """argmax over classes of the bilinearly upsampled probabilities (B, K, h, w) -> (B, H, W) int64.

    Memory stays O(K*h*w + H*W), never O(K*H*W) (a 6000 x 4000 photo with 171 classes would
    need 16 GB of upsampled maps). Each output pixel lies in a cell of four neighbouring input
    pixels and its value for a class is a convex combination of the class's four corner values,
    so classes that cannot win anywhere in a cell are known from the corners (_cell_candidates).
    A cell with one possible winner gives its label directly; in the other cells only the
    possible winners are interpolated, in chunks of about `tile_elements` values. Each value is
    computed by the same per-pixel arithmetic however the work is split, so the labels do not
    depend on the chunking; they agree with the argmax of F.interpolate(mode="bilinear",
    align_corners=False) up to float rounding, which can only matter at exact ties (ties go to
    the lowest class index).
    """
    if probs.ndim != 4:
        raise ValueError(f"probabilities must be (B, K, h, w), got shape {tuple(probs.shape)}")
    b, k, h, w = probs.shape
    height, width = int(size[0]), int(size[1])
    probs = probs.float()
    device = probs.device
    y0, y1, wy0, wy1 = _bilinear_taps(h, height, device)
    x0, x1, wx0, wx1 = _bilinear_taps(w, width, device)
    labels = torch.empty((b, height, width), dtype=torch.int64, device=device)
    band = max(1, tile_elements // max(1, width))
    for i in range(b):
        winner, row, table, count = _cell_candidates(probs[i])
        values = probs[i].permute(1, 2, 0).reshape(-1)  # class c of input pixel p at p * K + c
        for top in range(0, height, band):
            gy = torch.arange(top, min(height, top + band), device=device)
            cells = y0[gy, None] * w + x0[None, :]  # (band, W): the cell of every output pixel
            band_labels = winner[cells]
            rows = row[cells]
            ys, xs = (rows >= 0).nonzero(as_tuple=True)
            rows = rows[ys, xs]
            order = count[rows].argsort()  # fewest candidates first: chunks of similar width
            ys, xs, rows = ys[order], xs[order], rows[order]
            widths = count[rows]
            start = 0
            while start < rows.numel():
                end = min(rows.numel(), start + max(1, tile_elements // int(widths[start])))
                end = min(end, start + max(1, tile_elements // int(widths[end - 1])))
                yy, xx, rr = ys[start:end], xs[start:end], rows[start:end]
                ids = table[rr, : int(widths[end - 1])]  # (n, C): the possible winners, ascending
                start = end
                ry = gy[yy]
                r0, r1, c0, c1 = y0[ry, None] * w, y1[ry, None] * w, x0[xx, None], x1[xx, None]
                a, b_ = wx0[xx, None], wx1[xx, None]
                upper = values[(r0 + c0) * k + ids] * a + values[(r0 + c1) * k + ids] * b_
                lower = values[(r1 + c0) * k + ids] * a + values[(r1 + c1) * k + ids] * b_
                interpolated = upper * wy0[ry, None] + lower * wy1[ry, None]
                best = interpolated.amax(dim=1, keepdim=True)
                band_labels[yy, xx] = torch.where(interpolated == best, ids, k).amin(dim=1)
            labels[i, top : top + len(gy)] = band_labels
    return labels


def _cell_candidates(probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Which classes can win inside each cell of input pixels (rows i, i+1; columns j, j+1; the
    last row and column repeated), for probs (K, h, w).

    Anywhere in a cell the winner's value is at least `floor`: the best smallest corner of one
    class, or of the mean of the two or three classes with the largest corners (the winner
    beats their mean), which is what makes a boundary between two regions cheap. A class whose
    largest corner is below floor (less a rounding margin) cannot win there. Returns, per cell
    (flattened i * w + j): the first possible winner (h*w,), the row of the cell in `table`
    (-1 for cells with a single possible winner), and for the other cells the possible winners
    (m, C) in ascending order (padded with the first) and their number (m,).
    """
    k, h, w = probs.shape
    padded = F.pad(probs[None], (0, 1, 0, 1), mode="replicate")[0]
    corners = (padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:])
    low = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
    high = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
    floor = low.amax(dim=0)
    margin = _TIE_MARGIN * torch.maximum(low.abs(), high.abs()).amax(dim=0)
    del low
    leaders = high.topk(min(3, k), dim=0).indices
    sums = [torch.zeros((h, w), device=probs.device) for _ in corners]
    for m in range(leaders.shape[0]):
        for s, corner in zip(sums, corners):
            s += corner.gather(0, leaders[m : m + 1])[0]
        floor = torch.maximum(floor, torch.minimum(torch.minimum(sums[0], sums[1]), torch.minimum(sums[2], sums[3])) / (m + 1))
    possible = (high >= floor - margin).reshape(k, h * w)
    del high, padded, corners, sums
    winner = possible.to(torch.uint8).argmax(dim=0)
    count = possible.sum(dim=0)
    contested = (count > 1).nonzero()[:, 0]
    row = torch.full((h * w,), -1, dtype=torch.int64, device=probs.device)
    row[contested] = torch.arange(contested.numel(), device=probs.device)
    width = int(count[contested].max()) if contested.numel() else 1
    ids = torch.arange(k, device=probs.device)[:, None]
    table = torch.where(possible[:, contested], ids, k).sort(dim=0).values[:width].t()
    table = torch.where(table == k, table[:, :1], table).contiguous()
    return winner, row, table, count[contested]


class Segmenter:
    """Generator (MaskCLIP) followed by a refiner chain."""

    def __init__(self, generator: Any, refiner: Optional[Chain] = None) -> None:
        self.generator = generator
        self.refiner = refiner or Chain([])

    @property
    def class_names(self) -> list[str]:
        return list(self.generator.class_names)

    @classmethod
    def from_config(cls, cfg: Any, class_names: Sequence[str]) -> "Segmenter":
        """Build from a composed run config (conf/refine.yaml layout) and a vocabulary."""
        from .config import build_generator_from_config, refine_steps

        generator = build_generator_from_config(cfg, class_names)
        return cls(generator, Chain.from_steps(refine_steps(cfg), cfg.refine))

    @classmethod
    def from_pretrained(
        cls, model: str = "vit_b16", vocab: Union[str, Sequence[str]] = "voc21", refine: str = "apro",
        overrides: Sequence[str] = (),
    ) -> "Segmenter":
        """Compose conf/refine.yaml with a model and refine preset; `vocab` is a name, file or list."""
        from .config import compose
        from .data import load_vocab

        cfg = compose("refine", [f"model={model}", f"refine={refine}", *overrides])
        return cls.from_config(cfg, load_vocab(vocab))

    @torch.no_grad()
    def unary(self, image: torch.Tensor):
        """Generator output for a (B, 3, H, W) batch in [0, 1]."""
        return self.generator(image)

    @staticmethod
    def probabilities(out: Any, image: torch.Tensor) -> tuple[torch.Tensor, Guidance]:
        """Softmax of the unary logits, and the guidance the refiners read.

        The guidance image is the input at its own resolution (not the generator's resized
        copy): refiners that work in image space choose their resolution from it.
        """
        logits = out.logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("the generator produced NaN or inf class scores; check the model weights (model.pretrained)")
        probs = torch.softmax(logits, dim=1)
        return probs, Guidance(image=image, keys=out.keys, features=out.features)

    @torch.no_grad()
    def predict_many(
        self, image: ImageLike, chains: Mapping[str, Chain], keep_probs: bool = True
    ) -> dict[str, Prediction]:
        """Run the generator once and every chain on the same unary (the compare table's protocol)."""
        array = load_image(image)
        device = getattr(self.generator, "device", "cpu")
        image_tensor = to_tensor(array, device)
        start = time.perf_counter()
        out = self.unary(image_tensor)
        generator_time = time.perf_counter() - start
        probs0, guidance = self.probabilities(out, image_tensor)
        predictions = {}
        for name, chain in chains.items():
            probs = chain(probs0, guidance)
            labels = labels_at(probs, array.shape[:2])[0].cpu().numpy().astype(np.int64)
            predictions[name] = Prediction(
                labels=labels,
                probs=probs[0].cpu() if keep_probs else torch.empty(0),
                class_names=self.class_names,
                times={"generator": generator_time, **chain.last_times},
            )
        return predictions

    def __call__(self, image: ImageLike) -> Prediction:
        """Labels and refined probabilities for one image (path, PIL image or uint8 array)."""
        return self.predict_many(image, {"main": self.refiner})["main"]

    predict = __call__
