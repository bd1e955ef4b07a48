"""Hydra multirun sweeps over the compare command, collected into one table.

    python scripts/compare.py -m dataset=voc21 refine.apro.zeta_g=0.05,0.1,0.2 refine.apro.zeta_s=0.15,0.5

Each job writes its results to its own folder, <sweep dir>/<job number> (`job_output_dir`); when
the sweep ends, `SweepTable` reads every job's results.json and writes sweep_table.md (one row per
job and method, a column per override that varies across the jobs) and sweep_results.json to the
sweep folder, and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..writing import atomic_write, write_json


def job_output_dir(cfg: DictConfig) -> Path:
    """cfg.output_dir, or the job's own folder (hydra.sweep.dir/<job number>) inside a multirun."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.output_dir)


def _overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides as key -> value (from Hydra's .hydra/overrides.yaml)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = OmegaConf.to_container(OmegaConf.load(path))
    return dict(str(item).split("=", 1) if "=" in str(item) else (str(item), "") for item in items)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per finished job under sweep_dir, in job-number order: job, overrides, results."""
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / "results.json").is_file()]
    jobs.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    records = []
    for job in jobs:
        results = json.loads((job / "results.json").read_text(encoding="utf-8"))
        results.pop("config", None)
        records.append({"job": job.name, "overrides": _overrides(job), "results": results})
    return records


def sweep_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per job and method, a column per override that differs between jobs, seconds per
    image by stage (the generator's shared by a job's methods)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r["overrides"] if k not in keys]
    varying = [k for k in keys if len({r["overrides"].get(k) for r in records}) > 1]
    shared = [f"{k}={records[0]['overrides'][k]}" for k in keys if k not in varying and k in records[0]["overrides"]]
    lines = [f"Sweep of {len(records)} jobs" + (f"; every job: {' '.join(shared)}" if shared else ""), ""]
    header = ["job", *varying, "method", "mIoU (%)", "pixel acc (%)", "generator s/img", "refiner s/img",
              "postprocess s/img"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * (len(varying) + 2) + "---:|" * 5]
    for r in records:
        cells = [r["job"], *(r["overrides"].get(k, "") for k in varying)]
        generator = f"{r['results']['generator_seconds_per_image']:.3f}"
        for name, m in r["results"]["methods"].items():
            row = [*cells, name, f"{100 * m['mIoU']:.2f}", f"{100 * m['aAcc']:.2f}", generator,
                   f"{m['seconds_per_image']:.3f}", f"{m.get('postprocess_seconds_per_image', 0.0):.3f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


class SweepTable(Callback):
    """Hydra callback: at the end of a multirun, one table of every job's results at the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        records = collect(sweep_dir)
        if not records:
            print(f"sweep: no job in {sweep_dir} wrote results.json")
            return
        table = sweep_table(records)
        with atomic_write(sweep_dir / "sweep_table.md", "w", encoding="utf-8") as f:
            f.write(table + "\n")
        write_json(sweep_dir / "sweep_results.json", records)
        print(f"\n{table}\n\n-> {sweep_dir / 'sweep_table.md'}")
