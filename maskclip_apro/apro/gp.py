"""APro global affinity propagation (GP, design 3.2): averaging over the image's minimum spanning tree.

    y_i = sum_j phi_j psi(i, j) / sum_j psi(i, j),   psi(i, j) = exp(-maxedge(i, j) / zeta^2),

maxedge being the largest edge weight on the MST path between pixels i and j. The tree is
built once per guide (`build_tree`) and reused for any number of channels (`propagate`);
`reweight` keeps the MST topology but takes edge weights from other features (second pass).

Backends: "torch" (reference), "cpu" (numba), "triton" (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1); "auto" picks triton on CUDA and cpu otherwise. Every backend builds
the same tree (edges are sorted stably, so ties are broken identically).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maskclip_apro.apro._checks import check_backend, check_map, check_pair, check_positive
from maskclip_apro.kernels import gp_propagate, gp_tree


@dataclass(frozen=True)
class Tree:
    """MST and Kruskal reconstruction tree (KRT) of each image in a batch; all tensors on the guide's device.

    Pixels are numbered row-major (N = height * width). KRT node ids: leaves 0..N-1 are the
    pixels, internal node N+t was created by the t-th MST edge in Kruskal (ascending weight) order.

    - edges (B, N-1, 2) int64: MST edges as pixel pairs, in Kruskal order.
    - altitude (B, N-1) float64: weight of each MST edge = altitude of internal node N+t.
    - children (B, N-1, 2) int64: KRT ids of the two children of internal node N+t.
    - order (B, N) int64: the pixel at each position of the KRT DFS leaf order.
    - lo, hi (B, 2N-1) int64: every KRT node's leaves occupy leaf positions [lo, hi).
    """

    height: int
    width: int
    edges: torch.Tensor
    altitude: torch.Tensor
    children: torch.Tensor
    order: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.edges.shape[0]

    @property
    def num_pixels(self) -> int:
        return self.height * self.width

    @property
    def device(self) -> torch.device:
        return self.edges.device


def _check_matches(name: str, x: torch.Tensor, tree: Tree) -> None:
    """`x` (B, ., H, W) lies on the tree's images: same batch, size and device."""
    if x.shape[0] != tree.batch_size or tuple(x.shape[-2:]) != (tree.height, tree.width):
        raise ValueError(
            f"{name} {tuple(x.shape)} must match the tree's batch and spatial size "
            f"({tree.batch_size}, ., {tree.height}, {tree.width})"
        )
    if x.device != tree.device:
        raise ValueError(f"{name} is on {x.device} but the tree is on {tree.device}")


def _tree_cpu(src, dst, weight, n: int, height: int, width: int, device: torch.device) -> Tree:
    """cpu backend: numba sort/Kruskal on numpy arrays, tensors moved to `device` at the end."""
    fields = gp_tree.kruskal_cpu(src, dst, weight, n)
    return Tree(height, width, *(torch.from_numpy(f).to(device) for f in fields))


def _tree_sorted(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, n: int, height: int, width: int,
                 backend: str) -> Tree:
    """torch / triton backends: stable torch.sort of each image's edges, then Kruskal on the sorted lists."""
    weight, perm = torch.sort(weight, dim=1, stable=True)
    src, dst = src.gather(1, perm), dst.gather(1, perm)
    if backend == "triton":
        accepted, children, lo, size = gp_tree.kruskal_triton(src, dst, n)
    else:
        s, d = src.cpu().numpy(), dst.cpu().numpy()
        per_image = [gp_tree.kruskal_reference(s[b], d[b], n) for b in range(s.shape[0])]
        accepted, children, lo, size = (
            torch.stack([torch.from_numpy(p[i]) for p in per_image]).to(src.device) for i in range(4)
        )
    edges = torch.stack([src.gather(1, accepted), dst.gather(1, accepted)], dim=2)
    order = torch.empty(lo.shape[0], n, dtype=torch.int64, device=lo.device)
    order.scatter_(1, lo[:, :n], torch.arange(n, device=lo.device).expand(lo.shape[0], n))
    return Tree(height, width, edges, weight.gather(1, accepted), children, order, lo, lo + size)


def build_tree(guide: torch.Tensor, *, backend: str = "auto") -> Tree:
    """MST of the 4-connected grid of `guide` (B, C, H, W), edge weight = squared Euclidean distance, and its KRT."""
    check_map("guide", guide)
    return _build_tree(guide, check_backend(backend, guide.device))


def _build_tree(guide: torch.Tensor, name: str) -> Tree:
    bsz, _, h, w = guide.shape
    if name == "cpu":
        g = guide.detach().cpu()
        g = (g if g.dtype in (torch.float32, torch.float64) else g.float()).numpy()
        src, dst = gp_tree.grid_edges_cpu(h, w)
        src, dst = np.broadcast_to(src, (bsz, src.size)), np.broadcast_to(dst, (bsz, dst.size))
        return _tree_cpu(src, dst, gp_tree.grid_weights_cpu(g), h * w, h, w, guide.device)
    src, dst = gp_tree.grid_edges(h, w, guide.device)
    src, dst = src.expand(bsz, -1), dst.expand(bsz, -1)
    return _tree_sorted(src, dst, gp_tree.grid_weights(guide), h * w, h, w, name)


def reweight(tree: Tree, features: torch.Tensor, *, backend: str = "auto") -> Tree:
    """Same MST topology, weights = squared distances of `features` (B, D, H, W), KRT rebuilt by Kruskal."""
    check_map("features", features)
    _check_matches("features", features, tree)
    name = check_backend(backend, features.device)
    src, dst = tree.edges[:, :, 0], tree.edges[:, :, 1]
    weight = gp_tree.pair_weights(features, src, dst)
    if name == "cpu":
        s, d, w = (x.cpu().numpy() for x in (src, dst, weight))
        return _tree_cpu(s, d, w, tree.num_pixels, tree.height, tree.width, tree.device)
    return _tree_sorted(src, dst, weight, tree.num_pixels, tree.height, tree.width, name)


_PROPAGATE = {
    "torch": gp_propagate.propagate_reference,
    "cpu": gp_propagate.propagate_cpu,
    "triton": gp_propagate.propagate_triton,
}


def propagate(tree: Tree, unary: torch.Tensor, zeta: float, *, backend: str = "auto") -> torch.Tensor:
    """GP of every channel of `unary` (B, K, H, W) over `tree`; float64 sums, returns unary's dtype."""
    check_map("unary", unary)
    z = check_positive("zeta", zeta)
    _check_matches("unary", unary, tree)
    return _propagate(tree, unary, z, check_backend(backend, unary.device))


def _propagate(tree: Tree, unary: torch.Tensor, zeta: float, name: str) -> torch.Tensor:
    bsz, k, h, w = unary.shape
    dev = torch.device("cpu") if name == "cpu" else unary.device
    parts = (tree.order, tree.lo, tree.hi, tree.children, tree.altitude)
    y = _PROPAGATE[name](unary.reshape(bsz, k, h * w).to(dev), *(p.to(dev) for p in parts), zeta)
    return y.reshape(bsz, k, h, w).to(unary.device)


def global_propagation(unary: torch.Tensor, guide: torch.Tensor, zeta: float, *, backend: str = "auto") -> torch.Tensor:
    """`propagate(build_tree(guide), unary, zeta)`, each input checked once."""
    check_map("unary", unary)
    check_map("guide", guide)
    check_pair("unary", unary, "guide", guide)
    z = check_positive("zeta", zeta)
    name = check_backend(backend, unary.device)
    return _propagate(_build_tree(guide, name), unary, z, name)
