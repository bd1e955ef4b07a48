"""The comparison table (APro Table A1 style): one MaskCLIP pass per image, every refiner on it.

    python scripts/compare.py dataset=context59 model=vit_b16 limit=100
    torchrun --nproc_per_node 4 scripts/compare.py dataset=context59 model=vit_b16 device=cuda batch_size=8
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import hydra_app
from ..evaluation import methods_table
from ..writing import atomic_write, output_path
from .methods import score
from .sweep import job_output_dir


def _write_table(results: dict, out: Path) -> None:
    table = methods_table(results)
    print(table)
    with atomic_write(output_path(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")


def run(cfg: DictConfig) -> dict:
    """Score every method in cfg.methods; rank 0 writes table.md and results.json to cfg.output_dir.

    In a multirun (-m) each job writes to its own folder and cli/sweep.py joins them in one table.
    """
    methods = OmegaConf.to_container(cfg.methods, resolve=True)
    return score(cfg, "compare", methods, _write_table, out=job_output_dir(cfg), panels=cfg.panels)


main = hydra_app("compare", run)

if __name__ == "__main__":
    main()
