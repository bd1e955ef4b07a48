"""Training-free refinement: images in; label PNGs, overlays, optional probabilities and panels out.

    python scripts/refine.py input=PATH vocab=voc21 model=vit_b16 refine=apro output_dir=out
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from ..config import hydra_app, protocol_name
from ..data.io import atomic_write, load_label, save_label_png, save_overlay
from ..data.palette import voc_palette
from ..evaluation import ConfusionMatrix, format_table
from ..refiners import Chain
from ..segmenter import Segmenter, to_array
from ..visualize import colorize, make_panel, save_rgb
from .common import open_inputs, resolved, stage_summary, write_json


def panel_steps(generator) -> dict[str, list[str]]:
    """Panel columns: the unary, +KS (+PAMR under a harness protocol, which has no key smoothing), +APro."""
    second = ("+PAMR", ["pamr_logits"]) if generator.mode == "harness" else ("+KS", ["ks"])
    return {generator.name: [], second[0]: second[1], "+APro": ["apro"]}


def _save_probs(path: Path, probs) -> None:
    from safetensors.numpy import save

    with atomic_write(path) as f:
        f.write(save({"probs": probs.numpy().astype(np.float16)}))


def run(cfg: DictConfig) -> dict:
    """Refine every input image; returns the summary it also writes to output_dir/summary.json."""
    dataset, class_names = open_inputs(cfg)
    segmenter = Segmenter.from_config(cfg, class_names)
    out = Path(cfg.output_dir)
    palette = voc_palette(256)
    chains = {"main": segmenter.refiner}
    if cfg.panel:
        for title, steps in panel_steps(segmenter.generator).items():
            chains[title] = Chain.from_steps(steps, cfg.refine)
    matrix = ConfusionMatrix(len(class_names), ignore_index=dataset.ignore_index)
    labelled = done = skipped = 0
    times = []
    start = time.perf_counter()
    for i in tqdm(range(len(dataset)), desc="refine", unit="img"):
        sample = dataset[i]
        label_path = out / "labels" / f"{sample.name}.png"
        if label_path.exists() and not cfg.overwrite:
            labels = load_label(label_path)
            skipped += 1
        else:
            image = to_array(sample.image)
            preds = segmenter.predict_many(image, chains, keep_probs=cfg.save_probs)
            labels = preds["main"].labels
            times.append(preds["main"].times)
            save_overlay(out / "overlays" / f"{sample.name}.png", image, labels, palette, alpha=cfg.overlay_alpha)
            if cfg.save_probs:
                _save_probs(out / "probs" / f"{sample.name}.safetensors", preds["main"].probs)
            if cfg.panel:
                columns = [("image", image)] + [(t, colorize(p.labels, palette)) for t, p in preds.items() if t != "main"]
                if sample.label is not None:
                    columns.insert(1, ("ground truth", colorize(sample.label.astype(np.int64), palette)))
                save_rgb(out / "panels" / f"{sample.name}.png", make_panel(columns))
            save_label_png(label_path, labels, palette)
            done += 1
        if sample.label is not None:
            matrix.update(labels, sample.label)
            labelled += 1
    summary = {
        "images": len(dataset),
        "protocol": protocol_name(cfg),
        "refined": done,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - start,
        "seconds_per_image": stage_summary(times),
        "classes": class_names,
        "config": resolved(cfg),
    }
    if labelled:
        summary["metrics"] = matrix.compute()
        print(format_table(summary["metrics"], class_names))
    write_json(out / "summary.json", summary)
    per_stage = ", ".join(f"{k} {v:.3f}s" for k, v in summary["seconds_per_image"].items())
    print(f"{done} refined, {skipped} already done, of {len(dataset)} images -> {out}  ({per_stage or 'nothing ran'})")
    return summary


main = hydra_app("refine", run)

if __name__ == "__main__":
    main()
