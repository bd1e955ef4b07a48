"""What evaluate and compare share: build the segmenter and the method chains from the config,
score them with pipeline.score, and have rank 0 report and write results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig

from ..config import protocol_name, refine_params
from ..distributed import DistInfo, broadcast_object, process_group
from ..pipeline.report import run_report
from ..pipeline.score import score_methods
from ..pipeline.reuse import ResultKey, ReuseLog
from ..refiners import Chain
from ..segmenter import Segmenter
from ..writing import output_path, write_json
from .common import check, on_device, open_inputs, ran_on, resolved, run_folder, run_options, skipped_inputs


def score(
    cfg: DictConfig,
    command: str,
    methods: Mapping[str, Sequence[str]],
    report: Callable[[dict, Path], None],
    out: Path | None = None,
    panels: int = 0,
) -> dict:
    """Score every method (name -> refiner steps) on one generator pass per image; returns the
    results, which rank 0 hands to `report` and writes to <out>/results.json (out: cfg.output_dir)."""
    check(cfg, command)
    with process_group(str(cfg.device)) as info:
        dataset, class_names = open_inputs(cfg)
        skipped = skipped_inputs(dataset, str(cfg.get("on_error", "stop")), info)
        with run_folder(broadcast_object(str(out or cfg.output_dir), info), info) as out:
            return _score(cfg, command, methods, report, out, panels, info, dataset, class_names, skipped)


def _score(cfg: DictConfig, command: str, methods: Mapping[str, Sequence[str]], report: Callable[[dict, Path], None],
           out: Path, panels: int, info: DistInfo, dataset: Any, class_names: list[str], skipped: list[dict]) -> dict:
    """The run itself, in its locked output folder."""
    segmenter = Segmenter.from_config(on_device(cfg, info), class_names)
    steps = {m: list(v) for m, v in methods.items()}
    keys = ResultKey(resolved(cfg), class_names, segmenter.generator.identity, {"methods": steps})
    chains = {m: Chain.from_steps(s, refine_params(cfg)) for m, s in steps.items()}
    results = score_methods(segmenter, chains, steps, dataset, out, keys, protocol_name(cfg), panels,
                            run_options(cfg, info, "stop"), desc=command)
    results = {**results, **ran_on(info, segmenter.generator), "skipped_inputs": skipped}
    if info.is_main:
        report(results, out)
        write_json(output_path(out, "results.json"), {**results, "config": resolved(cfg)})
        run_report(segmenter, chains, dataset, out, results)
        print(f"per-image records: {ReuseLog.describe(results)}; ran on {results['device']}, "
              f"image tower {results['precision']}")
    return results
