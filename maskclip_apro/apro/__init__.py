"""APro affinity propagation: global (GP, over the image's minimum spanning tree) and local (LP).

    tree = build_tree(guide)                      # MST + Kruskal reconstruction tree, per image
    y = propagate(tree, unary, zeta)              # GP of every channel over that tree
    tree2 = reweight(tree, features)              # same MST edges, weights from other features
    y = global_propagation(unary, guide, zeta)    # build_tree + propagate
    y = local_propagation(unary, image, zeta_s=0.15, kernel_size=5, iters=20)

Every call takes `backend=`:
- "auto" (default): "triton" on CUDA tensors (when Triton is installed and its kernels pass a
  self-check against "cpu" on that device, run once per process; else "cpu" and one warning
  line), "cpu" otherwise;
- "torch": the PyTorch reference, on the tensors' device;
- "cpu": the fast CPU path (numba). It always computes on the host: tensors on a GPU are
  copied to the host and the result is copied back to their device;
- "triton": Triton kernels; CUDA tensors only (or any tensors when TRITON_INTERPRET=1 was set
  before import). Other tensors raise ValueError; nothing is moved silently to a GPU.
Every backend returns the same result (the same trees, and propagation outputs equal to a
brute force within 1e-5); docs/kernels.md describes the implementations.
"""

from .gp import Tree, build_tree, global_propagation, propagate, reweight
from .lp import local_propagation

__all__ = ["Tree", "build_tree", "propagate", "reweight", "global_propagation", "local_propagation"]
