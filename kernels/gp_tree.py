"""GP tree build on the CPU: the minimum spanning tree (MST) of a weighted edge list and its Kruskal reconstruction tree (KRT).

Every tree-build implementation (this module's reference and numba path, `gp_tree_triton`)
returns the same `Tree` for one batch of images; docs/kernels.md explains the algorithms and
how they are checked against each other.

Edges are ordered by (weight, position in the input edge list): ties are broken by the
input order, so every implementation finds the same MST and builds the same KRT. Node ids:
leaves 0..N-1 are the pixels (row-major); internal node N+t is created by the t-th MST edge
in that order (the t-th successful union of Kruskal's algorithm). Its children are the KRT
nodes standing for the components of the edge's first and second endpoint, in that order,
and the DFS that visits first children first lays every node's leaves out in one contiguous
range [lo, hi) of the leaf order.

Ops (one signature per op across backends):
    build_tree(guide (B, C, H, W)) -> Tree      MST of the 4-connected grid, squared L2 weights
    reweight(edges (B, N-1, 2), features (B, D, H, W)) -> Tree   same edges, new weights
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ClassVar

import numba
import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Tree:
    """MST and Kruskal reconstruction tree (KRT) of each image in a batch; all tensors on one device.

    Pixels are numbered row-major (N = height * width). KRT node ids: leaves 0..N-1 are the
    pixels, internal node N+t was created by the t-th MST edge in Kruskal (ascending weight) order.

    - edges (B, N-1, 2) int64: MST edges as pixel pairs, in Kruskal order.
    - altitude (B, N-1) float64: weight of each MST edge = altitude of internal node N+t.
    - children (B, N-1, 2) int64: KRT ids of the two children of internal node N+t.
    - order (B, N) int64: the pixel at each position of the KRT DFS leaf order.
    - lo, hi (B, 2N-1) int64: every KRT node's leaves occupy leaf positions [lo, hi).
    """

    ARRAYS: ClassVar[tuple[str, ...]] = ("edges", "altitude", "children", "order", "lo", "hi")

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

    def to(self, device: torch.device | str) -> "Tree":
        """The same tree with every tensor on `device`."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in self.ARRAYS})


Stage = Callable[[str], contextlib.AbstractContextManager]


def no_stage(name: str) -> contextlib.AbstractContextManager:
    """Default stage hook: a benchmark passes one that synchronises, times or counts each named stage."""
    return contextlib.nullcontext()


def grid_edges(height: int, width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints (src, dst) of the 4-connected grid: all horizontal edges, then all vertical ones; src < dst."""
    idx = torch.arange(height * width, device=device).reshape(height, width)
    src = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    dst = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return src, dst


def grid_weights(guide: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Squared Euclidean distance of guide vectors (B, C, H, W) across every grid edge -> (B, E) float64.

    Edge order matches `grid_edges`. Channels are summed in chunks so memory stays O(N * chunk).
    """
    b, c, h, w = guide.shape
    horiz = torch.zeros(b, h, max(w - 1, 0), dtype=torch.float64, device=guide.device)
    vert = torch.zeros(b, max(h - 1, 0), w, dtype=torch.float64, device=guide.device)
    for start in range(0, c, chunk):
        g = guide[:, start : start + chunk].double()
        horiz += (g[:, :, :, 1:] - g[:, :, :, :-1]).square().sum(1)
        vert += (g[:, :, 1:, :] - g[:, :, :-1, :]).square().sum(1)
    return torch.cat([horiz.reshape(b, -1), vert.reshape(b, -1)], dim=1)


def pair_weights(features: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Squared Euclidean distance of features (B, D, H, W) across per-image edges src/dst (B, M) -> (B, M) float64."""
    b, d = features.shape[:2]
    flat = features.reshape(b, d, -1)
    out = torch.zeros(src.shape, dtype=torch.float64, device=features.device)
    for start in range(0, d, chunk):
        f = flat[:, start : start + chunk].double()
        m = f.shape[1]
        fs = f.gather(2, src[:, None, :].expand(b, m, -1))
        fd = f.gather(2, dst[:, None, :].expand(b, m, -1))
        out += (fs - fd).square().sum(1)
    return out


def leaf_order(lo: torch.Tensor, n: int) -> torch.Tensor:
    """order (B, N): the pixel at every leaf position, from the leaves' range starts lo[:, :N]."""
    order = torch.empty(lo.shape[0], n, dtype=torch.int64, device=lo.device)
    return order.scatter_(1, lo[:, :n], torch.arange(n, device=lo.device).expand(lo.shape[0], n))


# ----------------------------------------------------------------------------------------------
# reference


def kruskal_reference(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Kruskal + KRT + leaf ranges for one image in plain Python, edges already sorted by weight.

    Returns accepted (N-1,) positions of the MST edges in the sorted list, children (N-1, 2),
    lo (2N-1,) and size (2N-1,): sizes in creation order, then lo offsets in reverse creation
    order (a parent is always created after its children).
    """
    parent = list(range(n))
    top = list(range(n))  # KRT node currently standing for each union-find root

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    accepted, children = [], []
    for e, (a, b) in enumerate(zip(src.tolist(), dst.tolist())):
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        children.append((top[ra], top[rb]))
        parent[rb] = ra
        top[ra] = n + len(accepted)
        accepted.append(e)

    size = [1] * n + [0] * (n - 1)
    for t, (ca, cb) in enumerate(children):
        size[n + t] = size[ca] + size[cb]
    lo = [0] * (2 * n - 1)
    for t in reversed(range(n - 1)):
        ca, cb = children[t]
        lo[ca] = lo[n + t]
        lo[cb] = lo[n + t] + size[ca]
    return (
        np.asarray(accepted, dtype=np.int64),
        np.asarray(children, dtype=np.int64).reshape(n - 1, 2),
        np.asarray(lo, dtype=np.int64),
        np.asarray(size, dtype=np.int64),
    )


def _tree_reference(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> Tree:
    """Stable torch.sort of every image's edges, then `kruskal_reference` image by image."""
    n = height * width
    weight, perm = torch.sort(weight, dim=1, stable=True)
    src, dst = src.gather(1, perm), dst.gather(1, perm)
    s, d = src.cpu().numpy(), dst.cpu().numpy()
    per_image = [kruskal_reference(s[b], d[b], n) for b in range(s.shape[0])]
    accepted, children, lo, size = (
        torch.stack([torch.from_numpy(p[i]) for p in per_image]).to(src.device) for i in range(4)
    )
    edges = torch.stack([src.gather(1, accepted), dst.gather(1, accepted)], dim=2)
    return Tree(height, width, edges, weight.gather(1, accepted), children, leaf_order(lo, n), lo, lo + size)


def build_tree_reference(guide: torch.Tensor) -> Tree:
    """torch backend: grid weights in torch, stable sort, plain-Python Kruskal."""
    bsz, _, h, w = guide.shape
    src, dst = grid_edges(h, w, guide.device)
    return _tree_reference(src.expand(bsz, -1), dst.expand(bsz, -1), grid_weights(guide), h, w)


def reweight_reference(edges: torch.Tensor, features: torch.Tensor) -> Tree:
    """torch backend: the given MST edges with weights from `features`, KRT rebuilt by Kruskal."""
    src, dst = edges[:, :, 0], edges[:, :, 1]
    return _tree_reference(src, dst, pair_weights(features, src, dst), *features.shape[2:])


# ----------------------------------------------------------------------------------------------
# cpu (numba): images in parallel, each image's stages sequential


@numba.njit(parallel=True, cache=True)
def _grid_weights_cpu(guide, out):
    bsz, c, h, w = guide.shape
    nh = h * (w - 1)
    for row in numba.prange(bsz * h):  # image rows in parallel: a batch of one still uses every thread
        b = row // h
        r = row % h
        for col in range(w):
            if col + 1 < w:
                acc = 0.0
                for ch in range(c):
                    d = np.float64(guide[b, ch, r, col + 1]) - np.float64(guide[b, ch, r, col])
                    acc += d * d
                out[b, r * (w - 1) + col] = acc
            if r + 1 < h:
                acc = 0.0
                for ch in range(c):
                    d = np.float64(guide[b, ch, r + 1, col]) - np.float64(guide[b, ch, r, col])
                    acc += d * d
                out[b, nh + r * w + col] = acc


def grid_weights_cpu(guide: np.ndarray) -> np.ndarray:
    """numba version of `grid_weights` for a float32/float64 array (B, C, H, W): one pass, no temporaries."""
    bsz, _, h, w = guide.shape
    out = np.empty((bsz, h * (w - 1) + (h - 1) * w), dtype=np.float64)
    _grid_weights_cpu(np.ascontiguousarray(guide), out)
    return out


RADIX_BITS = 13
RADIX_PASSES = 5  # 5 * 13 = 65 >= the 63 bits of a non-negative double


@numba.njit(cache=True)
def _sort_edges(src, dst, bits, keys, vals, k_tmp, v_tmp):
    """Edges of one image sorted by weight (stable): keys = weight bits, vals = src | dst << 32.

    `bits` is the float64 weight array viewed as int64. Non-negative IEEE doubles order like
    their bit patterns read as int64, so a stable LSD radix sort of the bits (13-bit digits,
    all histograms in one pass, a pass skipped where every key shares the digit) gives
    torch.sort(stable=True)'s order, about 3x faster than np.argsort here.
    """
    m = bits.shape[0]
    if m == 0:
        return
    radix = 1 << RADIX_BITS
    mask = radix - 1
    counts = np.zeros((RADIX_PASSES, radix), dtype=np.int64)
    for e in range(m):
        k = bits[e]
        keys[e] = k
        vals[e] = src[e] | (dst[e] << 32)
        for d in range(RADIX_PASSES):
            counts[d, (k >> (d * RADIX_BITS)) & mask] += 1
    flips = 0
    for d in range(RADIX_PASSES):
        shift = d * RADIX_BITS
        c = counts[d]
        if c[(keys[0] >> shift) & mask] == m:
            continue  # every key has this digit: the pass would not move anything
        acc = 0
        for j in range(radix):
            cj = c[j]
            c[j] = acc
            acc += cj
        if flips % 2 == 0:
            sk, sv, dk, dv = keys, vals, k_tmp, v_tmp
        else:
            sk, sv, dk, dv = k_tmp, v_tmp, keys, vals
        for e in range(m):
            k = sk[e]
            j = (k >> shift) & mask
            pos = c[j]
            c[j] = pos + 1
            dk[pos] = k
            dv[pos] = sv[e]
        flips += 1
    if flips % 2 == 1:
        keys[:] = k_tmp
        vals[:] = v_tmp


@numba.njit(cache=True)
def _find(parent, x):
    """Root of x, halving the path on the way."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True)
def _kruskal_sorted(keys, vals, n, union_find, edges, altitude, children, size):
    """One image, edges sorted by `_sort_edges`: Kruskal; every KRT node's leaf count as it is created.

    Union by size gives the size of a new node at once. union_find (3, N) int32 is scratch.
    """
    weight = keys.view(np.float64)
    parent, comp, top = union_find[0], union_find[1], union_find[2]
    for i in range(n):
        parent[i] = i
        comp[i] = 1  # component sizes (union by size)
        top[i] = i  # KRT node standing for each union-find root
    size[:n] = 1
    t = 0
    for j in range(keys.shape[0]):
        if t == n - 1:
            break
        v = vals[j]
        a = np.int32(v & 0xFFFFFFFF)
        b = np.int32(v >> 32)
        ra = _find(parent, a)
        rb = _find(parent, b)
        if ra == rb:
            continue
        children[t, 0] = top[ra]
        children[t, 1] = top[rb]
        edges[t, 0] = a
        edges[t, 1] = b
        altitude[t] = weight[j]
        s = comp[ra] + comp[rb]
        size[n + t] = s
        if comp[ra] < comp[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        comp[ra] = s
        top[ra] = n + t
        t += 1


@numba.njit(cache=True)
def _leaf_ranges(children, n, order, lo, hi):
    """One image: hi holds the leaf counts on entry; one pass in reverse creation order sets lo, hi, order."""
    size = hi
    root = 2 * n - 2
    lo[root] = 0
    hi[root] = n
    order[0] = 0  # a single pixel has no internal node to place it
    for t in range(n - 2, -1, -1):
        base = lo[n + t]
        ca = children[t, 0]
        cb = children[t, 1]
        mid = base + size[ca]
        lo[ca] = base
        lo[cb] = mid
        hi[cb] = hi[n + t]
        hi[ca] = mid
        if ca < n:
            order[base] = ca
        if cb < n:
            order[mid] = cb


@numba.njit(parallel=True, cache=True)
def _sort_batch(src, dst, bits, sort_buf):
    for b in numba.prange(bits.shape[0]):
        _sort_edges(src[b], dst[b], bits[b], sort_buf[b, 0], sort_buf[b, 1], sort_buf[b, 2], sort_buf[b, 3])


@numba.njit(parallel=True, cache=True)
def _kruskal_batch(sort_buf, n, union_find, edges, altitude, children, size):
    for b in numba.prange(sort_buf.shape[0]):
        _kruskal_sorted(sort_buf[b, 0], sort_buf[b, 1], n, union_find[b], edges[b], altitude[b], children[b], size[b])


@numba.njit(parallel=True, cache=True)
def _ranges_batch(children, n, order, lo, hi):
    for b in numba.prange(children.shape[0]):
        _leaf_ranges(children[b], n, order[b], lo[b], hi[b])


def tree_cpu(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, height: int, width: int,
             stage: Stage = no_stage) -> Tree:
    """Batched radix sort, Kruskal (MST and KRT in one pass) and leaf ranges with numba.

    src/dst (B, E) int64 edges in any order (a broadcast view is fine), weight (B, E) float64 >= 0.
    N < 2**31 (endpoints are packed in one int64, union-find arrays are int32). All memory is
    allocated here by numpy, which asks for huge pages; numba's own allocations of the same
    scratch fault in 4 KiB pages and were measurably slower.
    """
    bsz, m = weight.shape
    n = height * width
    edges = np.empty((bsz, n - 1, 2), dtype=np.int64)
    altitude = np.empty((bsz, n - 1), dtype=np.float64)
    children = np.empty((bsz, n - 1, 2), dtype=np.int64)
    order = np.empty((bsz, n), dtype=np.int64)
    lo = np.empty((bsz, 2 * n - 1), dtype=np.int64)
    hi = np.empty((bsz, 2 * n - 1), dtype=np.int64)
    sort_buf = np.empty((bsz, 4, m), dtype=np.int64)
    union_find = np.empty((bsz, 3, n), dtype=np.int32)
    src, dst, weight = (np.ascontiguousarray(a) for a in (src, dst, weight))
    with stage("sort"):
        _sort_batch(src, dst, weight.view(np.int64), sort_buf)
    with stage("mst+krt"):
        _kruskal_batch(sort_buf, n, union_find, edges, altitude, children, hi)
    with stage("leaf ranges"):
        _ranges_batch(children, n, order, lo, hi)
    return Tree(height, width, *(torch.from_numpy(a) for a in (edges, altitude, children, order, lo, hi)))


def build_tree_cpu(guide: torch.Tensor, stage: Stage = no_stage) -> Tree:
    """cpu backend: numba grid weights, radix sort, Kruskal, leaf ranges (CPU tensors)."""
    bsz, _, h, w = guide.shape
    g = guide.detach()
    g = (g if g.dtype in (torch.float32, torch.float64) else g.float()).numpy()
    src, dst = (e.numpy() for e in grid_edges(h, w))
    with stage("weights"):
        weight = grid_weights_cpu(g)
    src, dst = np.broadcast_to(src, (bsz, src.size)), np.broadcast_to(dst, (bsz, dst.size))
    return tree_cpu(src, dst, weight, h, w, stage)


def reweight_cpu(edges: torch.Tensor, features: torch.Tensor) -> Tree:
    """cpu backend: `pair_weights`, then the numba sort / Kruskal / leaf ranges over the N-1 given edges."""
    src, dst = edges[:, :, 0], edges[:, :, 1]
    weight = pair_weights(features, src, dst)
    return tree_cpu(src.numpy(), dst.numpy(), weight.numpy(), *features.shape[2:])
