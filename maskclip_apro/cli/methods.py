"""What evaluate and compare share: build the segmenter and the method chains from the config,
score them with pipeline.score, and have rank 0 report and write results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from omegaconf import DictConfig

from ..config import protocol_name, refine_params
from ..distributed import broadcast_object, process_group
from ..pipeline.report import run_report
from ..pipeline.score import score_methods
from ..pipeline.reuse import ResultKey, ReuseLog
from ..refiners import Chain
from ..segmenter import Segmenter
from ..writing import output_path, write_json
from .common import check, on_device, open_inputs, resolved, run_options, tidy


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
        out = tidy(Path(broadcast_object(str(out or cfg.output_dir), info)), info)
        dataset, class_names = open_inputs(cfg)
        segmenter = Segmenter.from_config(on_device(cfg, info), class_names)
        steps = {m: list(v) for m, v in methods.items()}
        keys = ResultKey(resolved(cfg), class_names, segmenter.generator.identity, {"methods": steps})
        chains = {m: Chain.from_steps(s, refine_params(cfg)) for m, s in steps.items()}
        results = score_methods(segmenter, chains, steps, dataset, out, keys, protocol_name(cfg), panels,
                                run_options(cfg, info, "stop"))
        if info.is_main:
            report(results, out)
            write_json(output_path(out, "results.json"), {**results, "config": resolved(cfg)})
            run_report(segmenter, chains, dataset, out, results)
            print(f"per-image records: {ReuseLog.describe(results)}")
    return results
