"""What the commands share: config checks and setup, inputs, vocabulary, per-image failures, summaries."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..data import build_dataset, load_vocab
from ..data.io import set_max_image_pixels
from ..samples import sample_paths
from ..schema import check_config
from ..writing import remove_stale_temporaries


def prepare(cfg: DictConfig, command: str, out: Path | None = None) -> Path:
    """Check the config, apply the image size limit, tidy the output folder (cfg.output_dir
    unless `out` names the run's own); returns the folder.

    Temporary files that a killed run left behind (see maskclip_apro.writing) are removed.
    """
    check_config(cfg, command)
    set_max_image_pixels(cfg.get("max_image_pixels"))
    out = Path(cfg.output_dir) if out is None else Path(out)
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"removed {len(removed)} unfinished temporary file(s) an interrupted run left in {out}")
    return out


class Failures:
    """Images that could not be processed, under on_error: "stop" re-raises, "skip" lists them."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.items: list[dict[str, str]] = []

    def add(self, name: str, error: Exception) -> None:
        if self.on_error == "stop":
            raise error
        self.items.append({"name": name, "error": str(error)})
        tqdm.write(f"skipped {name}: {error}", file=sys.stderr)

    def check_some_succeeded(self, total: int) -> None:
        """Every image failing is a run failure, not a list of skips."""
        if total and len(self.items) == total:
            first = self.items[0]
            raise ValueError(f"all {total} images failed; first, {first['name']}: {first['error']}")


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


def resolved(cfg: DictConfig) -> dict:
    """The run's full resolved config, to tag results with."""
    return OmegaConf.to_container(cfg, resolve=True)
