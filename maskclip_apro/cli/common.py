"""What the commands share: config checks, the output folder, inputs, the device and run options."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ..data import build_dataset, load_vocab
from ..data.io import set_max_image_pixels
from ..distributed import DistInfo, barrier
from ..pipeline.loop import RunOptions
from ..samples import sample_paths
from ..schema import check_config
from ..writing import remove_stale_temporaries


def check(cfg: DictConfig, command: str) -> None:
    """Check the config and apply its image size limit (before anything else runs)."""
    check_config(cfg, command)
    set_max_image_pixels(cfg.get("max_image_pixels"))


def tidy(out: Path, info: DistInfo = DistInfo()) -> Path:
    """Remove the temporary files a killed run left in `out` (see maskclip_apro.writing); under
    torchrun rank 0 does it while the others wait, so no rank removes a file another is writing."""
    out = Path(out)
    if info.is_main:
        removed = remove_stale_temporaries(out)
        if removed:
            print(f"removed {len(removed)} unfinished temporary file(s) an interrupted run left in {out}")
    barrier(info)
    return out


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


def on_device(cfg: DictConfig, info: DistInfo) -> DictConfig:
    """A copy of cfg whose device is this process's (device=cuda under torchrun: cuda:<local rank>)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.device = str(info.device)
    return cfg


def ran_on(info: DistInfo, generator: Any) -> dict[str, str]:
    """Where the run computed, for its summary: this process's device and the image tower's dtype."""
    return {"device": str(info.device), "precision": str(getattr(generator, "precision", "fp32"))}


def run_options(cfg: DictConfig, info: DistInfo, on_error: str) -> RunOptions:
    """batch_size, workers and on_error (default `on_error`) of a per-image command."""
    return RunOptions(batch_size=int(cfg.get("batch_size", 1)), workers=int(cfg.get("workers", 0)),
                      on_error=str(cfg.get("on_error", on_error)), info=info)


def resolved(cfg: DictConfig) -> dict:
    """The run's full resolved config, to tag results with."""
    return OmegaConf.to_container(cfg, resolve=True)
