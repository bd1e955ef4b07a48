"""Kernels for APro: each op with its PyTorch reference, a fast CPU path (numba) and Triton kernels.

registry (the op table and the backend rules), gp_tree (tree build: reference and CPU),
gp_tree_triton (tree build on the GPU), gp_propagate (GP propagation), lp (LP), _triton
(Triton import and readiness). docs/kernels.md describes them.

Numba's parallel loops use the workqueue threading layer unless the user chose one: numba's
OpenMP pool can keep spinning after a parallel region and slow the torch ops that follow.
"""

import os

if "NUMBA_THREADING_LAYER" not in os.environ:
    import numba

    numba.config.THREADING_LAYER = "workqueue"
