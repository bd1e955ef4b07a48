"""MaskCLIP+ student training (DeepLabv2 on APro-refined pseudo labels), single or multi process.

    python scripts/train.py dataset=context59 student=deeplabv2_r101 model=vit_b16
    torchrun --nproc_per_node 4 scripts/train.py dataset=voc21 model=vit_b16 batch_size=32
    python scripts/train.py dataset=synthetic model=tiny_vit student=tiny iters=20
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import hydra_app
from ..student.distributed import init_distributed, shutdown
from .common import prepare
from ..student.trainer import Trainer


def run(cfg: DictConfig) -> list[float]:
    """Train per cfg (conf/train.yaml); returns this call's per-step losses."""
    prepare(cfg, "train")
    info = init_distributed(str(cfg.device))
    try:
        return Trainer(cfg, info=info).run()
    finally:
        shutdown(info)


main = hydra_app("train", run)

if __name__ == "__main__":
    main()
