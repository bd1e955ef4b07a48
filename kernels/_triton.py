"""The one place that imports Triton and decides whether Triton kernels can run (docs/kernels.md).

`triton` and `tl` are None when the package is missing (every kernel module guards its
`@triton.jit` definitions on that). `INTERPRETED` records whether kernels were decorated
under `TRITON_INTERPRET=1` (the CPU interpreter): Triton reads that variable when a kernel
is decorated, so it must be set before `maskclip_apro.kernels` is imported.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _probe():
        pass

    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    INTERPRETED = False


def triton_ready(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device`: CUDA, or any device under the interpreter."""
    return triton is not None and (INTERPRETED or device.type == "cuda")


def launch_block(interpreted_block: int, device_block: int) -> int:
    """Elements per program: the interpreter pays per program instance, so it gets few, large ones."""
    return interpreted_block if INTERPRETED else device_block
