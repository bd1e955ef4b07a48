"""The predictor: a dense unary (MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP), a refiner chain,
labels at the input size.

    seg = Segmenter.from_pretrained(model="vit_b16", vocab="voc21", refine="apro")
    pred = seg(Image.open("cat.jpg"))
    pred.labels, pred.probs

    seg = Segmenter.from_pretrained(model="vit_b16", vocab="voc21", refine="none",
                                    overrides=["protocol=naclip", "model.dense=naclip"])

Under MaskCLIP's protocols (whole image, slide) the refiners get softmax(s * logits) on the
patch grid and the labels are the argmax of the upsampled result (of the logits when no refiner
runs, as mmseg upsamples MaskCLIP's head output). Under the SCLIP-family harness
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


def to_array(image: ImageLike) -> np.ndarray:
    """Any accepted image to uint8 (H, W, 3) RGB, with the loader's conversions and errors."""
    from .data.io import load_image

    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGBA").convert("RGB") if "A" in image.mode else image.convert("RGB")
        return np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return image[..., :3]
    raise ValueError(f"image must be a path, PIL image or uint8 array, got {type(image).__name__}")


def to_tensor(image: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) to float (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1)[None].float().div_(255.0)


def labels_at(probs: torch.Tensor, size: tuple[int, int], chunk: int = 32) -> torch.Tensor:
    """argmax over classes of the bilinearly upsampled probabilities (B, K, h, w) -> (B, H, W).

    Classes are upsampled `chunk` at a time so that K = 171 at full resolution stays small.
    """
    best_val = best_idx = None
    for start in range(0, probs.shape[1], chunk):
        part = F.interpolate(probs[:, start : start + chunk].float(), size=size, mode="bilinear", align_corners=False)
        val, idx = part.max(dim=1)
        idx += start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


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
        """Generator output (generator.GeneratorOutput) for a (B, 3, H, W) batch in [0, 1].

        .logits (B, K, h, w), .keys (B, C, h, w), .features (B, D, h, w) the dense projected
        features before normalisation, .image the resized input; under the harness also
        .pixel_cos (B, M, H, W).
        """
        return self.generator(image)

    @staticmethod
    def probabilities(out: Any, image: torch.Tensor) -> tuple[torch.Tensor, Guidance]:
        """Softmax of the unary logits, and the guidance the refiners read.

        The guidance image is the input at its own resolution (not the generator's resized
        copy): refiners that work in image space choose their resolution from it.
        """
        logits = out.logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(NON_FINITE)
        probs = torch.softmax(logits, dim=1)
        return probs, Guidance(image=image, keys=out.keys, features=out.features)

    @torch.no_grad()
    def predict_many(
        self, image: ImageLike, chains: Mapping[str, Chain], keep_probs: bool = True
    ) -> dict[str, Prediction]:
        """Run the generator once and every chain on the same unary (the compare table's protocol).

        Labels as the module doc says: the argmax of bilinearly upsampled scores (the refined
        probabilities, or the generator's logits for a chain without refiners), or the
        harness's postprocess.
        """
        array = to_array(image)
        device = getattr(self.generator, "device", "cpu")
        image_tensor = to_tensor(array, device)
        start = time.perf_counter()
        out = self.unary(image_tensor)
        generator_time = time.perf_counter() - start
        harness = getattr(out, "pixel_cos", None) is not None
        if harness:
            probs0, guidance = self.harness_probabilities(out, chains)
        else:
            probs0, guidance = self.probabilities(out, image_tensor)
        predictions = {}
        for name, chain in chains.items():
            probs = chain(probs0, guidance)
            start = time.perf_counter()
            if harness:
                probs, labels = self.harness_labels(probs, array.shape[:2])
            else:
                # mmseg upsamples the head's output before the argmax: MaskCLIP's logits when no refiner runs
                labels = labels_at(probs if chain.refiners else out.logits.float(), array.shape[:2])
            labels = labels[0].cpu().numpy().astype(np.int64)
            predictions[name] = Prediction(
                labels=labels,
                probs=probs[0].cpu() if keep_probs else torch.empty(0),
                class_names=self.class_names,
                times={"generator": generator_time, **chain.last_times, "postprocess": time.perf_counter() - start},
            )
        return predictions

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
        return probs, Guidance(image=seen, keys=out.keys, features=out.features, grid=grid)

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
