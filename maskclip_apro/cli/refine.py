"""Training-free refinement: images in; label PNGs, overlays, optional probabilities and panels out.

    python scripts/refine.py input=PATH vocab=voc21 model=vit_b16 refine=apro output_dir=out
    torchrun --nproc_per_node 4 scripts/refine.py dataset=cocostuff171 dataset.split=train device=cuda batch_size=8

The work is pipeline.refine's; this module composes it from the config and reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..config import hydra_app, protocol_name, refine_params, refine_steps
from ..distributed import DistInfo, process_group
from ..evaluation import format_table
from ..pipeline.loop import check_some_succeeded
from ..pipeline.refine import MAIN, RefineOutputs, refine_dataset
from ..pipeline.report import refine_index
from ..pipeline.reuse import ResultKey, ReuseLog
from ..refiners import Chain
from ..segmenter import Segmenter
from ..writing import output_path, write_json
from .common import check, on_device, open_inputs, ran_on, resolved, run_folder, run_options, skipped_inputs


def panel_steps(generator, steps: list[str]) -> dict[str, list[str]]:
    """Panel columns before the last (the labels written, refiner `steps`): the unary, +KS (+PAMR
    under a harness protocol, which has no key smoothing), +APro, less the one that is `steps`."""
    second = ("+PAMR", ["pamr_logits"]) if generator.mode == "harness" else ("+KS", ["ks"])
    columns = {generator.name: [], second[0]: second[1], "+APro": ["apro"]}
    return {title: column for title, column in columns.items() if column != steps}


def panel_title(steps: list[str]) -> str:
    """The title of the panel column that shows the labels written: the refiner steps that made them."""
    return "labels: " + ("+".join(steps) if steps else "unary")


def _refine(cfg: DictConfig, info: DistInfo, out: Path, dataset: Any, class_names: list[str], skipped: list[dict]) -> dict:
    """The run itself, in its locked output folder; rank 0 writes and prints the summary."""
    segmenter = Segmenter.from_config(on_device(cfg, info), class_names)
    keys = ResultKey(resolved(cfg), class_names, segmenter.generator.identity, {"overlay_alpha": cfg.overlay_alpha})
    chains = {MAIN: segmenter.refiner}
    steps = refine_steps(cfg)
    if cfg.panel:
        chains.update({title: Chain.from_steps(column, refine_params(cfg))
                       for title, column in panel_steps(segmenter.generator, steps).items()})
    outputs = RefineOutputs(save_probs=cfg.save_probs, panel=cfg.panel, panel_title=panel_title(steps),
                            overlay_alpha=cfg.overlay_alpha, overwrite=cfg.overwrite)
    summary = refine_dataset(segmenter, chains, dataset, out, keys, outputs, run_options(cfg, info, "skip"))
    summary = {**summary, **ran_on(info, segmenter.generator), "skipped_inputs": skipped,
               "protocol": protocol_name(cfg), "config": resolved(cfg)}
    if info.is_main:
        if "metrics" in summary:
            print(format_table(summary["metrics"], class_names))
        write_json(output_path(out, "summary.json"), summary)
        refine_index(dataset, out, summary)
        per_stage = ", ".join(f"{k} {v:.3f}s" for k, v in summary["seconds_per_image"].items())
        print(
            f"{summary['images']} images: {ReuseLog.describe(summary)}, {len(summary['failed'])} failed"
            + (f", {len(skipped)} input file(s) skipped" if skipped else "") + f" -> {out}  "
            f"({per_stage or 'nothing ran'}; {summary['images_per_second']:.2f} img/s over "
            f"{summary['processes']} process(es) on {summary['device']}, {summary['precision']})"
        )
    return summary


def run(cfg: DictConfig) -> dict:
    """Refine every input image; returns the summary rank 0 also writes to output_dir/summary.json.

    An image that cannot be read or segmented (missing, corrupt, too large or too small, bad
    label values) is skipped and listed under "failed" (on_error=skip, the default here) or
    stops the run (on_error=stop); a run where every image fails is an error either way.
    """
    check(cfg, "refine")
    with process_group(str(cfg.device)) as info:
        dataset, class_names = open_inputs(cfg)
        skipped = skipped_inputs(dataset, str(cfg.get("on_error", "skip")), info)
        with run_folder(cfg.output_dir, info) as out:
            summary = _refine(cfg, info, out, dataset, class_names, skipped)
    check_some_succeeded(summary["failed"], summary["images"])
    return summary


main = hydra_app("refine", run)

if __name__ == "__main__":
    main()
