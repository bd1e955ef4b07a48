"""MaskCLIP+ training loop: DeepLabv2 student on (APro-refined) teacher pseudo labels.

One step = one global batch of `batch_size` crops split over W processes (torchrun/DDP) and
`accum` micro-batches. Loss means use pixel counts of the whole global batch (summed over
processes), and the per-process loss is scaled by W to undo DDP's gradient averaging, so a step
is the same for any W (with frozen BatchNorm; trainable BatchNorm sees each process's
micro-batch unless it is synchronised). Data order and augmentation derive from (seed, position)
(see data.py); with the checkpointed model/optimizer/scheduler/scaler state a resumed run repeats
the loss sequence of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..constants import IGNORE_INDEX, IMAGENET_MEAN
from ..data import build_dataset
from ..data.base import check_class_count
from ..distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed, shard
from ..evaluation import ConfusionMatrix
from ..writing import write_text
from .augment import AugmentParams
from .checkpoint import LATEST, STATE_JSON, latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .data import StepBatches, TrainCrops
from .deeplabv2 import DeepLabV2, sync_batchnorm
from .inference import predict
from .losses import combine, loss_sums
from .teacher import Targets, Teacher

OPTIMIZERS = ("sgd", "adamw")
CSV_FIELDS = ("step", "loss", "loss_ce", "loss_l1", "lr", "it_per_s", "mIoU", "aAcc")
# Config keys that must not change when resuming (they change the loss sequence).
RESUME_KEYS = ("seed", "batch_size", "crop", "accum", "iters", "train_split", "dataset", "student", "target",
               "refine", "augment", "optim", "loss")


def per_dataset(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """cfg[key], or when it is null the recipe's per_dataset entry for the dataset's family (the
    longest name prefix that matches), or `default`; ValueError when none applies."""
    value = cfg.get(key)
    if value is not None:
        return value
    name = str(cfg.dataset.name)
    table = cfg.get("per_dataset") or {}
    families = sorted((f for f in table if name.startswith(str(f))), key=len, reverse=True)
    for family in families:
        if table[family].get(key) is not None:
            return table[family][key]
    if default is not None:
        return default
    raise ValueError(
        f"{key} is not set and the recipe's per_dataset table has no {key} for dataset {name!r} "
        f"(families: {sorted(table)}); pass {key}=..."
    )


def resolve_recipe(cfg: DictConfig) -> DictConfig:
    """A copy of cfg with iters, crop and train_split filled in from the recipe's per_dataset table."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.iters = int(per_dataset(cfg, "iters"))
        cfg.crop = int(per_dataset(cfg, "crop"))
        cfg.train_split = str(per_dataset(cfg, "train_split", default="train"))
    if cfg.iters < 1:
        raise ValueError(f"iters must be >= 1, got {cfg.iters}")
    return cfg


def default_workers(workers: Any) -> int:
    """DataLoader workers: the given count, or for null min(4, the CPU cores this process may use)."""
    if workers is not None:
        return int(workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return min(4, cores)


def poly_lambda(iters: int, power: float, lr: float, min_lr: float = 0.0) -> Callable[[int], float]:
    """lr factor of mmcv's poly policy: lr(step) = (lr − min_lr)·(1 − step / iters)^power + min_lr."""
    if lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {lr}")
    return lambda step: ((lr - min_lr) * max(0.0, 1.0 - step / iters) ** power + min_lr) / lr


def build_optimizer(params, cfg: DictConfig) -> torch.optim.Optimizer:
    name = str(cfg.name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")


def resume_config(cfg: DictConfig) -> Dict[str, Any]:
    """The values of RESUME_KEYS, resolved (what a checkpoint records and a resume compares)."""
    full = OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps({k: full.get(k) for k in RESUME_KEYS}, default=str))


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """RESUME_KEYS whose values differ between a checkpoint's config and the current one."""
    return sorted(k for k in RESUME_KEYS if k in saved and json.dumps(saved[k], sort_keys=True)
                  != json.dumps(current.get(k), sort_keys=True))


def saved_config(run: Path) -> Dict[str, Any]:
    """The config recorded by the newest checkpoint of a run folder ({} when unreadable)."""
    try:
        folder = latest_checkpoint(Path(run) / "checkpoints")
        if folder is None:
            return {}
        return json.loads((folder / STATE_JSON).read_text()).get("extra", {}).get("config", {})
    except (OSError, ValueError):
        return {}


def find_latest_run(root: Path, current: Dict[str, Any]) -> Tuple[Optional[Path], str]:
    """The run folder under `root` with the most recent checkpoint whose config equals `current`,
    and a line saying what was found."""
    root = Path(root)
    runs = [p for p in root.iterdir() if (p / "checkpoints" / LATEST).is_file()] if root.is_dir() else []
    runs.sort(key=lambda p: (p / "checkpoints" / LATEST).stat().st_mtime, reverse=True)
    for run in runs:
        saved = saved_config(run)
        if saved and not config_differences(saved, current):
            return run, f"resume=latest: newest run of this config under {root} is {run}"
    if runs:
        diff = config_differences(saved_config(runs[0]), current)
        return None, (f"resume=latest: none of the {len(runs)} runs under {root} has this config "
                      f"(the newest, {runs[0]}, differs in {diff}); starting a new run")
    return None, f"resume=latest: no run with checkpoints under {root}; starting a new run"


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
        write_text(self.path, buffer.getvalue())

    def write(self, **row: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})


class Trainer:
    """Build everything from a composed conf/train.yaml config; `run()` trains.

    generator: a ready teacher generator (tests); by default it is built from the config
    (maskclip_apro.config.build_generator_from_config). The text head takes its classifier rows
    from the generator's text classifier.
    """

    def __init__(self, cfg: DictConfig, generator: Optional[Callable] = None, info: Optional[DistInfo] = None):
        self.info = info or init_distributed(str(cfg.device))
        self.device = self.info.device
        self.cfg = cfg = resolve_recipe(cfg)
        self.iters = int(cfg.iters)
        self.accum = int(cfg.accum)
        self.global_batch = int(cfg.batch_size)
        StepBatches(0, 0, self.global_batch, 0, self.info.world_size, self.accum)  # validates the split
        if cfg.resume not in (False, True, "latest"):
            raise ValueError(f"resume must be false, true or latest, got {cfg.resume!r}")
        spec = OmegaConf.to_container(cfg.dataset, resolve=True)
        self.train_set = build_dataset(**{**spec, "split": cfg.train_split})
        check_class_count(self.train_set.class_names, f"dataset {cfg.dataset.name!r}")
        self.num_classes = int(self.train_set.num_classes)
        self.val_set = None
        if int(cfg.eval.interval) > 0:
            self.val_set = build_dataset(**{**spec, "split": cfg.val_split})
            if len(self.val_set) == 0 or self.val_set[0].label is None:
                raise ValueError(
                    f"val split {cfg.val_split!r} of dataset {cfg.dataset.name!r} has no labels; set eval.interval=0"
                )
            self._notice_same_images()
        self.ignore_gt_void = self._resolve_ignore_gt_void()
        self.offline = bool(cfg.target.get("offline_dir"))
        self.avg_non_ignore = cfg.get("loss", {}).get("avg_non_ignore", False)
        if not isinstance(self.avg_non_ignore, bool):
            raise ValueError(f"loss.avg_non_ignore must be true or false, got {self.avg_non_ignore!r}")
        head = str(cfg.student.get("head", "aspp"))
        if not self.offline or head == "text":
            generator = generator if generator is not None else self._build_generator()
        self.teacher = None if self.offline else self._build_teacher(generator)

        torch.manual_seed(int(cfg.seed))  # the student's random initialisation
        s = cfg.student
        self.model = DeepLabV2(
            self.num_classes,
            backbone=str(s.backbone),
            pretrained=s.pretrained,
            dilations=tuple(s.dilations),
            bn=str(s.bn),
            backbone_kwargs=OmegaConf.to_container(s.backbone_kwargs, resolve=True) if s.get("backbone_kwargs") else None,
            head=head,
            channels=s.get("channels"),
            text=getattr(generator, "classifier", None) if head == "text" else None,
        )
        self.model = sync_batchnorm(self.model, self.info.world_size, self.device).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        o = cfg.optim
        lam = poly_lambda(self.iters, float(o.poly_power), float(o.lr), float(o.get("min_lr") or 0.0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        self.use_amp = bool(cfg.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step = 0
        self.saved_step = 0  # the step of the newest checkpoint (0: none)
        self.out = Path(broadcast_object(str(self._output_dir()), self.info))
        resumed = self._maybe_resume() if cfg.resume else None
        self.ddp = None
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.csv = None
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.csv = CsvLog(self.out / "metrics.csv", resumed)

    def _notice_same_images(self) -> None:
        """Say so when validation runs on the training images (a folder dataset without split files)."""
        names = [self.train_set.source(i).name for i in range(len(self.train_set))]
        if self.info.is_main and names == [self.val_set.source(i).name for i in range(len(self.val_set))]:
            print(f"notice: dataset {self.cfg.dataset.name!r} gives the same {len(names)} images for train_split="
                  f"{self.cfg.train_split!r} and val_split={self.cfg.val_split!r} (no split files): the val mIoU is "
                  "measured on the training images")

    def _resolve_ignore_gt_void(self) -> bool:
        """target.ignore_gt_void: auto = on for a dataset without a background class whose training
        images carry ground truth (voc20, context59, cocostuff171: its 255 pixels belong to no class)."""
        value = self.cfg.target.get("ignore_gt_void", "auto")
        if value == "auto":
            return not self.train_set.has_background and self.train_set[0].label is not None
        if not isinstance(value, bool):
            raise ValueError(f"target.ignore_gt_void must be auto, true or false, got {value!r}")
        return value

    def _build_generator(self) -> Any:
        from ..config import build_generator_from_config

        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            cfg.device = str(self.device)
        return build_generator_from_config(cfg, list(self.train_set.class_names))

    def _build_teacher(self, generator: Callable) -> Teacher:
        from ..config import refine_params, refine_steps
        from ..refiners import Chain

        t = self.cfg.target
        chain = Chain.from_steps(refine_steps(self.cfg), refine_params(self.cfg))
        return Teacher(generator, chain, num_classes=self.num_classes, gp_weight=float(t.gp_weight),
                       lp_weight=float(t.lp_weight), padded=str(t.get("padded", "crop")))

    def _output_dir(self) -> Path:
        """output_dir, or with resume=latest the newest run of the same config next to it."""
        out = Path(str(self.cfg.output_dir))
        if self.cfg.resume != "latest" or not self.info.is_main:
            return out
        run, message = find_latest_run(out.parent, resume_config(self.cfg))
        print(message)
        return run if run is not None else out

    def _maybe_resume(self) -> Optional[int]:
        folder = latest_checkpoint(self.out / "checkpoints")
        if folder is None:
            if self.info.is_main:
                print(f"resume: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
            return None
        meta = load_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.scaler)
        changed = config_differences(meta.get("extra", {}).get("config", {}), resume_config(self.cfg))
        if changed and self.info.is_main:
            print(f"resume: config keys {changed} differ from checkpoint {folder}; the run will not repeat exactly")
        self.step = self.saved_step = int(meta["step"])
        if self.info.is_main:
            print(f"resume: continuing from {folder} at step {self.step}")
        return self.step

    def _loader(self, stop: int) -> DataLoader:
        c = self.cfg
        a = c.augment
        img_scale = a.get("img_scale") or self.train_set.img_scale
        crops = TrainCrops(
            self.train_set,
            AugmentParams(
                crop=int(c.crop), img_scale=tuple(img_scale) if img_scale else None, scale=tuple(a.scale),
                cat_max_ratio=float(a.cat_max_ratio), flip=bool(a.flip), photometric=bool(a.photometric),
                pad_value=IMAGENET_MEAN,
            ),
            seed=int(c.seed),
            offline_dir=c.target.get("offline_dir") if self.offline else None,
            num_classes=self.num_classes,
            ignore_gt_void=self.ignore_gt_void,
        )
        sampler = StepBatches(self.step, stop, self.global_batch, self.info.rank, self.info.world_size, self.accum)
        workers = default_workers(c.get("workers"))
        return DataLoader(crops, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=2 if workers > 0 else None)

    @staticmethod
    def _mask(mb: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Pixels the losses see: inside the image and not the ignore index in the crop's label (if any)."""
        return mb["valid"] & (mb["label"] != IGNORE_INDEX) if "label" in mb else mb["valid"]

    def _targets(self, mb: Dict[str, torch.Tensor], images: torch.Tensor, valid: torch.Tensor) -> Targets:
        label = mb["label"].to(self.device, non_blocking=True) if "label" in mb else None
        if self.teacher is None:
            return Targets(hard=label)
        targets = self.teacher(images, valid)
        if label is not None:
            targets.hard[label == IGNORE_INDEX] = IGNORE_INDEX
        return targets

    def _counts(self, micro: List[Dict[str, torch.Tensor]]) -> Tuple[float, float]:
        """Global (all processes, all micro-batches) counts: the pixels the losses see, and the pixels
        the cross-entropy is divided by (every crop pixel unless loss.avg_non_ignore)."""
        seen = sum(int(self._mask(mb).sum()) for mb in micro)
        pixels = sum(mb["valid"].numel() for mb in micro)
        counts = all_reduce_sum(torch.tensor([seen, pixels], dtype=torch.float64, device=self.device), self.info)
        seen_all, pixels_all = float(counts[0]), float(counts[1])
        return seen_all, seen_all if self.avg_non_ignore else pixels_all

    def train_step(self, micro: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """One optimizer step on this process's micro-batches; returns global loss terms."""
        self.model.train()
        n, n_ce = self._counts(micro)
        self.optimizer.zero_grad(set_to_none=True)
        logged = torch.zeros(3, dtype=torch.float64, device=self.device)
        net = self.ddp or self.model
        ce_weight = float(self.cfg.target.ce_weight)
        for i, mb in enumerate(micro):
            images = mb["image"].to(self.device, non_blocking=True)
            valid = mb["valid"].to(self.device, non_blocking=True)
            mask = self._mask(mb).to(self.device, non_blocking=True)
            targets = self._targets(mb, images, valid)
            sync = contextlib.nullcontext() if self.ddp is None or i == len(micro) - 1 else self.ddp.no_sync()
            with sync:
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                    logits = net(images)
                sums = loss_sums(logits, targets.hard, targets.soft, targets.weights, mask)
                loss = combine(sums, n_ce, n, ce_weight)
                self.scaler.scale(loss * self.info.world_size).backward()
            ce, l1 = sums.ce.detach() / max(n_ce, 1.0), sums.l1.detach() / max(n, 1.0)
            logged += torch.stack([loss.detach(), ce, l1]).double()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        all_reduce_sum(logged, self.info)
        return {"loss": float(logged[0]), "loss_ce": float(logged[1]), "loss_l1": float(logged[2])}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """mIoU of the student on the val split under the dataset's test protocol (see inference.py);
        images sharded over processes, confusion matrices summed."""
        assert self.val_set is not None
        self.model.eval()
        e = self.cfg.eval
        cm = ConfusionMatrix(self.num_classes, ignore_index=getattr(self.val_set, "ignore_index", IGNORE_INDEX))
        limit = e.get("limit")
        n = len(self.val_set) if limit is None else min(len(self.val_set), int(limit))
        for i in shard(n, self.info):
            sample = self.val_set[i]
            if sample.label is None:
                raise ValueError(f"val image {sample.name!r} has no label; set eval.interval=0 to train without evaluation")
            pred, _ = predict(self.model, sample.image, self.val_set.img_scale, mode=str(e.mode),
                              window=int(e.get("window") or self.cfg.crop), stride=e.get("stride"),
                              device=self.device, amp=self.use_amp)
            cm.update(pred.cpu(), sample.label)
        total = all_reduce_sum(torch.from_numpy(cm.matrix).to(self.device), self.info)
        cm.matrix = total.cpu().numpy()
        self.model.train()
        return cm.compute()

    def _checkpoint(self) -> None:
        if self.info.is_main:
            save_checkpoint(
                self.out / "checkpoints", self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                keep=int(self.cfg.checkpoint.keep), extra={"config": resume_config(self.cfg)},
            )
        barrier(self.info)
        self.saved_step = self.step

    def interrupted(self) -> KeyboardInterrupt:
        """The Ctrl-C of a training run, saying what is kept and how to go on."""
        interval = int(self.cfg.checkpoint.interval)
        lost = f"the {self.step - self.saved_step} step(s) since it are lost (checkpoint.interval={interval})"
        if self.saved_step == 0:
            return KeyboardInterrupt(f"no checkpoint was written yet: the {self.step} step(s) run are lost "
                                     f"(checkpoint.interval={interval})")
        return KeyboardInterrupt(f"the last checkpoint is step {self.saved_step} in {self.out / 'checkpoints'}; "
                                 f"{lost}; continue with output_dir={self.out} resume=true")

    def run(self, until: Optional[int] = None) -> List[float]:
        """Train to cfg.iters (or stop after step `until`, checkpointing there); returns this call's losses."""
        stop = self.iters if until is None else min(int(until), self.iters)
        if stop <= self.step:
            return []
        try:
            return self._run(stop)
        except KeyboardInterrupt:
            raise self.interrupted() from None

    def _run(self, stop: int) -> List[float]:
        c = self.cfg
        losses: List[float] = []
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
            print(f"trained {self.iters} steps: student weights -> {self.out / 'model.safetensors'}")
        barrier(self.info)
        return losses
