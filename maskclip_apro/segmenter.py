"""The predictor: a dense unary (MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP), a refiner chain,
labels at the input size.

    seg = Segmenter.from_pretrained(model="vit_b16", vocab="voc21", refine="apro")
    pred = seg(Image.open("cat.jpg"))
    pred.labels, pred.probs

    seg = Segmenter.from_pretrained(model="vit_b16", vocab="voc21", refine="none",
                                    overrides=["protocol=naclip", "model.dense=naclip"])

Under MaskCLIP's protocols (whole image, slide) the refiners get softmax(s * logits) on the
patch grid and the labels are the argmax of the upsampled result, or of what MaskCLIP's
official head outputs where that differs (the logits when no refiner runs, the cosines with
PD's dropped classes at -100, KS's mixture: Chain.refine), which is resized as mmseg resizes the
head output: to the image the network saw, then to the original size (head_labels). Under the SCLIP-family harness
(generator mode "harness") they get the probabilities of every text query at the image size,
softmax(s * pixel_cos), with guidance.image the resized image the model saw brought back to the
image size (what the harness's PAMR reads) and guidance.grid its patch grid; after them each
class takes the max over its queries and the harness's area_thd and prob_thd give the labels
(postprocess.py). Probabilities a chain returns at another size are resized bilinearly first.
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
NON_FINITE = "the generator produced NaN or inf class scores; check the model weights (model.pretrained)"


@dataclass
class Prediction:
    """labels (H, W) int64 at the input size; probs (K, h, w) refined, at the refiner's resolution
    (under the harness: the class probabilities at the input size, after area_thd).

    times: seconds per stage: "generator", each refiner by name, "postprocess" (probabilities to labels).
    """

    labels: np.ndarray
    probs: torch.Tensor
    class_names: list[str]
    times: dict[str, float] = field(default_factory=dict)


def to_tensor(image: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) to float (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1)[None].float().div_(255.0)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, ...]:
    """Source indices (i0, i1) and weights (w0, w1) of bilinear resampling along one axis, on the CPU.

    The rule of F.interpolate(mode="bilinear", align_corners=False): output pixel j samples the
    input at (j + 0.5) * n_in / n_out - 0.5, clamped to the first and last input pixel.
    """
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w1 = (src - i0).clamp_(0, 1).float()
    return i0, i1, 1 - w1, w1


_TIE_MARGIN = 1e-5  # relative to the cell's largest value; float32 rounding of the interpolation is < 1e-6


def _scores_and_size(probs: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple, tuple[int, int]]:
    """float32 scores (B, K, h, w), their shape and the output size as ints; ValueError unless 4-D."""
    if probs.ndim != 4:
        raise ValueError(f"probabilities must be (B, K, h, w), got shape {tuple(probs.shape)}")
    return probs.float(), tuple(probs.shape), (int(size[0]), int(size[1]))


def labels_at(
    probs: torch.Tensor, size: tuple[int, int], tile_elements: int = 1 << 18, prune: Optional[bool] = None
) -> torch.Tensor:
    """argmax over classes of the bilinearly upsampled scores (B, K, h, w) -> (B, H, W) int64.

    Memory stays O(H*W) beside the input, never O(K*H*W) (a 6000 x 4000 photo with 171 classes
    would need 16 GB of upsampled maps): the output is made tile by tile, `tile_elements`
    pixels at a time, one class at a time with a running maximum. With `prune` (default: on the
    CPU) only the classes that can win somewhere in the tile are interpolated
    (_possible_classes), image by image, and a tile with one possible winner is filled with it;
    without it (default on GPUs, where fewer, larger launches pay) the batch goes through every
    class together. Each value is computed by the same per-pixel arithmetic whatever the tiling
    (the two input rows interpolated along W, then the two results along H), so the labels do
    not depend on the tile size or the pruning; they agree with the argmax of
    F.interpolate(mode="bilinear", align_corners=False) up to float rounding, which can only
    matter at exact ties (ties go to the lowest class index).
    """
    probs, (b, k, h, w), (height, width) = _scores_and_size(probs, size)
    device = probs.device
    y0, y1, wy0, wy1 = _bilinear_taps(h, height)
    x0, x1, wx0, wx1 = _bilinear_taps(w, width)
    y0d, y1d, wy0d, wy1d, x0d, x1d, wx0d, wx1d = (t.to(device) for t in (y0, y1, wy0, wy1, x0, x1, wx0, wx1))
    labels = torch.empty((b, height, width), dtype=torch.int64, device=device)
    tile_w = min(width, 1024)
    prune = device.type == "cpu" if prune is None else prune
    tile_h = max(1, tile_elements // (tile_w * (1 if prune else b)))
    for top in range(0, height, tile_h):
        rows = slice(top, min(height, top + tile_h))
        first, last = int(y0[rows][0]), int(y0[rows][-1])  # the tile lies in cells of input rows first..last + 1
        r0, r1, a0, a1 = y0d[rows] - first, y1d[rows] - first, wy0d[rows, None], wy1d[rows, None]
        for left in range(0, width, tile_w):
            cols = slice(left, min(width, left + tile_w))
            c0, c1, b0, b1 = x0d[cols], x1d[cols], wx0d[cols], wx1d[cols]
            start, stop = int(x0[cols][0]), int(x0[cols][-1])
            if prune:
                groups = [(i, _possible_classes(probs[i, :, first : last + 2, start : stop + 2], last + 1 == h,
                                                stop + 1 == w)) for i in range(b)]
            else:
                groups = [(slice(0, b), list(range(k)))]
            for images, classes in groups:  # one image (2-D tiles) or the batch (3-D)
                out = labels[images, rows, cols]
                if len(classes) == 1:
                    out.fill_(classes[0])
                    continue
                best = None
                for c in classes:
                    band = probs[images, c, first : last + 2]
                    along_w = band.index_select(-1, c0) * b0 + band.index_select(-1, c1) * b1
                    value = along_w.index_select(-2, r0) * a0 + along_w.index_select(-2, r1) * a1
                    best = _keep_best(best, value, out, c)
    return labels


def _keep_best(best: Optional[torch.Tensor], value: torch.Tensor, out: torch.Tensor, c: int) -> torch.Tensor:
    """Running argmax: where class c's `value` beats `best` (strictly: ties keep the lower class),
    write c into `out`; returns the new best values (`value` for the first class)."""
    if best is None:
        out.fill_(c)
        return value
    better = value > best
    out.masked_fill_(better, c)
    return torch.where(better, value, best)


def _composed_taps(n_in: int, n_mid: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear n_in -> n_mid followed by n_mid -> n_out (align_corners=False) along one axis, as
    one operator: source indices (n_out, 3) and weights (n_out, 3). Output pixel j reads two
    middle pixels, which read two neighbouring input pixels each, so its taps lie in three
    consecutive input pixels; weights are products of the two resizes' weights (float64)."""
    a0, a1, aw0, aw1 = _bilinear_taps(n_mid, n_out)
    b0, b1, bw0, bw1 = _bilinear_taps(n_in, n_mid)
    first = b0[a0]
    index = (first[:, None] + torch.arange(3)).clamp_(max=n_in - 1)
    weights = torch.zeros(n_out, 3, dtype=torch.float64)
    for mid, wm in ((a0, aw0.double()), (a1, aw1.double())):
        for src, ws in ((b0[mid], bw0[mid].double()), (b1[mid], bw1[mid].double())):
            weights.scatter_add_(1, (src - first)[:, None], (wm * ws)[:, None])
    return index, weights


def labels_via(probs: torch.Tensor, via: tuple[int, int], size: tuple[int, int], tile: int = 128) -> torch.Tensor:
    """argmax over classes of scores (B, K, h, w) resized bilinearly to `via`, then to `size`.

    mmseg's test path resizes the head output to the network input, then to the original image
    (encode_decode, whole_inference). The two resizes are applied here as one three-tap operator
    per axis (_composed_taps), on tiles of `tile` x `tile` output pixels, image by image and
    class by class, so no K x via
    map is held; the values equal the two-step ones up to float rounding (weights multiplied in
    float64, the sums in float32), which can only matter at near-ties (ties go to the lowest
    class index). Every output value is a convex combination of the input values its tile reads,
    so the winner is at least the largest smallest value of a class there, and at least the
    smallest value of the mean of the two or three classes with the largest values; a class
    whose largest value is below that floor (less a margin far above rounding) cannot win in the
    tile and is skipped, as in labels_at.
    """
    probs, (b, k, h, w), (height, width) = _scores_and_size(probs, size)
    device = probs.device
    yi, yw = (t.to(device) for t in _composed_taps(h, int(via[0]), height))
    xi, xw = (t.to(device) for t in _composed_taps(w, int(via[1]), width))
    yw, xw = yw.float(), xw.float()
    labels = torch.empty((b, height, width), dtype=torch.int64, device=device)
    for top in range(0, height, tile):
        rows = slice(top, min(height, top + tile))
        first, last = int(yi[rows].min()), int(yi[rows].max())
        r, a = yi[rows] - first, yw[rows]
        for left in range(0, width, tile):
            cols = slice(left, min(width, left + tile))
            start, stop = int(xi[cols].min()), int(xi[cols].max())
            c, wc = xi[cols] - start, xw[cols]
            for i in range(b):
                block = probs[i, :, first : last + 1, start : stop + 1]
                low, high = block.amin(dim=(1, 2)), block.amax(dim=(1, 2))
                floor, total = low.max(), torch.zeros_like(block[0])
                for m, leader in enumerate(high.topk(min(3, k)).indices.tolist(), start=1):
                    total += block[leader]  # the winner is at least the mean of the m leaders
                    floor = torch.maximum(floor, total.min() / m)
                margin = _TIE_MARGIN * torch.maximum(high.abs().max(), low.abs().max())
                classes = (high >= floor - margin).nonzero()[:, 0].tolist()
                out = labels[i, rows, cols]
                best = None
                for cls in classes:
                    band = block[cls]
                    along_w = sum(band.index_select(-1, c[:, t]) * wc[:, t] for t in range(3))
                    value = sum(along_w.index_select(-2, r[:, t]) * a[:, t, None] for t in range(3))
                    best = _keep_best(best, value, out, cls)
    return labels


def _possible_classes(block: torch.Tensor, last_row: bool, last_col: bool) -> list[int]:
    """The classes (ascending ids) that can win somewhere in the cells of `block` (K, rows, cols).

    A cell is two by two neighbouring input pixels (the input's last row and column, flagged
    by last_row / last_col, are repeated to close the final cells); every output pixel's four
    taps are one cell's corners and its value for a class is a convex combination of the
    class's corner values. Anywhere in the cell the winner's value is at least `floor`: the
    best smallest corner of one class, or of the mean of the two or three classes with the
    largest corners (the winner is at least their mean), which keeps region boundaries cheap.
    A class whose largest corner is below floor, less a margin far above float rounding,
    cannot win in the cell.
    """
    if last_row or last_col:
        block = F.pad(block[None], (0, int(last_col), 0, int(last_row)), mode="replicate")[0]
    k = block.shape[0]
    corners = (block[:, :-1, :-1], block[:, :-1, 1:], block[:, 1:, :-1], block[:, 1:, 1:])
    low = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
    high = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
    floor = low.amax(dim=0)
    margin = _TIE_MARGIN * torch.maximum(high.amax(dim=0), -low.amin(dim=0))
    leaders = high.topk(min(3, k), dim=0).indices
    sums = [torch.zeros_like(floor) for _ in corners]
    for m in range(leaders.shape[0]):
        for total, corner in zip(sums, corners):
            total += corner.gather(0, leaders[m : m + 1])[0]
        worst = torch.minimum(torch.minimum(sums[0], sums[1]), torch.minimum(sums[2], sums[3]))
        floor = torch.maximum(floor, worst / (m + 1))
    possible = (high >= floor - margin).flatten(1).any(dim=1)
    return possible.nonzero()[:, 0].tolist()


class Segmenter:
    """Generator followed by a refiner chain (module doc)."""

    def __init__(self, generator: Any, refiner: Optional[Chain] = None) -> None:
        self.generator = generator
        self.refiner = refiner or Chain([])

    @property
    def class_names(self) -> list[str]:
        return list(self.generator.class_names)

    @classmethod
    def from_config(cls, cfg: Any, class_names: Sequence[str]) -> "Segmenter":
        """Build from a composed run config (conf/refine.yaml layout) and a vocabulary."""
        from .config import build_generator_from_config, refine_params, refine_steps

        generator = build_generator_from_config(cfg, class_names)
        return cls(generator, Chain.from_steps(refine_steps(cfg), refine_params(cfg)))

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
    def generate(self, images: torch.Tensor):
        """The generator's whole dense output (generator.GeneratorOutput) for a (B, 3, H, W) batch in [0, 1].

        .logits (B, K, h, w) the unary class scores, .keys (B, C, h, w), .features (B, D, h, w)
        the dense projected features before normalisation, .image the resized input the model
        saw; under the harness also .pixel_cos (B, M, H, W).
        """
        return self.generator(images)

    unary = generate  # the earlier name, kept so that code written against it keeps working

    @staticmethod
    def probabilities(out: Any, image: torch.Tensor) -> tuple[torch.Tensor, Guidance]:
        """Softmax of the generator's logits, and the guidance the refiners read.

        `image` becomes guidance.image: the input at its own resolution (not the generator's
        resized copy), from which refiners that work in image space choose their resolution.
        """
        logits = out.logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(NON_FINITE)
        probs = torch.softmax(logits, dim=1)
        return probs, Guidance(image=image, keys=out.keys, features=out.features)

    def predict_many(
        self, image: ImageLike, chains: Mapping[str, Chain], keep_probs: bool = True
    ) -> dict[str, Prediction]:
        """Run the generator once and every chain on the same unary (the compare table's protocol).

        Labels as the module doc says: the argmax of bilinearly upsampled scores (the refined
        probabilities, or the generator's logits for a chain without refiners), or the
        harness's postprocess.
        """
        return self.predict_batch([image], chains, keep_probs)[0]

    @torch.no_grad()
    def predict_batch(
        self, images: Sequence[ImageLike], chains: Mapping[str, Chain], keep_probs: bool = True
    ) -> list[dict[str, Prediction]]:
        """predict_many for images of one size, as one batch through the generator and each chain.

        Images are neither padded nor resized to share the batch (a different size is a
        ValueError), so each goes through the geometry it would have alone: the same resize,
        windows and patch grid. The numbers agree with one image at a time up to the float
        rounding of batched matrix products (1e-6 relative on the logits); labels differ only
        where two classes tie to that precision. times are the batch's seconds per stage divided
        by the batch size.
        """
        arrays = [load_image(image) for image in images]
        if not arrays:
            raise ValueError("predict_batch needs at least one image")
        size = arrays[0].shape[:2]
        if any(a.shape[:2] != size for a in arrays):
            sizes = sorted({a.shape[:2] for a in arrays})
            raise ValueError(f"a batch holds images of one size; got sizes {sizes}: group the images by size")
        n = len(arrays)
        device = getattr(self.generator, "device", "cpu")
        batch = torch.cat([to_tensor(a, device) for a in arrays])
        start = time.perf_counter()
        out = self.generate(batch)
        generator_time = (time.perf_counter() - start) / n
        harness = getattr(out, "pixel_cos", None) is not None
        if harness:
            probs0, guidance = self.harness_probabilities(out, chains)
        else:
            probs0, guidance = self.probabilities(out, batch)
        predictions: list[dict[str, Prediction]] = [{} for _ in arrays]
        for name, chain in chains.items():
            probs, scores = chain.refine(probs0, guidance, None if harness else out.logits.float())
            start = time.perf_counter()
            if harness:
                probs, labels = self.harness_labels(probs, size)
            elif scores is None:
                labels = labels_at(probs, size)
            else:
                labels = self.head_labels(scores, tuple(out.image.shape[-2:]), size)
            labels = labels.cpu().numpy().astype(np.int64, copy=False)
            probs = probs.cpu() if keep_probs else None
            times = {"generator": generator_time, **{k: v / n for k, v in chain.last_times.items()},
                     "postprocess": (time.perf_counter() - start) / n}
            for i, prediction in enumerate(predictions):
                prediction[name] = Prediction(
                    labels=labels[i],
                    probs=probs[i] if keep_probs else torch.empty(0),
                    class_names=self.class_names,
                    times=dict(times),
                )
        return predictions

    @staticmethod
    def head_labels(scores: torch.Tensor, seen: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Labels from the head's output on the patch grid (MaskCLIP's logits, or the official KS /
        PD output: Chain.refine) as mmseg makes them: resized bilinearly to the image the network
        saw (`seen`), then to the original `size`, then the argmax (encode_decode,
        whole_inference, simple_test); one resize when the network saw the image at its size."""
        if tuple(seen) == tuple(size):
            return labels_at(scores, size)
        return labels_via(scores, seen, size)

    def harness_probabilities(self, out: Any, chains: Mapping[str, Chain]) -> tuple[torch.Tensor, Guidance]:
        """The harness's query probabilities softmax(s * pixel_cos) at the image size, and the guidance."""
        from .refiners.ks import KeySmoothing

        for name, chain in chains.items():
            if any(isinstance(r, KeySmoothing) for r in chain.refiners):
                raise ValueError(
                    f"{name!r} runs key smoothing, which needs probabilities on the keys' patch grid; the "
                    f"{self.generator.name} harness hands the refiners probabilities at the image size: drop 'ks' "
                    "(methods=harness lists the harness's rows)"
                )
        cos = out.pixel_cos.float()
        if not bool(torch.isfinite(cos).all()):
            raise ValueError(NON_FINITE)
        probs = torch.softmax(self.generator.logit_scale * cos, dim=1)
        seen = F.interpolate(out.image, size=cos.shape[-2:], mode="bilinear", align_corners=False)
        grid = tuple(out.logits.shape[-2:])
        windows = None
        if getattr(out, "windows", None) is not None:
            from .refiners.lposs import WindowScores

            windows = WindowScores(image=out.image, logit_scale=self.generator.logit_scale, **out.windows)
        return probs, Guidance(image=seen, keys=out.keys, features=out.features, grid=grid, windows=windows)

    def harness_labels(self, probs: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Query probabilities (B, M, h, w) -> class probabilities (B, K, H, W) after area_thd, and labels (B, H, W)."""
        from .postprocess import area_filter, class_max, threshold_labels

        gen = self.generator
        if tuple(probs.shape[-2:]) != tuple(size):
            probs = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
        probs = class_max(probs, gen.owner, gen.num_classes)
        if gen.area_thd is not None:
            probs = area_filter(probs, gen.area_thd)
        return probs, threshold_labels(probs, gen.prob_thd)

    def __call__(self, image: ImageLike) -> Prediction:
        """Labels and refined probabilities for one image (path, PIL image or uint8 array)."""
        return self.predict_many(image, {"main": self.refiner})["main"]

    predict = __call__
