"""What the refine, evaluate and compare commands share: inputs, vocabulary, timing summaries."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from ..data import build_dataset, load_vocab
from ..data.io import atomic_write
from ..samples import sample_paths


def open_inputs(cfg: DictConfig) -> tuple[Any, list[str]]:
    """The dataset to run on (cfg.input, else cfg.dataset, else the bundled samples) and its vocabulary.

    A labelled dataset brings its classes; unlabelled images are segmented with cfg.vocab.
    """
    limit = cfg.get("limit")
    if cfg.get("input"):
        dataset = build_dataset("images", root=str(cfg.input), classes=load_vocab(cfg.vocab), limit=limit)
    elif cfg.get("dataset"):
        spec = OmegaConf.to_container(cfg.dataset, resolve=True)
        if limit is not None:
            spec["limit"] = limit
        dataset = build_dataset(**spec)
    else:
        dataset = build_dataset("images", root=sample_paths(), classes=load_vocab(cfg.vocab), limit=limit)
    return dataset, list(dataset.class_names)


def stage_summary(times: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean seconds per image for each stage over the images that ran."""
    totals: dict[str, float] = defaultdict(float)
    count = 0
    for t in times:
        count += 1
        for stage, seconds in t.items():
            totals[stage] += seconds
    return {stage: total / count for stage, total in totals.items()} if count else {}


def write_json(path: Path, payload: Any) -> None:
    """JSON, written atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=float)


def resolved(cfg: DictConfig) -> dict:
    """The run's full resolved config, to tag results with."""
    return OmegaConf.to_container(cfg, resolve=True)
