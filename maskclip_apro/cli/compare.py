"""The comparison table (APro Table A1 style): one MaskCLIP pass per image, every refiner on it.

    python scripts/compare.py dataset=context59 model=vit_b16 limit=100
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..config import hydra_app
from ..writing import atomic_write, output_path, write_json
from .common import prepare, resolved
from .methods import methods_table, run_methods
from .reuse import ReuseLog
from .sweep import job_output_dir


def run(cfg: DictConfig) -> dict:
    """Score every method in cfg.methods; writes table.md and results.json to cfg.output_dir.

    In a multirun (-m) each job writes to its own folder and cli/sweep.py joins them in one table.
    """
    out = prepare(cfg, "compare", job_output_dir(cfg))
    methods = OmegaConf.to_container(cfg.methods, resolve=True)
    results = run_methods(cfg, methods, out, panels=cfg.panels)
    table = methods_table(results)
    print(table)
    with atomic_write(output_path(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    write_json(output_path(out, "results.json"), {**results, "config": resolved(cfg)})
    print(f"per-image records: {ReuseLog.describe(results)}")
    return results


main = hydra_app("compare", run)

if __name__ == "__main__":
    main()
