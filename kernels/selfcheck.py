"""backend="auto" trusts the Triton kernels on a CUDA device only after they agree with the CPU path there.

The first time "auto" resolves for a CUDA device, `triton_verified` runs every Triton op once on
a small tie-heavy batch (three 64x64 guides: constant, three colours in blocks, stepped ramps
with a few-level noise patch) and compares it with backend "cpu": the trees field by field, the
GP and LP outputs within `ATOL`. A difference, or a kernel that fails to compile or launch,
makes "auto" use "cpu" on that device for the rest of the process, with one warning line that
names the first disagreeing op. The verdict is cached per device; backend="triton" (asked for by
name) is never checked. docs/kernels.md, "backend=auto self-check".
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from . import gp_tree

log = logging.getLogger(__name__)

SIZE = 64
CLASSES = 5
ZETA = 0.5
LP_ARGS = (0.15, 5, 2)  # zeta_s, kernel_size, iterations
ATOL = 1e-5  # the backends' documented agreement on propagation outputs

_VERDICTS: dict[str, bool] = {}


def guides(size: int = SIZE) -> torch.Tensor:
    """(3, 3, size, size) guides whose MSTs are full of equal-weight edges (ties decide the tree)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(size, size)
    cols = torch.arange(size, dtype=torch.float32)[None, :].expand(size, size)
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])
    blocks = palette[((rows // 8 + cols // 16) % 3).long()].permute(2, 0, 1)
    ramps = torch.stack([cols // 4, rows // 4, (rows + cols) // 8]) / 8
    ramps[:, : size // 2, : size // 2] = torch.randint(0, 3, (3, size // 2, size // 2), generator=gen).float() / 4
    return torch.stack([torch.zeros(3, size, size), blocks, ramps])


def _compare(name: str, got, want) -> Optional[str]:
    """None when equal (trees: every field exactly; tensors: within ATOL), else what differs."""
    if isinstance(want, gp_tree.Tree):
        for field in gp_tree.Tree.ARRAYS:
            a, b = getattr(got, field).cpu(), getattr(want, field).cpu()
            if a.shape != b.shape or not torch.equal(a, b):
                return f"{name} differs from the cpu backend in tree.{field}"
        return None
    got, want = got.cpu().double(), want.cpu().double()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return f"{name} returned shape {tuple(got.shape)} (cpu: {tuple(want.shape)}) or non-finite values"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    return None if err <= ATOL else f"{name} differs from the cpu backend by {err:.2g} (tolerance {ATOL:g})"


def verify(device: torch.device, ops: dict[str, dict[str, Callable]], size: int = SIZE) -> Optional[str]:
    """Run every op of `ops` (the registry's table) with "triton" and "cpu" on `device` (guides of
    size x size); None if they agree, else one sentence saying what failed (a kernel's exception included)."""
    guide = guides(size).to(device)
    gen = torch.Generator().manual_seed(1)
    unary = torch.softmax(4 * torch.randn(guide.shape[0], CLASSES, size, size, generator=gen), dim=1).to(device)
    features = (torch.randint(0, 3, (guide.shape[0], 4, size, size), generator=gen).float() / 2).to(device)
    host = torch.device("cpu")

    def cpu(op: str, *args):
        return ops[op]["cpu"](*(a.to(host) if isinstance(a, torch.Tensor) else a for a in args))

    def both(op: str, *args):
        return ops[op]["triton"](*args), cpu(op, *args)

    step = "build_tree"
    try:
        tree, want = both("build_tree", guide)
        problem = _compare(step, tree, want)
        if problem is None:
            step = "reweight"
            problem = _compare(step, *both("reweight", tree.edges, features))
        if problem is None:
            step = "propagate"
            flat = unary.reshape(unary.shape[0], CLASSES, -1)
            parts = (tree.order, tree.lo, tree.hi, tree.children, tree.altitude)
            problem = _compare(step, *both("propagate", flat, *parts, ZETA))
        if problem is None:
            step = "local_propagation"
            problem = _compare(step, *both("local_propagation", unary, guide, *LP_ARGS))
        if problem is None and device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # compile, launch or runtime failure of a kernel: the CPU path is safe
        message = str(error).strip().splitlines()
        return f"{step} failed ({type(error).__name__}: {message[0] if message else 'no message'})"
    return problem


def triton_verified(device: torch.device, ops: dict[str, dict[str, Callable]]) -> bool:
    """Whether backend "auto" may use Triton on `device`: `verify` once per device and process;
    on failure one warning line, and False from then on."""
    key = str(device)
    if key not in _VERDICTS:
        problem = verify(device, ops)
        _VERDICTS[key] = problem is None
        if problem is not None:
            log.warning(
                "backend=auto on %s uses the cpu backend: the Triton self-check failed: %s "
                "(backend='triton' runs the kernels anyway)", key, problem,
            )
    return _VERDICTS[key]


def forget() -> None:
    """Drop the cached verdicts (tests; a process that changed its kernels)."""
    _VERDICTS.clear()
