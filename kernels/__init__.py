"""Kernels for APro: each op with its PyTorch reference, a fast CPU path and a Triton kernel.

Numba's parallel loops use the workqueue threading layer unless the user chose one: numba's
OpenMP pool can keep spinning after a parallel region and slow the torch ops that follow.
"""

import os

if "NUMBA_THREADING_LAYER" not in os.environ:
    import numba

    numba.config.THREADING_LAYER = "workqueue"
