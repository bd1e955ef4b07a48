"""The CUDA tier (`pytest -m cuda`; scripts/gpu_check.sh runs it): skipped without a GPU.

Every APro op on every backend on CUDA tensors against the CPU path on the host; the backend="auto"
self-check on this GPU; each command's smoke run with device=cuda (the tiny models and the
synthetic dataset, with the CPU smoke tests' settings); the student's training step; torchrun with
NCCL. The Triton kernels must compile for the GPU: run with TRITON_INTERPRET=0 (tests/conftest.py
turns the interpreter on unless the variable is set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskclip_apro.apro import build_tree, local_propagation, propagate, reweight
from maskclip_apro.config import compose
from maskclip_apro.distributed import DistInfo
from maskclip_apro.kernels import _triton, gp_tree, registry, selfcheck

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda:0")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA tier needs a CUDA GPU; torch finds none"),
]
compiled = pytest.mark.skipif(
    _triton.INTERPRETED, reason="Triton runs under the interpreter: set TRITON_INTERPRET=0 to compile for the GPU"
)


def op_inputs(h: int, w: int, batch: int = 3, k: int = 21):
    """Tie-heavy guides (the self-check's, cut to h x w), softmax unaries and few-level features, on the host."""
    guide = selfcheck.guides(max(h, w))[:, :, :h, :w].repeat(-(-batch // 3), 1, 1, 1)[:batch].contiguous()
    gen = torch.Generator().manual_seed(0)
    unary = torch.softmax(4 * torch.randn(batch, k, h, w, generator=gen), 1)
    features = torch.randint(0, 3, (batch, 4, h, w), generator=gen).float() / 2
    return guide, unary, features


def all_ops(backend: str, guide, unary, features) -> dict:
    tree = build_tree(guide, backend=backend)
    again = reweight(tree, features, backend=backend)
    return {
        "tree": tree,
        "reweight": again,
        "propagate": propagate(tree, unary, 0.5, backend=backend),
        "propagate_reweighted": propagate(again, unary, 0.5, backend=backend),
        "local_propagation": local_propagation(unary, guide, kernel_size=5, iters=10, backend=backend),
    }


@compiled
@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (1, 17), (128, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "auto"])
def test_every_op_on_cuda_equals_the_cpu_path(backend, shape):
    if backend == "torch" and shape[0] * shape[1] > 37 * 53:
        pytest.skip("the torch tree reference is plain Python")
    host = op_inputs(*shape)
    want = all_ops("cpu", *host)
    got = all_ops(backend, *(t.to(CUDA) for t in host))
    for name in ("tree", "reweight"):
        assert got[name].device.type == "cuda"
        for field in gp_tree.Tree.ARRAYS:
            assert torch.equal(getattr(got[name], field).cpu(), getattr(want[name], field)), (name, field)
    for name in ("propagate", "propagate_reweighted", "local_propagation"):
        assert got[name].device.type == "cuda" and got[name].dtype == want[name].dtype
        torch.testing.assert_close(got[name].cpu(), want[name], atol=1e-5, rtol=0, msg=name)


@compiled
def test_auto_passes_its_self_check_on_this_gpu():
    selfcheck.forget()
    assert selfcheck.verify(CUDA, registry.OPS) is None
    assert registry.resolve("auto", CUDA) == "triton"


# ------------------------------------------------------------------------------------------------
# the commands and the student on CUDA, with the CPU smoke tests' settings


def test_refine_evaluate_compare_on_cuda(tmp_path):
    from test_cli import _overrides

    from maskclip_apro.cli import compare, evaluate, refine

    summary = refine.run(compose("refine", _overrides(tmp_path / "r", "model=tiny_vit", "dataset=synthetic",
                                                      "limit=2", "device=cuda")))
    assert summary["refined"] == 2 and summary["device"] == "cuda:0" and summary["precision"] == "fp32"
    results = evaluate.run(compose("evaluate", _overrides(tmp_path / "e", "model=tiny_vit", "limit=2",
                                                          "device=cuda", "protocol=sclip")))
    assert results["device"] == "cuda:0" and results["precision"] == "fp16"  # the protocol's dtype on CUDA
    results = compare.run(compose("compare", _overrides(tmp_path / "c", "model=tiny_resnet", "limit=2",
                                                        "device=cuda", "panels=1")))
    assert results["device"] == "cuda:0" and set(results["methods"]) == set(compose("compare").methods)


def test_train_on_cuda(tmp_path):
    from test_train import make_cfg

    from maskclip_apro.student.trainer import Trainer

    cfg = make_cfg(tmp_path, "device=cuda", "refine=apro", "iters=2", f"generator.cache_dir={tmp_path / 'cache'}")
    trainer = Trainer(cfg, info=DistInfo(device=CUDA))
    assert next(trainer.model.parameters()).device.type == "cuda" and trainer.use_amp
    losses = trainer.run()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_the_student_step_lowers_the_loss_on_cuda(tmp_path):
    from test_train import StubGenerator, make_cfg

    from maskclip_apro.student.trainer import Trainer

    class CudaStub(StubGenerator):
        def __call__(self, images):
            self.weight = self.weight.to(images.device)
            return super().__call__(images)

    cfg = make_cfg(tmp_path, "device=cuda", "refine=apro", "optim.lr=3e-3", "augment.photometric=false")
    trainer = Trainer(cfg, generator=CudaStub(), info=DistInfo(device=CUDA))
    batch = [next(iter(trainer._loader(1)))]
    losses = [trainer.train_step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    from test_distributed_eval import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_nccl_under_torchrun(tmp_path):
    """NCCL joins and reduces on this GPU (one rank: NCCL refuses two ranks on one device)."""
    script = tmp_path / "nccl.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "torch.cuda.set_device(0)\n"
        "dist.init_process_group('nccl')\n"
        "t = torch.ones(3, device='cuda')\n"
        "dist.all_reduce(t)\n"
        "print('nccl', dist.get_backend(), t.sum().item())\n"
        "dist.destroy_process_group()\n"
    )
    done = torchrun(tmp_path, str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nccl nccl 3.0" in done.stdout


def test_train_command_under_torchrun_on_cuda(tmp_path):
    out = tmp_path / "run"
    done = torchrun(tmp_path, str(ROOT / "scripts" / "train.py"), "dataset=synthetic", "dataset.num_images=4",
                    "model=tiny_vit", "student=tiny", "iters=2", "crop=32", "batch_size=2", "eval.interval=0",
                    "workers=0", "device=cuda", f"generator.cache_dir={tmp_path / 'cache'}", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())
