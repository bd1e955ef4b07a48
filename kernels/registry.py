"""The one table of APro ops and their implementation per backend, and the rules that choose one (docs/kernels.md).

Ops and their one signature (every backend takes and returns the same tensors):

    build_tree(guide (B, C, H, W)) -> gp_tree.Tree
    reweight(edges (B, N-1, 2), features (B, D, H, W)) -> gp_tree.Tree
    propagate(unary (B, K, N), order, lo, hi, children, altitude, zeta) -> (B, K, N)
    local_propagation(unary (B, K, H, W), image (B, C, H, W), zeta_s, kernel_size, iters) -> (B, K, H, W)

Backends and devices (the rule is stated once more in `maskclip_apro.apro`):
- "torch": the reference, runs on the tensors' device (the GP tree reference is plain Python).
- "cpu": the fast CPU path (numba). It always runs on the host: inputs on another device are
  copied to the host and the outputs copied back to the inputs' device.
- "triton": Triton kernels on CUDA tensors (or on any device under TRITON_INTERPRET=1); CPU
  tensors without the interpreter are an error, never a silent copy.
- "auto": "triton" where Triton can run on the tensors' CUDA device and passed its self-check
  there (kernels/selfcheck.py: once per device and process, against "cpu"), "cpu" otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import _triton, gp_propagate, gp_tree, gp_tree_triton, lp, selfcheck

BACKENDS = ("auto", "torch", "cpu", "triton")

OPS: dict[str, dict[str, Callable]] = {
    "build_tree": {
        "torch": gp_tree.build_tree_reference,
        "cpu": gp_tree.build_tree_cpu,
        "triton": gp_tree_triton.build_tree_triton,
    },
    "reweight": {
        "torch": gp_tree.reweight_reference,
        "cpu": gp_tree.reweight_cpu,
        "triton": gp_tree_triton.reweight_triton,
    },
    "propagate": {
        "torch": gp_propagate.propagate_reference,
        "cpu": gp_propagate.propagate_cpu,
        "triton": gp_propagate.propagate_triton,
    },
    "local_propagation": {
        "torch": lp.lp_reference,
        "cpu": lp.lp_cpu_image,
        "triton": lp.lp_triton_image,
    },
}


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`; ValueError for unknown names and impossible combinations."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = device.type == "cuda" and _triton.triton_ready(device)
        return "triton" if usable and selfcheck.triton_verified(device, OPS) else "cpu"
    if backend == "triton" and not _triton.triton_ready(device):
        if _triton.triton is None:
            raise ValueError("backend 'triton' needs the triton package; use backend='cpu' or 'torch'")
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before maskclip_apro is imported "
            f"(interpreter active: {_triton.INTERPRETED}); got tensors on {device}"
        )
    return backend


def _move(x, device: torch.device):
    return x.to(device) if isinstance(x, (torch.Tensor, gp_tree.Tree)) else x


def run(op: str, backend: str, *args):
    """Call `op` with a backend from `resolve`; "cpu" moves tensors to the host and its outputs back."""
    fn = OPS[op][backend]
    if backend != "cpu":
        return fn(*args)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    host = torch.device("cpu")
    return _move(fn(*(_move(a, host) for a in args)), device)
