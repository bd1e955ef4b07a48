"""MaskCLIP+ training loop: DeepLabv2 student on (APro-refined) teacher pseudo labels.

One step = one global batch of `batch_size` crops split over W processes (torchrun/DDP) and
`accum` micro-batches. Loss means use pixel counts of the whole global batch (summed over
processes), and the per-process loss is scaled by W to undo DDP's gradient averaging, so a step
is the same for any W. Data order and augmentation derive from (seed, position) (see data.py);
with the checkpointed model/optimizer/scheduler/scaler state a resumed run repeats the loss
sequence of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import build_dataset
from ..evaluation import ConfusionMatrix
from .augment import AugmentParams
from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .data import StepBatches, TrainCrops
from .deeplabv2 import DeepLabV2
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .losses import combine, loss_sums
from .teacher import TARGET_MODES, Targets, Teacher

# Paper schedule (MaskCLIP+): 2k / 4k / 8k iterations for VOC / Pascal Context / COCO-Stuff.
DEFAULT_ITERS = {"voc": 2000, "context": 4000, "cocostuff": 8000}
OPTIMIZERS = ("sgd", "adamw")
CSV_FIELDS = ("step", "loss", "loss_ce", "loss_l1", "lr", "it_per_s", "mIoU", "aAcc")
# Config keys that must not change when resuming (they change the loss sequence).
RESUME_KEYS = ("seed", "batch_size", "crop", "accum", "iters", "dataset", "student", "target", "augment", "optim")


def default_iters(dataset_name: str) -> int:
    """Paper iterations for a dataset name (voc*, context*, cocostuff*); others need iters=."""
    for prefix, iters in DEFAULT_ITERS.items():
        if dataset_name.startswith(prefix):
            return iters
    raise ValueError(f"iters is not set and dataset {dataset_name!r} has no paper default; pass iters=N")


def poly_lambda(iters: int, power: float) -> Callable[[int], float]:
    """lr factor (1 − step / iters)^power."""
    return lambda step: max(0.0, 1.0 - step / iters) ** power


def build_optimizer(params, cfg: DictConfig) -> torch.optim.Optimizer:
    name = str(cfg.name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")


def _shared_output_dir(path: str, info: DistInfo) -> str:
    """Rank 0's output folder on every rank (a ${now:} folder name may differ between processes)."""
    if not info.enabled:
        return path
    import torch.distributed as dist

    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CsvLog:
    """metrics.csv with a fixed header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = Path(path)
        rows: List[Dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())

    def write(self, **row: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})


class Trainer:
    """Build everything from a composed conf/train.yaml config; `run()` trains.

    generator: a ready teacher generator (tests); by default it is built from cfg.model.
    """

    def __init__(self, cfg: DictConfig, generator: Optional[Callable] = None, info: Optional[DistInfo] = None):
        self.cfg = cfg
        self.info = info or init_distributed(str(cfg.device))
        self.device = self.info.device
        self.out = Path(_shared_output_dir(str(cfg.output_dir), self.info))
        self.iters = int(cfg.iters) if cfg.get("iters") is not None else default_iters(str(cfg.dataset.name))
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        self.accum = int(cfg.accum)
        self.global_batch = int(cfg.batch_size)
        StepBatches(0, 0, self.global_batch, 0, self.info.world_size, self.accum)  # validates the split
        spec = OmegaConf.to_container(cfg.dataset, resolve=True)
        self.train_set = build_dataset(**{**spec, "split": cfg.train_split})
        self.num_classes = int(self.train_set.num_classes)
        self.val_set = None
        if int(cfg.eval.interval) > 0:
            self.val_set = build_dataset(**{**spec, "split": cfg.val_split})
            if len(self.val_set) == 0 or self.val_set[0].label is None:
                raise ValueError(
                    f"val split {cfg.val_split!r} of dataset {cfg.dataset.name!r} has no labels; set eval.interval=0"
                )
        self.mode = str(cfg.target.mode)
        if self.mode not in (*TARGET_MODES, "offline"):
            raise ValueError(f"target.mode must be one of {(*TARGET_MODES, 'offline')}, got {self.mode!r}")
        if self.mode == "offline" and not cfg.target.get("offline_dir"):
            raise ValueError("target.mode=offline needs target.offline_dir (a folder of <name>.png pseudo labels)")
        self.teacher = None if self.mode == "offline" else self._build_teacher(generator)

        torch.manual_seed(int(cfg.seed))  # the student's random initialisation
        s = cfg.student
        self.model = DeepLabV2(
            self.num_classes,
            backbone=str(s.backbone),
            pretrained=s.pretrained,
            dilations=tuple(s.dilations),
            bn=str(s.bn),
            backbone_kwargs=OmegaConf.to_container(s.backbone_kwargs, resolve=True) if s.get("backbone_kwargs") else None,
        )
        if s.bn == "sync" and self.info.enabled:
            if self.device.type != "cuda":
                raise ValueError("student.bn=sync needs CUDA (SyncBatchNorm is GPU-only); use student.bn=frozen or train")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, poly_lambda(self.iters, float(cfg.optim.poly_power)))
        self.use_amp = bool(cfg.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step = 0
        resumed = self._maybe_resume() if cfg.resume else None
        self.ddp = None
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.csv = None
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.csv = CsvLog(self.out / "metrics.csv", resumed)

    def _build_teacher(self, generator: Optional[Callable]) -> Teacher:
        if generator is None:
            from ..config import generator_kwargs
            from ..generator import build_generator

            m = self.cfg.model
            generator = build_generator(
                str(m.name), m.get("pretrained"), list(self.train_set.class_names), device=str(self.device),
                **generator_kwargs(self.cfg),
            )
        apro = OmegaConf.to_container(self.cfg.target.apro, resolve=True)
        return Teacher(generator, mode=self.mode, apro=apro, num_classes=self.num_classes)

    def _resume_config(self) -> Dict[str, Any]:
        full = OmegaConf.to_container(self.cfg, resolve=True)
        return {k: full.get(k) for k in RESUME_KEYS}

    def _maybe_resume(self) -> Optional[int]:
        folder = latest_checkpoint(self.out / "checkpoints")
        if folder is None:
            if self.info.is_main:
                print(f"resume: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
            return None
        meta = load_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.scaler)
        saved = meta.get("extra", {}).get("config", {})
        changed = sorted(k for k in RESUME_KEYS if k in saved and json.dumps(saved[k], sort_keys=True, default=str)
                         != json.dumps(self._resume_config()[k], sort_keys=True, default=str))
        if changed and self.info.is_main:
            print(f"resume: config keys {changed} differ from checkpoint {folder}; the run will not repeat exactly")
        self.step = int(meta["step"])
        if self.info.is_main:
            print(f"resume: continuing from {folder} at step {self.step}")
        return self.step

    def _loader(self, stop: int) -> DataLoader:
        c = self.cfg
        crops = TrainCrops(
            self.train_set,
            AugmentParams(crop=int(c.crop), base_size=c.augment.base_size, scale=tuple(c.augment.scale), flip=bool(c.augment.flip)),
            seed=int(c.seed),
            offline_dir=c.target.get("offline_dir") if self.mode == "offline" else None,
            num_classes=self.num_classes,
        )
        sampler = StepBatches(self.step, stop, self.global_batch, self.info.rank, self.info.world_size, self.accum)
        workers = int(c.workers)
        return DataLoader(crops, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=2 if workers > 0 else None)

    def _targets(self, batch: Dict[str, torch.Tensor], images: torch.Tensor, valid: torch.Tensor) -> Targets:
        if self.teacher is None:
            return Targets(hard=batch["label"].to(self.device, non_blocking=True))
        return self.teacher(images, valid)

    def _counts(self, micro: List[Dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Global (all processes, all micro-batches) labelled and valid pixel counts."""
        labelled = valid = 0
        for mb in micro:
            v = mb["valid"]
            valid += int(v.sum())
            labelled += int(((mb["label"] != 255) & v).sum()) if "label" in mb else int(v.sum())
        counts = all_reduce_sum(torch.tensor([labelled, valid], dtype=torch.float64, device=self.device), self.info)
        return float(counts[0]), float(counts[1])

    def train_step(self, micro: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """One optimizer step on this process's micro-batches; returns global loss terms."""
        c = self.cfg
        self.model.train()
        n_lab, n_val = self._counts(micro)
        self.optimizer.zero_grad(set_to_none=True)
        logged = torch.zeros(3, dtype=torch.float64, device=self.device)
        net = self.ddp or self.model
        for i, mb in enumerate(micro):
            images = mb["image"].to(self.device, non_blocking=True)
            valid = mb["valid"].to(self.device, non_blocking=True)
            targets = self._targets(mb, images, valid)
            sync = contextlib.nullcontext() if self.ddp is None or i == len(micro) - 1 else self.ddp.no_sync()
            with sync:
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                    logits = net(images)
                sums = loss_sums(logits, targets.hard, targets.soft, valid)
                loss = combine(sums, n_lab, n_val, float(c.target.ce_weight), float(c.target.l1_weight))
                self.scaler.scale(loss * self.info.world_size).backward()
            ce, l1 = sums.ce.detach() / max(n_lab, 1.0), sums.l1.detach() / max(n_val, 1.0)
            logged += torch.stack([loss.detach(), ce, l1]).double()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        all_reduce_sum(logged, self.info)
        return {"loss": float(logged[0]), "loss_ce": float(logged[1]), "loss_l1": float(logged[2])}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """mIoU of the student on the val split (images sharded over processes, matrices summed)."""
        assert self.val_set is not None
        self.model.eval()
        cm = ConfusionMatrix(self.num_classes, ignore_index=getattr(self.val_set, "ignore_index", 255))
        limit = self.cfg.eval.get("limit")
        n = len(self.val_set) if limit is None else min(len(self.val_set), int(limit))
        for i in range(self.info.rank, n, self.info.world_size):
            sample = self.val_set[i]
            if sample.label is None:
                raise ValueError(f"val image {sample.name!r} has no label; set eval.interval=0 to train without evaluation")
            x = torch.from_numpy(sample.image).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                pred = self.model(x).argmax(dim=1)[0]
            cm.update(pred.cpu(), sample.label)
        total = all_reduce_sum(torch.from_numpy(cm.matrix).to(self.device), self.info)
        cm.matrix = total.cpu().numpy()
        self.model.train()
        return cm.compute()

    def _checkpoint(self) -> None:
        if self.info.is_main:
            save_checkpoint(
                self.out / "checkpoints", self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                keep=int(self.cfg.checkpoint.keep), extra={"config": self._resume_config()},
            )
        barrier(self.info)

    def run(self, until: Optional[int] = None) -> List[float]:
        """Train to cfg.iters (or stop after step `until`, checkpointing there); returns this call's losses."""
        c = self.cfg
        stop = self.iters if until is None else min(int(until), self.iters)
        losses: List[float] = []
        if stop <= self.step:
            return losses
        batches = iter(self._loader(stop))
        bar = tqdm(total=self.iters, initial=self.step, desc="train", unit="it", disable=not self.info.is_main, dynamic_ncols=True)
        log_every, eval_every, ckpt_every = int(c.log_interval), int(c.eval.interval), int(c.checkpoint.interval)
        tick, tick_step = time.perf_counter(), self.step
        while self.step < stop:
            micro = [next(batches) for _ in range(self.accum)]
            lr = self.optimizer.param_groups[0]["lr"]
            terms = self.train_step(micro)
            self.step += 1
            losses.append(terms["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}")
            if self.csv is not None and (self.step % log_every == 0 or self.step == self.iters):
                now = time.perf_counter()
                speed = (self.step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, self.step
                self.csv.write(step=self.step, lr=f"{lr:.6g}", it_per_s=f"{speed:.4g}",
                               **{k: f"{v:.6g}" for k, v in terms.items()})
            if self.val_set is not None and eval_every > 0 and (self.step % eval_every == 0 or self.step == self.iters):
                metrics = self.evaluate()
                if self.csv is not None:
                    self.csv.write(step=self.step, mIoU=f"{metrics['mIoU']:.6g}", aAcc=f"{metrics['aAcc']:.6g}")
                    bar.write(f"step {self.step}: val mIoU {100 * metrics['mIoU']:.2f}%  aAcc {100 * metrics['aAcc']:.2f}%")
            if (ckpt_every > 0 and self.step % ckpt_every == 0) or self.step == stop:
                self._checkpoint()
        bar.close()
        if self.step == self.iters and self.info.is_main:
            save_model(self.model, self.out / "model.safetensors")
        barrier(self.info)
        return losses
