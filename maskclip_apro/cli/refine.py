"""Training-free refinement: images in; label PNGs, overlays, optional probabilities and panels out.

    python scripts/refine.py input=PATH vocab=voc21 model=vit_b16 refine=apro output_dir=out

Each finished image gets output_dir/records/<name>.json: the key its outputs were made under
(cli.reuse) and the size and time of each output file. A rerun skips an image only when its
record matches the current run and its outputs are as recorded; otherwise it is recomputed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ..config import hydra_app, protocol_name
from ..data.base import file_fingerprint
from ..data.io import load_label
from ..evaluation import ConfusionMatrix, format_table
from ..palette import voc_palette
from ..refiners import Chain
from ..segmenter import Segmenter
from ..visualize import make_panel, save_overlay
from ..writing import output_path, save_label_png, save_rgb, save_safetensors, write_json
from .common import Failures, open_inputs, prepare, resolved, stage_summary
from .reuse import ResultKey, ReuseLog, stale_reason


def panel_steps(generator) -> dict[str, list[str]]:
    """Panel columns: the unary, +KS (+PAMR under a harness protocol, which has no key smoothing), +APro."""
    second = ("+PAMR", ["pamr_logits"]) if generator.mode == "harness" else ("+KS", ["ks"])
    return {generator.name: [], second[0]: second[1], "+APro": ["apro"]}


def _save_probs(path: Path, probs) -> None:
    save_safetensors(path, {"probs": probs.to(torch.float16)})


def _outputs(out: Path, name: str, cfg: DictConfig) -> dict[str, Path]:
    """The files one image produces, by kind."""
    paths = {"label": output_path(out, "labels", f"{name}.png"), "overlay": output_path(out, "overlays", f"{name}.png")}
    if cfg.save_probs:
        paths["probs"] = output_path(out, "probs", f"{name}.safetensors")
    if cfg.panel:
        paths["panel"] = output_path(out, "panels", f"{name}.png")
    return paths


def _reuse_reason(record: Path, key: dict, outputs: dict[str, Path]) -> str | None:
    """None when the image's record matches `key` and its outputs are as recorded, else why not."""
    if not record.is_file():
        return "new"
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        saved_key, files = saved["key"], saved["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable record"
    if not isinstance(saved_key, dict) or not isinstance(files, dict):
        return "unreadable record"
    reason = stale_reason(saved_key, key)
    if reason is not None:
        return reason
    for kind, path in outputs.items():
        if not path.is_file() or files.get(kind) != file_fingerprint(path):
            return "outputs changed"
    return None


def run(cfg: DictConfig) -> dict:
    """Refine every input image; returns the summary it also writes to output_dir/summary.json.

    An image that cannot be read or segmented (missing, corrupt, too large or too small, bad
    label values) is skipped and listed under "failed" (on_error=skip, the default here) or
    stops the run (on_error=stop); a run where every image fails is an error either way.
    """
    out = prepare(cfg, "refine")
    dataset, class_names = open_inputs(cfg)
    segmenter = Segmenter.from_config(cfg, class_names)
    keys = ResultKey(cfg, class_names, segmenter.generator.identity, {"overlay_alpha": cfg.overlay_alpha})
    palette = voc_palette(256)
    chains = {"main": segmenter.refiner}
    if cfg.panel:
        for title, steps in panel_steps(segmenter.generator).items():
            chains[title] = Chain.from_steps(steps, cfg.refine)
    matrix = ConfusionMatrix(len(class_names), ignore_index=dataset.ignore_index)
    labelled = done = 0
    log = ReuseLog()
    failures = Failures(cfg.get("on_error", "skip"))
    times = []
    start = time.perf_counter()
    for i in tqdm(range(len(dataset)), desc="refine", unit="img"):
        name = str(i)
        try:
            source = dataset.source(i)
            name = source.name
            key = keys.of(source)
            outputs = _outputs(out, name, cfg)
            record = output_path(out, "records", f"{name}.json")
            reason = "overwrite" if cfg.overwrite else _reuse_reason(record, key, outputs)
            sample = dataset[i] if reason is not None or source.label is not None else None
            if reason is None:
                labels = load_label(outputs["label"]) if sample is not None else None
            else:
                preds = segmenter.predict_many(sample.image, chains, keep_probs=cfg.save_probs)
                labels = preds["main"].labels
        except (ValueError, OSError) as error:  # reading and segmenting only: writes come after
            failures.add(name, error)
            continue
        log.add(reason)
        if reason is not None:
            times.append(preds["main"].times)
            _write(outputs, sample.image, preds, palette, cfg, sample.label)
            files = {kind: file_fingerprint(path) for kind, path in outputs.items()}
            write_json(record, {"key": key, "outputs": files})
            done += 1
        if sample is not None and sample.label is not None:
            matrix.update(labels, sample.label)
            labelled += 1
    summary = {
        "images": len(dataset),
        "protocol": protocol_name(cfg),
        "refined": done,
        **log.summary(),
        "failed": failures.items,
        "wall_seconds": time.perf_counter() - start,
        "seconds_per_image": stage_summary(times),
        "classes": class_names,
        "config": resolved(cfg),
    }
    if labelled:
        summary["metrics"] = matrix.compute()
        print(format_table(summary["metrics"], class_names))
    write_json(output_path(out, "summary.json"), summary)
    per_stage = ", ".join(f"{k} {v:.3f}s" for k, v in summary["seconds_per_image"].items())
    print(
        f"{len(dataset)} images: {ReuseLog.describe(summary)}, {len(failures.items)} failed -> {out}  "
        f"({per_stage or 'nothing ran'})"
    )
    failures.check_some_succeeded(len(dataset))
    return summary


def _write(outputs: dict[str, Path], image: np.ndarray, preds: dict, palette: np.ndarray, cfg: DictConfig,
           truth: np.ndarray | None) -> None:
    """Overlay, probabilities and panel, then the label PNG."""
    labels = preds["main"].labels
    save_overlay(outputs["overlay"], image, labels, palette, alpha=cfg.overlay_alpha)
    if "probs" in outputs:
        _save_probs(outputs["probs"], preds["main"].probs)
    if "panel" in outputs:
        columns = [("image", image)] + [(t, p.labels) for t, p in preds.items() if t != "main"]
        if truth is not None:
            columns.insert(1, ("ground truth", truth))
        save_rgb(outputs["panel"], make_panel(columns, class_names=preds["main"].class_names, palette=palette))
    save_label_png(outputs["label"], labels, palette)


main = hydra_app("refine", run)

if __name__ == "__main__":
    main()
