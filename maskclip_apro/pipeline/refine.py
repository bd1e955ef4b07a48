"""Refine a dataset into files: label PNGs, overlays, optional probabilities and panels.

Each finished image gets <out>/records/<name>.json: the key its outputs were made under
(pipeline.reuse), its input files' identities, and the identity and content digest of each
output file (data.base.file_digest). A rerun skips an image only when its record matches the
current run and its outputs hold the recorded bytes (a saved label must also have the ground
truth's size); otherwise it is recomputed, and a record that vouches for a bad label is named.
Under torchrun each rank refines and writes its own share of the images (pipeline.loop) and
every rank returns the same summary, made from all of them.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from ..data.base import file_digest
from ..data.io import load_label
from ..distributed import all_gather_object, barrier
from ..evaluation.metric import ConfusionMatrix
from ..palette import voc_palette
from ..refiners import Chain
from ..segmenter import Segmenter
from ..visualize import make_panel, save_overlay
from ..writing import output_path, save_label_png, save_rgb, save_safetensors, write_json
from .loop import Prepared, RunOptions, run_items
from .reuse import ResultKey, ReuseLog, stale_reason

MAIN = "main"  # the chain whose labels are written; any other chain is a panel column


@dataclass(frozen=True)
class RefineOutputs:
    """What refine writes per image besides the label PNG and the overlay."""

    save_probs: bool = False  # float16 safetensors of the refined probabilities
    panel: bool = False  # image | ground truth | one column per extra chain | the labels written
    panel_title: str = "labels/"  # the title of the panel's last column (chains[MAIN]: what labels/ holds)
    overlay_alpha: float = 0.5
    overwrite: bool = False  # recompute images a previous run finished with the same key


class _Reader:
    """The read-ahead half (pipeline.loop): whether an image's saved outputs stand, and its pixels."""

    def __init__(self, dataset: Any, out: Path, keys: ResultKey, outputs: RefineOutputs) -> None:
        self.dataset, self.out, self.keys, self.outputs = dataset, out, keys, outputs

    def paths(self, name: str) -> dict[str, Path]:
        """The files one image produces, by kind."""
        paths = {"label": output_path(self.out, "labels", f"{name}.png"),
                 "overlay": output_path(self.out, "overlays", f"{name}.png")}
        if self.outputs.save_probs:
            paths["probs"] = output_path(self.out, "probs", f"{name}.safetensors")
        if self.outputs.panel:
            paths["panel"] = output_path(self.out, "panels", f"{name}.png")
        return paths

    def __call__(self, item: Prepared) -> None:
        source = self.dataset.source(item.index)
        item.name = source.name
        paths = self.paths(item.name)
        record = output_path(self.out, "records", f"{item.name}.json")
        saved = _read_record(record)
        item.key, item.inputs = self.keys.of(source, saved.get("inputs") if isinstance(saved, dict) else None)
        item.reason = "overwrite" if self.outputs.overwrite else _reuse_reason(saved, item.key, paths)
        if item.reason is not None or source.label is not None:
            start = time.perf_counter()
            item.sample = self.dataset[item.index]
            item.read_seconds = time.perf_counter() - start
        if item.reason is None and item.sample is not None:
            try:
                item.saved = load_label(paths["label"])
                if item.saved.shape != item.sample.label.shape:
                    raise ValueError(f"has size {item.saved.shape}, the image {item.sample.label.shape}")
            except (ValueError, OSError) as error:
                tqdm.write(f"{paths['label']}: {error}; its record vouches for it, recomputing it", file=sys.stderr)
                item.reason, item.saved = "bad record", None


def _read_record(path: Path) -> dict | str | None:
    """An image's record, None when there is none, "unreadable" when it cannot be read."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable"
    if not isinstance(saved, dict) or not isinstance(saved.get("key"), dict) or not isinstance(saved.get("outputs"), dict):
        return "unreadable"
    return saved


def _reuse_reason(saved: dict | str | None, key: dict, outputs: Mapping[str, Path]) -> str | None:
    """None when the image's record matches `key` and its outputs hold the recorded bytes, else why not."""
    if saved is None:
        return "new"
    if not isinstance(saved, dict):
        return "unreadable record"
    reason = stale_reason(saved["key"], key)
    if reason is not None:
        return reason
    for kind, path in outputs.items():
        entry = saved["outputs"].get(kind)
        if not isinstance(entry, list) or len(entry) != 2 or not path.is_file():
            return "outputs changed"
        if file_digest(path, tuple(entry))[1] != entry[1]:
            return "outputs changed"
    return None


def refine_dataset(
    segmenter: Segmenter,
    chains: Mapping[str, Chain],
    dataset: Any,
    out: Path,
    keys: ResultKey,
    outputs: RefineOutputs = RefineOutputs(),
    options: RunOptions = RunOptions(on_error="skip"),
) -> dict[str, Any]:
    """Refine every image of `dataset` with chains[MAIN] into `out` (module doc); the summary.

    chains: MAIN, and with outputs.panel the panel's other columns, all run on one generator
    pass. The summary: images, refined, reused / not_reused (why), failed, wall_seconds,
    images_per_second (refined images over the wall time of all ranks together),
    seconds_per_image by stage, classes, and metrics when the dataset has labels.
    """
    if MAIN not in chains:
        raise ValueError(f"refine_dataset needs a chain named {MAIN!r}; got {list(chains)}")
    reader = _Reader(dataset, Path(out), keys, outputs)
    class_names = list(segmenter.class_names)
    palette = voc_palette(256)
    totals = _Totals(ConfusionMatrix(len(class_names), ignore_index=dataset.ignore_index))

    def predict(items: list[Prepared]) -> list[dict]:
        return segmenter.predict_batch([it.sample.image for it in items], chains, keep_probs=outputs.save_probs)

    def finish(item: Prepared, preds: dict | None) -> None:
        totals.log.add(item.reason)
        labels = item.saved
        if preds is not None:
            labels = preds[MAIN].labels
            start = time.perf_counter()
            paths = reader.paths(item.name)
            _write(paths, item.sample, preds, palette, outputs)
            write_json(output_path(reader.out, "records", f"{item.name}.json"),
                       {"key": item.key, "inputs": item.inputs,
                        "outputs": {kind: list(file_digest(p)) for kind, p in paths.items()}})
            totals.add_times({"read": item.read_seconds, **preds[MAIN].times, "write": time.perf_counter() - start})
        if item.sample is not None and item.sample.label is not None:
            totals.matrix.update(labels, item.sample.label)
            totals.labelled += 1

    barrier(options.info)
    start = time.perf_counter()
    failures = run_items(len(dataset), reader, predict, finish, options, desc="refine")
    merged = _Totals.merge(all_gather_object(totals, options.info))
    wall = time.perf_counter() - start
    summary = {
        "images": len(dataset),
        "refined": merged.refined,
        **merged.log.summary(),
        "failed": failures.items,
        "wall_seconds": wall,
        "images_per_second": merged.refined / wall if wall > 0 else 0.0,
        "processes": options.info.world_size,
        "seconds_per_image": merged.stage_means(),
        "classes": class_names,
    }
    if merged.labelled:
        summary["metrics"] = merged.matrix.compute()
    return summary


class _Totals:
    """What one rank accumulates; summed over the ranks at the end."""

    def __init__(self, matrix: ConfusionMatrix) -> None:
        self.matrix = matrix
        self.labelled = 0
        self.refined = 0
        self.log = ReuseLog()
        self.stage_seconds: dict[str, float] = defaultdict(float)

    def add_times(self, times: Mapping[str, float]) -> None:
        self.refined += 1
        for stage, seconds in times.items():
            self.stage_seconds[stage] += seconds

    def stage_means(self) -> dict[str, float]:
        """Mean seconds per refined image for each stage."""
        return {stage: total / self.refined for stage, total in self.stage_seconds.items()} if self.refined else {}

    @staticmethod
    def merge(parts: list["_Totals"]) -> "_Totals":
        total = parts[0]
        for part in parts[1:]:
            total.matrix.merge(part.matrix)
            total.labelled += part.labelled
            total.refined += part.refined
            total.log.merge(part.log)
            for stage, seconds in part.stage_seconds.items():
                total.stage_seconds[stage] += seconds
        return total


def _write(paths: Mapping[str, Path], sample: Any, preds: Mapping[str, Any], palette: np.ndarray,
           outputs: RefineOutputs) -> None:
    """Overlay, probabilities and panel, then the label PNG."""
    labels = preds[MAIN].labels
    save_overlay(paths["overlay"], sample.image, labels, palette, alpha=outputs.overlay_alpha)
    if "probs" in paths:
        _save_probs(paths["probs"], preds[MAIN].probs)
    if "panel" in paths:
        columns = [("image", sample.image)] + [(t, p.labels) for t, p in preds.items() if t != MAIN]
        columns.append((outputs.panel_title, labels))
        if sample.label is not None:
            columns.insert(1, ("ground truth", sample.label))
        save_rgb(paths["panel"], make_panel(columns, class_names=preds[MAIN].class_names, palette=palette))
    save_label_png(paths["label"], labels, palette)


def _save_probs(path: Path, probs) -> None:
    save_safetensors(path, {"probs": probs.to(torch.float16)})
