"""MaskCLIP+ trainer: learning, exact resume, DDP equivalence (2 gloo processes), offline labels, CLI."""

from __future__ import annotations

import csv
import json
import os
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
from maskclip_apro.student.distributed import DistInfo
from maskclip_apro.student.trainer import Trainer, default_iters

ROOT = Path(__file__).resolve().parents[1]


class StubGenerator:
    """Deterministic stand-in for CLIP: class scores from patch-averaged colours (patch 8)."""

    def __init__(self, num_classes: int = 5):
        self.weight = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(0)) * 4

    def __call__(self, images: torch.Tensor):
        pooled = F.avg_pool2d(images, 8, ceil_mode=True)
        return SimpleNamespace(logits=torch.einsum("kc,bchw->bkhw", self.weight, pooled), image=images)


def make_cfg(out: Path, *overrides: str):
    base = [
        "dataset=synthetic", "dataset.num_images=6", "student=tiny", "model=tiny_vit", "crop=32", "batch_size=4",
        "iters=6", "workers=0", "eval.interval=0", "log_interval=1", "checkpoint.interval=0", "device=cpu",
        "target.mode=none", f"output_dir={out}", "optim.name=adamw", "optim.lr=1e-3",
    ]
    return compose("train", base + list(overrides))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_default_iters():
    assert (default_iters("voc21"), default_iters("context59"), default_iters("cocostuff171")) == (2000, 4000, 8000)
    with pytest.raises(ValueError, match="iters=N"):
        default_iters("synthetic")


@pytest.mark.parametrize("mode", ["none", "gp_lp_parallel"])
def test_steps_lower_the_loss_on_a_fixed_batch(tmp_path, mode):
    cfg = make_cfg(tmp_path, f"target.mode={mode}", "target.apro.iters=3", "target.apro.backend=torch", "optim.lr=3e-3")
    trainer = Trainer(cfg, generator=StubGenerator(), info=DistInfo())
    batch = [next(iter(trainer._loader(1)))]
    losses = [trainer.train_step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    extra = ("optim.name=sgd", "optim.lr=1e-2", "checkpoint.interval=2")
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


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from maskclip_apro.student.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    try:
        losses = Trainer(make_cfg(Path(out), "iters=3"), generator=StubGenerator(), info=info).run()
        if rank == 0:
            Path(out, "losses.json").write_text(json.dumps(losses))
    finally:
        shutdown(info)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    single = Trainer(make_cfg(tmp_path / "one", "iters=3"), generator=StubGenerator(), info=DistInfo())
    reference = single.run()
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
    cfg = make_cfg(tmp_path / "run", "target.mode=offline", f"target.offline_dir={labels}", "iters=2")
    assert len(Trainer(cfg, info=DistInfo()).run()) == 2

    (labels / f"{names[0]}.png").unlink()
    (labels / f"{names[1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{names[0]}.png|{names[1]}.png"):
        Trainer(make_cfg(tmp_path / "run2", "target.mode=offline", f"target.offline_dir={labels}", "iters=2"),
                info=DistInfo()).run()

    _write_labels(labels, value=9)
    with pytest.raises(ValueError, match=r"value 9 outside the class range \[0, 5\)"):
        Trainer(make_cfg(tmp_path / "run3", "target.mode=offline", f"target.offline_dir={labels}", "iters=1"),
                info=DistInfo()).run()
    with pytest.raises(ValueError, match="offline_dir"):
        Trainer(make_cfg(tmp_path / "run4", "target.mode=offline"), info=DistInfo())
    with pytest.raises(ValueError, match="target.mode must be one of"):
        Trainer(make_cfg(tmp_path / "run5", "target.mode=gp"), info=DistInfo())


def test_train_command_end_to_end(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable, str(ROOT / "scripts/train.py"), "dataset=synthetic", "model=tiny_vit", "student=tiny",
        "iters=2", "crop=32", "batch_size=2", "eval.interval=2", "eval.limit=2", "workers=0",
        "target.apro.iters=3", f"generator.cache_dir={tmp_path / 'cache'}", f"output_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints/latest.json").is_file()
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "2"] and rows[1]["mIoU"] != ""
    assert float(rows[0]["loss_l1"]) > 0  # gp_lp_parallel (the default) adds the L1 terms


def test_gradient_accumulation_matches_one_micro_batch(tmp_path):
    one = Trainer(make_cfg(tmp_path / "one", "iters=2"), generator=StubGenerator(), info=DistInfo()).run()
    two = Trainer(make_cfg(tmp_path / "two", "iters=2", "accum=2"), generator=StubGenerator(), info=DistInfo()).run()
    np.testing.assert_allclose(two, one, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        Trainer(make_cfg(tmp_path / "bad", "accum=3"), generator=StubGenerator(), info=DistInfo())
