"""Run several refiner chains on one generator pass per image and score them (evaluate, compare).

Per-image confusion matrices and times go to output_dir/per_image/<name>.npz as each image
finishes (atomically), tagged with a fingerprint of the config; a rerun reuses the files whose
fingerprint matches and computes the rest, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..config import protocol_name
from ..data.io import atomic_write
from ..data.palette import voc_palette
from ..evaluation import ConfusionMatrix
from ..refiners import Chain
from ..segmenter import Segmenter
from ..visualize import colorize, make_panel, save_rgb
from .common import open_inputs

FINGERPRINT_KEYS = ("model", "generator", "background", "refine", "dataset", "input", "vocab")


def fingerprint(cfg: DictConfig, methods: Mapping[str, Sequence[str]]) -> str:
    """Hash of everything that changes the per-image results."""
    payload = {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in FINGERPRINT_KEYS}
    payload["methods"] = {k: list(v) for k, v in methods.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load(path: Path, tag: str, names: list[str]):
    """The saved record of one image, or None when absent or made by another config."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        if str(data["fingerprint"]) != tag or list(data["methods"]) != names:
            return None
        return {k: data[k] for k in data.files}


def _save(path: Path, record: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **record)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def run_methods(cfg: DictConfig, methods: Mapping[str, Sequence[str]], out: Path, panels: int = 0) -> dict:
    """mIoU and seconds per image of every method over the dataset; resumable (module doc)."""
    dataset, class_names = open_inputs(cfg)
    segmenter = Segmenter.from_config(cfg, class_names)
    names = list(methods)
    tag = fingerprint(cfg, methods)
    chains = {m: Chain.from_steps(steps, cfg.refine) for m, steps in methods.items()}
    palette = voc_palette(256)
    k = len(class_names)
    totals = [ConfusionMatrix(k, ignore_index=dataset.ignore_index) for _ in names]
    seconds = np.zeros(len(names))
    post_seconds = np.zeros(len(names))
    generator_seconds = 0.0
    reused = 0
    warmed = False
    for i in tqdm(range(len(dataset)), desc="evaluate", unit="img"):
        sample = dataset[i]
        if sample.label is None:
            raise ValueError(f"image {sample.name!r} has no ground-truth label; evaluation needs a labelled dataset")
        path = out / "per_image" / f"{sample.name}.npz"
        record = _load(path, tag, names)
        if record is None:
            if not warmed:  # the first call compiles kernels: keep it out of the timings
                segmenter.predict_many(sample.image, chains, keep_probs=False)
                warmed = True
            preds = segmenter.predict_many(sample.image, chains, keep_probs=False)
            record = {"fingerprint": np.array(tag), "methods": np.array(names)}
            record["seconds"] = np.array(
                [sum(v for s, v in preds[m].times.items() if s not in ("generator", "postprocess")) for m in names])
            record["postprocess_seconds"] = np.array([preds[m].times["postprocess"] for m in names])
            record["generator_seconds"] = np.array(preds[names[0]].times["generator"])
            for j, m in enumerate(names):
                record[f"cm{j}"] = ConfusionMatrix(k, ignore_index=dataset.ignore_index).update(
                    preds[m].labels, sample.label).matrix
            if i < panels:
                columns = [("image", sample.image), ("ground truth", colorize(sample.label.astype(np.int64), palette))]
                columns += [(m, colorize(p.labels, palette)) for m, p in preds.items()]
                save_rgb(out / "panels" / f"{sample.name}.png", make_panel(columns))
            _save(path, record)
        else:
            reused += 1
        for j in range(len(names)):
            totals[j].matrix += record[f"cm{j}"]
        seconds += record["seconds"]
        post_seconds += record["postprocess_seconds"]
        generator_seconds += float(record["generator_seconds"])
    n = max(len(dataset), 1)
    return {
        "images": len(dataset),
        "reused": reused,
        "protocol": protocol_name(cfg),
        "generator": segmenter.generator.name,
        "classes": class_names,
        "generator_seconds_per_image": generator_seconds / n,
        "methods": {
            m: {"steps": list(methods[m]), "seconds_per_image": seconds[j] / n,
                "postprocess_seconds_per_image": post_seconds[j] / n, **totals[j].compute()}
            for j, m in enumerate(names)
        },
    }


def methods_table(results: dict) -> str:
    """Markdown: method, mIoU, refiner and postprocess seconds per image."""
    lines = [
        f"{results.get('generator', 'MaskCLIP')} generator, protocol {results['protocol']}: "
        f"{results['generator_seconds_per_image']:.3f} s/img over {results['images']} images",
        "",
        "| Method | mIoU (%) | pixel acc (%) | refiner s/img | postprocess s/img |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {100 * r['mIoU']:.2f} | {100 * r['aAcc']:.2f} | {r['seconds_per_image']:.3f} "
                     f"| {r.get('postprocess_seconds_per_image', 0.0):.3f} |")
    return "\n".join(lines)
