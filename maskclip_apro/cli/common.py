"""What the commands share: config checks, the output folder, inputs, the device and run options."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

from ..data import build_dataset, load_vocab
from ..data.base import check_class_count
from ..data.io import set_max_image_pixels
from ..distributed import DistInfo, barrier, broadcast_object
from ..pipeline.loop import RunOptions
from ..samples import sample_paths
from ..schema import check_config
from ..writing import check_output_dir, lock_output_dir, remove_stale_temporaries


def check(cfg: DictConfig, command: str) -> None:
    """Check the config and apply its image size limit (before anything else runs)."""
    check_config(cfg, command)
    set_max_image_pixels(cfg.get("max_image_pixels"))


@contextlib.contextmanager
def run_folder(out: Path | str, info: DistInfo = DistInfo()) -> Iterator[Path]:
    """The output folder of one run, for the duration of the block: checked (writing.check_output_dir),
    locked against a second run (writing.lock_output_dir), and cleared of the temporary files a
    killed run left (writing.remove_stale_temporaries). Under torchrun rank 0 does this while the
    others wait, and a refusal ends every rank with the same line."""
    out = Path(out)
    with contextlib.ExitStack() as stack:
        problem = None
        if info.is_main:
            try:
                check_output_dir(out)
                stack.enter_context(lock_output_dir(out))
                removed = remove_stale_temporaries(out)
                if removed:
                    print(f"removed {len(removed)} unfinished temporary file(s) an interrupted run left in {out}")
            except (ValueError, OSError) as error:
                problem = error
        message = broadcast_object(None if problem is None else str(problem), info)
        if problem is not None:
            raise problem
        if message is not None:
            raise ValueError(message)
        barrier(info)
        yield out


def skipped_inputs(dataset: Any, on_error: str, info: DistInfo = DistInfo()) -> list[dict[str, str]]:
    """The input files the dataset left out (data.base.SegDataset.skipped), printed on stderr by
    rank 0; under on_error=stop, files that share a name end the run instead (on every rank)."""
    skipped = [{"path": path, "why": why} for path, why in getattr(dataset, "skipped", [])]
    clashes = getattr(dataset, "name_clashes", set())
    shared = [entry for entry in skipped if entry["path"] in clashes]
    if shared and on_error == "stop":
        raise ValueError(f"{shared[0]['why']}; or run with on_error=skip to leave them out")
    for entry in skipped if info.is_main else []:
        print(f"skipped input {entry['path']}: {entry['why']}", file=sys.stderr)
    return skipped


def open_inputs(cfg: DictConfig) -> tuple[Any, list[str]]:
    """The dataset to run on (cfg.input, else cfg.dataset, else the bundled samples) and its vocabulary.

    A labelled dataset brings its classes; unlabelled images are segmented with cfg.vocab. More
    classes than a label map can hold are refused before anything runs (check_class_count).
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
    check_class_count(list(dataset.class_names), "the vocabulary" if cfg.get("input") or not cfg.get("dataset")
                      else f"dataset {cfg.dataset.get('name')!r}")
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
