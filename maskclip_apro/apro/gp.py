"""APro global affinity propagation (GP): averaging over the image's minimum spanning tree.

    y_i = sum_j phi_j psi(i, j) / sum_j psi(i, j),   psi(i, j) = exp(-maxedge(i, j) / zeta^2),

maxedge being the largest edge weight on the MST path between pixels i and j. The tree is
built once per guide (`build_tree`) and reused for any number of channels (`propagate`);
`reweight` keeps the MST topology but takes edge weights from other features (second pass).

Backends and devices: see `maskclip_apro.apro`. Every backend builds the same tree, the official
APro MST (float32 weights, ties to the lowest edge index, vertical edges indexed first: pass 1
does not depend on it, pass 2 does); docs/kernels.md ("Which MST") describes each implementation.
"""

from __future__ import annotations

import torch

from ..checks import check_map, check_pair, check_positive
from ..kernels import registry
from ..kernels.gp_tree import Tree


def _check_matches(name: str, x: torch.Tensor, tree: Tree) -> None:
    """`x` (B, ., H, W) lies on the tree's images: same batch, size and device."""
    if x.shape[0] != tree.batch_size or tuple(x.shape[-2:]) != (tree.height, tree.width):
        raise ValueError(
            f"{name} {tuple(x.shape)} must match the tree's batch and spatial size "
            f"({tree.batch_size}, ., {tree.height}, {tree.width})"
        )
    if x.device != tree.device:
        raise ValueError(f"{name} is on {x.device} but the tree is on {tree.device}")



def build_tree(guide: torch.Tensor, *, backend: str = "auto") -> Tree:
    """MST of the 4-connected grid of `guide` (B, C, H, W), edge weight = squared Euclidean distance, and its KRT."""
    check_map("guide", guide)
    return _build_tree(guide, registry.resolve(backend, guide.device))


def _build_tree(guide: torch.Tensor, name: str) -> Tree:
    return registry.run("build_tree", name, guide)


def reweight(tree: Tree, features: torch.Tensor, *, backend: str = "auto") -> Tree:
    """Same MST topology, weights = squared distances of `features` (B, D, H, W), KRT rebuilt by Kruskal."""
    check_map("features", features)
    _check_matches("features", features, tree)
    name = registry.resolve(backend, features.device)
    return registry.run("reweight", name, tree.edges, features)


def propagate(tree: Tree, unary: torch.Tensor, zeta: float, *, backend: str = "auto") -> torch.Tensor:
    """GP of every channel of `unary` (B, K, H, W) over `tree`; float64 sums, returns unary's dtype."""
    check_map("unary", unary)
    z = check_positive("zeta", zeta)
    _check_matches("unary", unary, tree)
    return _propagate(tree, unary, z, registry.resolve(backend, unary.device))


def _propagate(tree: Tree, unary: torch.Tensor, zeta: float, name: str) -> torch.Tensor:
    bsz, k, h, w = unary.shape
    parts = (tree.order, tree.lo, tree.hi, tree.children, tree.altitude)
    return registry.run("propagate", name, unary.reshape(bsz, k, h * w), *parts, zeta).reshape(bsz, k, h, w)


def global_propagation(unary: torch.Tensor, guide: torch.Tensor, zeta: float, *, backend: str = "auto") -> torch.Tensor:
    """`propagate(build_tree(guide), unary, zeta)`, each input checked once."""
    check_map("unary", unary)
    check_map("guide", guide)
    check_pair("unary", unary, "guide", guide)
    z = check_positive("zeta", zeta)
    name = registry.resolve(backend, unary.device)
    return _propagate(_build_tree(guide, name), unary, z, name)
