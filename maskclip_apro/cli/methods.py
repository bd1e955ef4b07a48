"""Run several refiner chains on one generator pass per image and score them (evaluate, compare).

Per-image confusion matrices and times go to output_dir/per_image/<name>.npz as each image
finishes (atomically), with the key they were made under (cli.reuse); a rerun reuses the
records whose key matches and computes the rest, so an interrupted run continues where it
stopped and a changed config, vocabulary, weights or input file is never served stale.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from ..config import protocol_name
from ..evaluation import ConfusionMatrix
from ..palette import voc_palette
from ..refiners import Chain
from ..segmenter import Segmenter
from ..visualize import make_panel
from ..writing import atomic_write, output_path, save_rgb
from .common import Failures, open_inputs
from .reuse import ResultKey, ReuseLog, read_key, stale_reason


def _load(path: Path, key: Mapping) -> tuple[dict | None, str | None]:
    """The saved record of one image and None, or None and why it cannot be reused."""
    if not path.exists():
        return None, "new"
    try:
        with np.load(path, allow_pickle=False) as data:
            record = {k: data[k] for k in data.files}
        saved = read_key(str(record["key"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        tqdm.write(f"{path} is unreadable ({error}); recomputing it", file=sys.stderr)
        return None, "unreadable record"
    reason = stale_reason(saved, key)
    return (record, None) if reason is None else (None, reason)


def _save(path: Path, record: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **record)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def run_methods(cfg: DictConfig, methods: Mapping[str, Sequence[str]], out: Path, panels: int = 0) -> dict:
    """mIoU and seconds per image of every method over the dataset; resumable (module doc).

    An image that cannot be read or segmented (missing, corrupt, too large or too small, bad
    label values) stops the run (on_error=stop) or is skipped and listed under "failed"
    (on_error=skip); metrics are then over the images that ran.
    """
    dataset, class_names = open_inputs(cfg)
    segmenter = Segmenter.from_config(cfg, class_names)
    names = list(methods)
    keys = ResultKey(cfg, class_names, segmenter.generator.identity, {"methods": {m: list(v) for m, v in methods.items()}})
    chains = {m: Chain.from_steps(steps, cfg.refine) for m, steps in methods.items()}
    k = len(class_names)
    totals = [ConfusionMatrix(k, ignore_index=dataset.ignore_index) for _ in names]
    seconds = np.zeros(len(names))
    post_seconds = np.zeros(len(names))
    generator_seconds = 0.0
    log = ReuseLog()
    failures = Failures(cfg.get("on_error", "stop"))
    done = 0
    warmed = False
    for i in tqdm(range(len(dataset)), desc="evaluate", unit="img"):
        name = str(i)
        try:
            source = dataset.source(i)
            name = source.name
            key = keys.of(source)
            path = output_path(out, "per_image", f"{name}.npz")
            record, reason = _load(path, key)
            if record is None:
                record, panel = _compute(segmenter, chains, dataset[i], names, k, dataset.ignore_index, warmed,
                                         i < panels)
                warmed = True
        except (ValueError, OSError) as error:  # reading and segmenting only: writes come after
            failures.add(name, error)
            continue
        if reason is not None:
            record["key"] = np.array(json.dumps(key))
            if panel is not None:
                save_rgb(output_path(out, "panels", f"{name}.png"), panel)
            _save(path, record)
        log.add(reason)
        done += 1
        for j in range(len(names)):
            totals[j].matrix += record[f"cm{j}"]
        seconds += record["seconds"]
        post_seconds += record["postprocess_seconds"]
        generator_seconds += float(record["generator_seconds"])
    failures.check_some_succeeded(len(dataset))
    n = max(done, 1)
    return {
        "images": done,
        **log.summary(),
        "failed": failures.items,
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


def _compute(segmenter, chains, sample, names, k, ignore_index, warmed, panel) -> tuple[dict, np.ndarray | None]:
    """One image's record (confusion matrix and refiner seconds per method, generator seconds)
    and, when `panel`, its side-by-side panel."""
    if sample.label is None:
        raise ValueError(f"image {sample.name!r} has no ground-truth label; evaluation needs a labelled dataset")
    if not warmed:  # the first call compiles kernels: keep it out of the timings
        segmenter.predict_many(sample.image, chains, keep_probs=False)
    preds = segmenter.predict_many(sample.image, chains, keep_probs=False)
    record = {"methods": np.array(names)}
    record["seconds"] = np.array(
        [sum(v for s, v in preds[m].times.items() if s not in ("generator", "postprocess")) for m in names])
    record["postprocess_seconds"] = np.array([preds[m].times["postprocess"] for m in names])
    record["generator_seconds"] = np.array(preds[names[0]].times["generator"])
    for j, m in enumerate(names):
        record[f"cm{j}"] = ConfusionMatrix(k, ignore_index=ignore_index).update(preds[m].labels, sample.label).matrix
    if not panel:
        return record, None
    palette = voc_palette(256)
    columns = [("image", sample.image), ("ground truth", sample.label)]
    columns += [(m, p.labels) for m, p in preds.items()]
    return record, make_panel(columns, class_names=segmenter.class_names, palette=palette)


def methods_table(results: dict) -> str:
    """Markdown: method, mIoU, refiner and postprocess seconds per image."""
    failed = len(results.get("failed", []))
    lines = [
        f"{results.get('generator', 'MaskCLIP')} generator, protocol {results['protocol']}: "
        f"{results['generator_seconds_per_image']:.3f} s/img over {results['images']} images"
        + (f" ({failed} unreadable image(s) skipped, listed in results.json)" if failed else ""),
        "",
        "| Method | mIoU (%) | pixel acc (%) | refiner s/img | postprocess s/img |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {100 * r['mIoU']:.2f} | {100 * r['aAcc']:.2f} | {r['seconds_per_image']:.3f} "
                     f"| {r.get('postprocess_seconds_per_image', 0.0):.3f} |")
    return "\n".join(lines)
