"""MaskCLIP+ student training on online (APro-refined) MaskCLIP pseudo labels, single or multi process.

    python scripts/train.py dataset=voc20 model=vit_b16                      # MaskCLIP+ recipe + APro targets
    python scripts/train.py dataset=voc20 model=vit_b16 refine=none          # plain MaskCLIP+
    python scripts/train.py dataset=voc20 model=vit_b16 student=apro_paper   # the APro paper's recipe
    torchrun --nproc_per_node 4 scripts/train.py dataset=context59 model=vit_b16
    python scripts/train.py dataset=synthetic model=tiny_vit student=tiny iters=20
    python scripts/train.py dataset=context59 model=vit_b16 resume=latest    # continue the newest such run
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import hydra_app
from ..distributed import process_group
from ..student.trainer import Trainer
from .common import check, run_folder


def run(cfg: DictConfig) -> list[float]:
    """Train per cfg (conf/train.yaml); returns this call's per-step losses."""
    check(cfg, "train")
    with process_group(str(cfg.device)) as info, run_folder(cfg.output_dir, info):
        return Trainer(cfg, info=info).run()


main = hydra_app("train", run)

if __name__ == "__main__":
    main()
