"""MaskCLIP+ trainer: recipes, learning, exact resume, DDP equivalence (2 gloo processes), offline labels, CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskclip_apro.config import compose
from maskclip_apro.data import build_dataset
from maskclip_apro.student.checkpoint import read_state_dict
from maskclip_apro.distributed import DistInfo
from maskclip_apro.student.trainer import Trainer, find_latest_run, per_dataset, poly_lambda

ROOT = Path(__file__).resolve().parents[1]


class StubGenerator:
    """Deterministic stand-in for CLIP: class scores from patch-averaged colours (patch 8), and a
    text classifier of random unit rows for the student's text head."""

    def __init__(self, num_classes: int = 5, dim: int = 8):
        from maskclip_apro.generator.text import TextClassifier

        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(num_classes, 3, generator=g) * 4
        rows = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
        self.classifier = TextClassifier(rows, torch.arange(num_classes), num_classes)

    def __call__(self, images: torch.Tensor):
        pooled = F.avg_pool2d(images, 8, ceil_mode=True)
        logits = torch.einsum("kc,bchw->bkhw", self.weight, pooled)
        return SimpleNamespace(logits=logits, keys=None, features=None, image=images)


def make_cfg(out: Path, *overrides: str):
    base = [
        "dataset=synthetic", "dataset.num_images=6", "student=tiny", "model=tiny_vit", "crop=32", "batch_size=4",
        "iters=6", "workers=0", "eval.interval=0", "log_interval=1", "checkpoint.interval=0", "device=cpu",
        "refine=none", f"output_dir={out}", "optim.name=adamw", "optim.lr=1e-3", "optim.min_lr=0",
    ]
    return compose("train", base + list(overrides))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


MASKCLIP_PLUS = {
    "student": {"backbone": "resnet50c", "pretrained": True, "bn": "sync", "head": "text", "channels": None,
                "dilations": [6, 12, 18, 24], "backbone_kwargs": {}},
    "batch_size": 16,
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "betas": [0.9, 0.999], "weight_decay": 5e-4,
              "poly_power": 0.9, "min_lr": 1e-4},
    "augment": {"img_scale": None, "scale": [0.5, 2.0], "cat_max_ratio": 0.75, "flip": True, "photometric": True},
    "iters": None, "crop": None, "train_split": None,
    "per_dataset": {"voc": {"iters": 2000, "crop": 512, "train_split": "train_aug"},
                    "context": {"iters": 4000, "crop": 480}, "cocostuff": {"iters": 8000, "crop": 512}},
}
APRO_PAPER = {
    **MASKCLIP_PLUS,
    "student": {"backbone": "resnet101", "pretrained": True, "bn": "sync", "head": "aspp",
                "dilations": [6, 12, 18, 24], "backbone_kwargs": {}},
    "batch_size": 32,
    "optim": {"name": "adamw", "lr": 1e-4, "momentum": 0.9, "betas": [0.9, 0.999], "weight_decay": 0.05,
              "poly_power": 0.9, "min_lr": 0.0},
}


@pytest.mark.parametrize("recipe,expected", [("maskclip_plus", MASKCLIP_PLUS), ("apro_paper", APRO_PAPER)])
def test_recipes_compose_to_their_sources_values(recipe, expected):
    from omegaconf import OmegaConf

    cfg = compose("train", [f"student={recipe}"])
    got = OmegaConf.to_container(cfg, resolve=False)
    assert {k: got[k] for k in expected} == expected
    assert (cfg.target.gp_weight, cfg.target.lp_weight, cfg.target.ce_weight) == (2.0, 1.0, 1.0)
    assert cfg.target.ignore_gt_void == "auto" and list(cfg.refine.steps) == ["apro"]
    for dataset, iters, crop, split in (("voc20", 2000, 512, "train_aug"), ("voc21", 2000, 512, "train_aug"),
                                        ("context59", 4000, 480, "train"), ("cocostuff171", 8000, 512, "train")):
        c = compose("train", [f"student={recipe}", f"dataset={dataset}"])
        assert (per_dataset(c, "iters"), per_dataset(c, "crop"), per_dataset(c, "train_split", "train")) == (iters, crop, split)
    c = compose("train", [f"student={recipe}", "dataset=context59", "crop=320", "iters=7"])
    assert (per_dataset(c, "crop"), per_dataset(c, "iters")) == (320, 7)
    with pytest.raises(ValueError, match="iters is not set .* dataset 'synthetic'.*pass iters="):
        per_dataset(compose("train", [f"student={recipe}", "dataset=synthetic"]), "iters")


def test_tiny_follows_maskclip_plus():
    tiny, full = compose("train", ["student=tiny"]), compose("train", ["student=maskclip_plus"])
    assert (tiny.student.head, tiny.student.bn, tiny.augment, tiny.optim, tiny.per_dataset) == (
        full.student.head, full.student.bn, full.augment, full.optim, full.per_dataset)
    assert tiny.student.backbone_kwargs.stem_type == "deep" and (tiny.crop, tiny.batch_size) == (64, 4)


def test_poly_schedule_ends_at_min_lr():
    f = poly_lambda(100, 0.9, 0.01, 1e-4)
    for step in (0, 37, 100):
        assert 0.01 * f(step) == pytest.approx((0.01 - 1e-4) * (1 - step / 100) ** 0.9 + 1e-4)
    assert 0.01 * f(100) == pytest.approx(1e-4)


@pytest.mark.parametrize("refine", ["none", "apro"])
def test_steps_lower_the_loss_on_a_fixed_batch(tmp_path, refine):
    cfg = make_cfg(tmp_path, f"refine={refine}", "optim.lr=3e-3", "augment.photometric=false")
    trainer = Trainer(cfg, generator=StubGenerator(), info=DistInfo())
    batch = [next(iter(trainer._loader(1)))]
    losses = [trainer.train_step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    """Interrupt + resume = uninterrupted, bit for bit: photometric distortion, cat_max_ratio, void
    masking and trainable BatchNorm on."""
    extra = ("optim.name=sgd", "optim.lr=1e-2", "checkpoint.interval=2", "target.ignore_gt_void=true")
    full = Trainer(make_cfg(tmp_path / "a", *extra), generator=StubGenerator(), info=DistInfo())
    reference = full.run()
    assert len(reference) == 6

    first = Trainer(make_cfg(tmp_path / "b", *extra), generator=StubGenerator(), info=DistInfo())
    head = first.run(until=3)
    assert json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["step"] == 3
    resumed = Trainer(make_cfg(tmp_path / "b", *extra, "resume=true"), generator=StubGenerator(), info=DistInfo())
    assert resumed.step == 3
    tail = resumed.run()
    assert head + tail == reference  # bit-for-bit on CPU
    a = read_state_dict(str(tmp_path / "a/model.safetensors"))
    b = read_state_dict(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with (tmp_path / "b/metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_architecture_fails_clearly(tmp_path):
    Trainer(make_cfg(tmp_path, "iters=1"), generator=StubGenerator(), info=DistInfo()).run()
    cfg = make_cfg(tmp_path, "iters=1", "resume=true", "student.backbone_kwargs.channels=[8,16,32,32]")
    with pytest.raises(ValueError, match=r"does not match the student architecture.*shape mismatch: backbone.layer4"):
        Trainer(cfg, generator=StubGenerator(), info=DistInfo())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# SGD: linear in the gradient, so summation-order rounding stays small (Adam would amplify it where
# a gradient is near zero); frozen BN: trainable BN sees each process's half batch.
DDP_SETTINGS = ("iters=3", "student.bn=frozen", "optim.name=sgd", "optim.lr=1e-2")


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from maskclip_apro.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    try:
        losses = Trainer(make_cfg(Path(out), *DDP_SETTINGS), generator=StubGenerator(), info=info).run()
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in Trainer(
            make_cfg(Path(out) / "sync", "iters=1", "student.bn=sync"), generator=StubGenerator(), info=info).model.modules())
        if rank == 0:
            Path(out, "losses.json").write_text(json.dumps(losses))
    finally:
        shutdown(info)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    """One step per global batch whatever the world size (on gloo, bn=sync stays plain BatchNorm)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the thread count alone changes float rounding
    try:
        reference = Trainer(make_cfg(tmp_path / "one", *DDP_SETTINGS), generator=StubGenerator(), info=DistInfo()).run()
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    losses = json.loads((tmp_path / "two/losses.json").read_text())
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
    a = read_state_dict(str(tmp_path / "one/model.safetensors"))
    b = read_state_dict(str(tmp_path / "two/model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def _write_labels(folder: Path, value=None) -> list[str]:
    ds = build_dataset("synthetic", split="train", num_images=6)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(len(ds)):
        s = ds[i]
        label = s.label if value is None else np.full_like(s.label, value)
        Image.fromarray(label).save(folder / f"{s.name}.png")
        names.append(s.name)
    return names


def test_offline_pseudo_labels(tmp_path):
    labels = tmp_path / "labels"
    names = _write_labels(labels)
    cfg = make_cfg(tmp_path / "run", f"target.offline_dir={labels}", "iters=2")
    assert len(Trainer(cfg, generator=StubGenerator(), info=DistInfo()).run()) == 2
    plain = make_cfg(tmp_path / "run1", f"target.offline_dir={labels}", "iters=1", "student.head=aspp")
    assert Trainer(plain, info=DistInfo()).teacher is None  # no CLIP at all: labels from files, K-way head

    (labels / f"{names[0]}.png").unlink()
    (labels / f"{names[1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{names[0]}.png|{names[1]}.png"):
        Trainer(make_cfg(tmp_path / "run2", f"target.offline_dir={labels}", "iters=2"),
                generator=StubGenerator(), info=DistInfo()).run()

    _write_labels(labels, value=9)
    with pytest.raises(ValueError, match=r"value 9 outside the class range \[0, 5\)"):
        Trainer(make_cfg(tmp_path / "run3", f"target.offline_dir={labels}", "iters=1"),
                generator=StubGenerator(), info=DistInfo()).run()
    with pytest.raises(ValueError, match="target.ignore_gt_void must be auto, true or false, got 'maybe'"):
        Trainer(make_cfg(tmp_path / "run4", "target.ignore_gt_void=maybe"), generator=StubGenerator(), info=DistInfo())
    with pytest.raises(ValueError, match="resume must be false, true or latest, got 'sometimes'"):
        Trainer(make_cfg(tmp_path / "run5", "resume=sometimes"), generator=StubGenerator(), info=DistInfo())


def test_train_command_end_to_end(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable, str(ROOT / "scripts/train.py"), "dataset=synthetic", "model=tiny_vit", "student=tiny",
        "iters=2", "crop=32", "batch_size=2", "eval.interval=2", "eval.limit=2", "workers=0",
        f"generator.cache_dir={tmp_path / 'cache'}", f"output_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints/latest.json").is_file()
    assert f"trained 2 steps: student weights -> {out / 'model.safetensors'}" in proc.stdout
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "2"] and rows[1]["mIoU"] != ""
    assert float(rows[0]["loss_l1"]) > 0  # refine=apro (the default) adds the L1 terms


def test_gradient_accumulation_matches_one_micro_batch(tmp_path):
    one = Trainer(make_cfg(tmp_path / "one", "iters=2", "student.bn=frozen"), generator=StubGenerator(), info=DistInfo()).run()
    two = Trainer(make_cfg(tmp_path / "two", "iters=2", "accum=2", "student.bn=frozen"), generator=StubGenerator(),
                  info=DistInfo()).run()
    np.testing.assert_allclose(two, one, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        Trainer(make_cfg(tmp_path / "bad", "accum=3"), generator=StubGenerator(), info=DistInfo())


def test_ignore_gt_void_is_never_trained_on(tmp_path):
    """Hard targets are 255 and the L1 mask is off exactly where the crop's ground truth is void."""
    trainer = Trainer(make_cfg(tmp_path, "refine=apro", "target.ignore_gt_void=true", "crop=48"),
                      generator=StubGenerator(), info=DistInfo())
    assert trainer.ignore_gt_void
    mb = next(iter(trainer._loader(1)))
    void = mb["label"] == 255
    assert void.any() and (void & mb["valid"]).any()
    targets = trainer._targets(mb, mb["image"], mb["valid"])
    assert torch.equal(targets.hard == 255, void | ~mb["valid"])
    assert torch.equal(trainer._mask(mb), mb["valid"] & ~void) and len(targets.soft) == 2
    auto = Trainer(make_cfg(tmp_path / "auto"), generator=StubGenerator(), info=DistInfo())
    assert not auto.ignore_gt_void  # synthetic has a background class
    assert "label" not in next(iter(auto._loader(1)))


def test_ignore_gt_void_auto_follows_the_background_class(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ds = build_dataset("synthetic", split="train", num_images=2)
    for i in range(2):
        Image.fromarray(ds[i].image).save(root / "images" / f"im{i}.png")
        void = (ds[i].label == 0) | (ds[i].label == 255)  # background and the ignored seams
        Image.fromarray(np.where(void, 255, ds[i].label - 1).astype(np.uint8)).save(root / "labels" / f"im{i}.png")
    (root / "classes.txt").write_text("ball\nbox\nkite\nring\n")
    cfg = compose("train", ["dataset=folder", f"dataset.root={root}", "student=tiny", "crop=32", "batch_size=2", "iters=1",
                            "workers=0", "eval.interval=0", "device=cpu", "refine=none", f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, generator=StubGenerator(num_classes=4), info=DistInfo())
    assert trainer.ignore_gt_void and len(trainer.run()) == 1


def test_resume_latest_finds_the_newest_run_of_the_same_config(tmp_path, capsys):
    root = tmp_path / "runs"
    same = Trainer(make_cfg(root / "a", "checkpoint.interval=1"), generator=StubGenerator(), info=DistInfo())
    same.run(until=2)
    other = Trainer(make_cfg(root / "b", "seed=1", "checkpoint.interval=1"), generator=StubGenerator(), info=DistInfo())
    other.run(until=3)  # newer, but another seed
    capsys.readouterr()
    resumed = Trainer(make_cfg(root / "new", "resume=latest"), generator=StubGenerator(), info=DistInfo())
    out = capsys.readouterr().out
    assert resumed.out == root / "a" and resumed.step == 2
    assert f"newest run of this config under {root} is {root / 'a'}" in out and "continuing from" in out
    assert find_latest_run(root, {"seed": 7})[0] is None
    fresh = Trainer(make_cfg(root / "c", "resume=latest", "seed=2"), generator=StubGenerator(), info=DistInfo())
    assert fresh.out == root / "c" and fresh.step == 0
    message = capsys.readouterr().out
    assert f"none of the 2 runs under {root}" in message and f"the newest, {root / 'b'}, differs in ['seed']" in message


@pytest.mark.parametrize("recipe", ["maskclip_plus", "apro_paper"])
def test_recipe_smoke_run(tmp_path, recipe):
    """Both full recipes with a ResNet-18 trunk on the synthetic set: train, evaluate, checkpoint."""
    from maskclip_apro.cli.train import run

    cfg = compose("train", [
        "dataset=synthetic", "dataset.num_images=4", "model=tiny_vit", f"student={recipe}", "student.backbone=resnet18",
        "student.pretrained=false", "crop=64", "batch_size=2", "iters=4", "workers=0", "device=cpu", "eval.limit=2",
        f"generator.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
    ])
    losses = run(cfg)
    assert len(losses) == 4 and all(np.isfinite(losses))
    with (tmp_path / "out/metrics.csv").open() as f:
        assert any(r["mIoU"] for r in csv.DictReader(f))
    state = read_state_dict(str(tmp_path / "out/model.safetensors"))
    assert ("classifier.embeddings" in state) == (recipe == "maskclip_plus")


def test_a_checkpoint_pointer_only_names_a_checkpoint_of_its_run(tmp_path):
    from maskclip_apro.student.checkpoint import latest_checkpoint

    root = tmp_path / "run" / "checkpoints"
    other = tmp_path / "other" / "checkpoints" / "step_00000005"
    other.mkdir(parents=True)
    (other / "train_state.json").write_text("{}")
    root.mkdir(parents=True)
    (root / "step_00000005").symlink_to(other, target_is_directory=True)
    for name in ("../../other/checkpoints/step_00000005", str(other), "step_00000005"):
        (root / "latest.json").write_text(json.dumps({"step": 5, "dir": name}))
        with pytest.raises(ValueError, match=f"names {re.escape(repr(name))}, not a checkpoint folder .*refusing"):
            latest_checkpoint(root)


def test_train_interruption_validation_notice_and_workers(tmp_path, monkeypatch, capsys):
    from maskclip_apro.config import hydra_app
    from maskclip_apro.student import trainer as trainer_module

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for name in "ab":
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8)).save(root / "labels" / f"{name}.png")
    (root / "classes.txt").write_text("background\ncat\ngrass\n")
    cfg = compose("train", [
        "dataset=folder", f"dataset.root={root}", "student=tiny", "model=tiny_vit", "crop=32", "batch_size=2",
        "iters=4", "workers=0", "eval.interval=5", "eval.limit=1", "log_interval=1", "checkpoint.interval=2",
        "device=cpu", "refine=none", f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, generator=StubGenerator(3))
    assert "notice: dataset 'folder' gives the same 2 images for train_split='train' and val_split='val'" in (
        capsys.readouterr().out)
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        lambda self, micro: (_ for _ in ()).throw(KeyboardInterrupt) if self.step == 3 else real(self, micro))
    with pytest.raises(KeyboardInterrupt) as interrupt:
        trainer.run()
    message = str(interrupt.value)
    assert message == (f"the last checkpoint is step 2 in {tmp_path / 'run' / 'checkpoints'}; the 1 step(s) since it "
                       f"are lost (checkpoint.interval=2); continue with output_dir={tmp_path / 'run'} resume=true")

    def stopped(cfg):
        raise KeyboardInterrupt(message)

    monkeypatch.setattr(sys, "argv", ["train", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exited:
        hydra_app("train", stopped)()
    assert exited.value.code == 130 and f"train interrupted (Ctrl-C); {message}" in capsys.readouterr().err

    assert compose("train").workers is None
    monkeypatch.setattr(trainer_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert trainer_module.default_workers(None) == 2 and trainer_module.default_workers(3) == 3
