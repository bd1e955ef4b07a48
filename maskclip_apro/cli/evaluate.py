"""mIoU of one refiner configuration on a labelled dataset.

    python scripts/evaluate.py dataset=voc21 model=vit_b16 refine=apro
    torchrun --nproc_per_node 4 scripts/evaluate.py dataset=voc21 model=vit_b16 device=cuda batch_size=8
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..config import hydra_app, refine_steps
from ..evaluation import format_table, methods_table
from .methods import score


def _preset_name(cfg: DictConfig) -> str:
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("refine", "refine"))
    return str(cfg.get("name", "refine"))


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.refine on cfg.dataset; rank 0 writes results.json (tagged with the resolved config)."""
    name = _preset_name(cfg)

    def report(results: dict, out) -> None:
        print(format_table(results["methods"][name], results["classes"]))
        print(methods_table(results))

    return score(cfg, "evaluate", {name: refine_steps(cfg)}, report)


main = hydra_app("evaluate", run)

if __name__ == "__main__":
    main()
