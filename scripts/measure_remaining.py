"""The known remaining differences from the official test paths, measured (docs/protocols.md).

    python scripts/measure_remaining.py [--models tiny_vit tiny_resnet] [--classes 20]

Four photos of skimage.data (astronaut, coffee, chelsea, rocket), the tiny random-weight towers
with random offsets on every weight (so that their classes vary over a photo), `protocol=maskclip`
(keep-ratio resize to short side 512, whole image), `--classes` class names of voc20; per model:

- 8-bit resize: the photo resized in floating point (ours) against an emulation of OpenCV's
  INTER_LINEAR on uint8 (11-bit fixed-point weights, result rounded to 8 bits; the arithmetic
  OpenCV's C path uses, not checked bit for bit against cv2, which is not installed here). Largest
  difference in grey levels, and % of pixel labels that differ.
- half precision: (a) the text embeddings rounded to float16 (MaskCLIP computed them in half on
  a GPU), (b) the image tower under float16 autocast (what a CUDA run in half does). % of pixel
  labels that differ.

Random towers measure the arithmetic, not real CLIP's margins between classes: with real weights
the label changes can be larger or smaller. Nothing is downloaded.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS


def opencv_like_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3): bilinear with half-pixel centres, weights rounded to
    multiples of 2^-11, rows then columns in integers, the sum rounded off 22 bits."""
    from maskclip_apro.segmenter import _bilinear_taps

    scale = 1 << COEF_BITS
    out = image.astype(np.int64)
    for axis, n_out in ((1, size[1]), (0, size[0])):
        i0, i1, w0, w1 = (t.numpy() for t in _bilinear_taps(out.shape[axis], n_out))
        c0, c1 = np.round(w0.astype(np.float64) * scale).astype(np.int64), np.round(w1.astype(np.float64) * scale).astype(np.int64)
        shape = [1, 1, 1]
        shape[axis] = -1
        out = np.take(out, i0, axis=axis) * c0.reshape(shape) + np.take(out, i1, axis=axis) * c1.reshape(shape)
    return np.clip((out + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS), 0, 255).astype(np.uint8)


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * float((a != b).double().mean())


def measure(model: str, classes: int) -> dict[str, float]:
    import skimage.data

    from maskclip_apro.data import load_vocab
    from maskclip_apro.segmenter import Segmenter, to_tensor

    seg = Segmenter.from_pretrained(model=model, vocab=load_vocab("voc20")[:classes], refine="none",
                                    overrides=["protocol=maskclip", "model.short_side=null",
                                               "generator.templates=['a photo of a {}.']"])
    gen = seg.generator
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.backbone.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    rows = {"8-bit resize (max grey levels)": [], "8-bit resize (% labels)": [],
            "float16 text embeddings (% labels)": [], "float16 image tower (% labels)": []}
    text = gen.classifier.embeddings.clone()
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        size = photo.shape[:2]
        x = to_tensor(photo)
        out = gen(x)
        resized = tuple(out.image.shape[-2:])

        def labels(logits: torch.Tensor) -> torch.Tensor:
            return Segmenter.head_labels(logits, resized, size)

        ours = labels(out.logits)

        small = opencv_like_resize(photo, resized)
        rows["8-bit resize (max grey levels)"].append(float((out.image[0].permute(1, 2, 0) * 255
                                                              - torch.from_numpy(small).float()).abs().max()))
        rows["8-bit resize (% labels)"].append(differ(ours, labels(gen(to_tensor(small)).logits)))

        gen.classifier.embeddings.copy_(F.normalize(text.half().float(), dim=1))
        rows["float16 text embeddings (% labels)"].append(differ(ours, labels(gen(x).logits)))
        gen.classifier.embeddings.copy_(text)
        with torch.autocast("cpu", dtype=torch.float16):
            half = gen(x).logits.float()
        rows["float16 image tower (% labels)"].append(differ(ours, labels(half)))
    return {k: max(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny_vit", "tiny_resnet"])
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    results = {m: measure(m, args.classes) for m in args.models}
    keys = list(next(iter(results.values())))
    print(f"largest over the photos {', '.join(PHOTOS)}; {args.classes} classes; torch {torch.__version__}\n")
    print("| difference | " + " | ".join(args.models) + " |")
    print("|---|" + "---:|" * len(args.models))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{results[m][k]:.3f}" for m in args.models) + " |")


if __name__ == "__main__":
    main()
