"""mIoU of one refiner configuration on a labelled dataset.

    python scripts/evaluate.py dataset=voc21 model=vit_b16 refine=apro
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..config import hydra_app, refine_steps
from ..evaluation import format_table
from ..writing import output_path, write_json
from .common import prepare, resolved
from .methods import methods_table, run_methods
from .reuse import ReuseLog


def _preset_name(cfg: DictConfig) -> str:
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("refine", "refine"))
    return str(cfg.get("name", "refine"))


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.refine on cfg.dataset; writes results.json (tagged with the resolved config)."""
    out = prepare(cfg, "evaluate")
    name = _preset_name(cfg)
    results = run_methods(cfg, {name: refine_steps(cfg)}, out)
    metrics = results["methods"][name]
    print(format_table(metrics, results["classes"]))
    print(methods_table(results))
    write_json(output_path(out, "results.json"), {**results, "config": resolved(cfg)})
    print(f"per-image records: {ReuseLog.describe(results)}")
    return results


main = hydra_app("evaluate", run)

if __name__ == "__main__":
    main()
