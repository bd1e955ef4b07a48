"""GP tree build on the CPU: the minimum spanning tree (MST) of the pixel grid and its Kruskal reconstruction tree (KRT).

Every tree-build implementation (this module's reference and numba path, `gp_tree_triton`)
returns the same `Tree` for one batch of images; docs/kernels.md explains the algorithms and
how they are checked against each other.

The tree follows the official APro MST (CircleRadon/APro, `apro/gp_cuda/mst/mst.py` and
`boruvka.cpp`), so that a second pass, which reuses the topology, sees the official tree on
images with ties. Grid edge e is numbered as the official `_build_matrix_index`: the vertical
edges first (row-major), then the horizontal ones. Its weight w_e is the squared distance of
the guide vectors in float32, channels summed in order (the official `norm2_distance` on a
float32 guide); the MST is the unique one for the order (fl32(w_e + 1), e): the official
Borůvka compares the weights plus one in float32 and keeps the lowest index among ties.
The MST edges are then put in Kruskal order (w_e, e) and their weights are the altitudes
(exactly the weights the official `gp_process.cu` sorts and propagates with).
Node ids: leaves 0..N-1 are the pixels (row-major); internal node N+t is created by the t-th
MST edge in that order (the t-th successful union of Kruskal's algorithm). Its children are
the KRT nodes standing for the components of the edge's first and second endpoint, in that
order, and the DFS that visits first children first lays every node's leaves out in one
contiguous range [lo, hi) of the leaf order.

Ops (one signature per op across backends):
    build_tree(guide (B, C, H, W)) -> Tree      official MST of the 4-connected grid, float32 squared L2 weights
    reweight(edges (B, N-1, 2), features (B, D, H, W)) -> Tree   same edges, float64 weights, order (weight, position)
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
    - altitude (B, N-1) float64: weight of each MST edge = altitude of internal node N+t (the
      float32 weight for `build_tree`, the float64 one for `reweight`).
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
    """Endpoints (src, dst) of the 4-connected grid in the official order: all vertical edges, then all horizontal ones; src < dst."""
    idx = torch.arange(height * width, device=device).reshape(height, width)
    src = torch.cat([idx[:-1, :].reshape(-1), idx[:, :-1].reshape(-1)])
    dst = torch.cat([idx[1:, :].reshape(-1), idx[:, 1:].reshape(-1)])
    return src, dst


def grid_weights(guide: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of guide vectors (B, C, H, W) across every grid edge -> (B, E) float32.

    Edge order matches `grid_edges`. float32 throughout, channels added one after the other
    (no fused multiply-add), as the official `norm2_distance` on a float32 guide.
    """
    b, c, h, w = guide.shape
    g = guide.float()
    vert = torch.zeros(b, max(h - 1, 0), w, device=guide.device)
    horiz = torch.zeros(b, h, max(w - 1, 0), device=guide.device)
    for ch in range(c):
        vert = vert + (g[:, ch, 1:, :] - g[:, ch, :-1, :]).square()
        horiz = horiz + (g[:, ch, :, 1:] - g[:, ch, :, :-1]).square()
    return torch.cat([vert.reshape(b, -1), horiz.reshape(b, -1)], dim=1)


def mst_keys(weight: torch.Tensor) -> torch.Tensor:
    """The official MST's comparison key of float32 weights: fl32(w + 1)."""
    return weight + torch.ones((), dtype=torch.float32, device=weight.device)


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


def mst_reference(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Grid edge ids (B, N-1) of every image's official MST, in (key, id) order: stable sort, plain-Python Kruskal."""
    src, dst = grid_edges(height, width, weight.device)
    perm = torch.sort(mst_keys(weight), dim=1, stable=True)[1]
    s, d = src[perm].cpu().numpy(), dst[perm].cpu().numpy()
    accepted = [torch.from_numpy(kruskal_reference(s[b], d[b], height * width)[0]) for b in range(s.shape[0])]
    return perm.gather(1, torch.stack(accepted).to(perm.device))


def build_tree_reference(guide: torch.Tensor) -> Tree:
    """torch backend: float32 grid weights, official MST, then the KRT of its edges in (weight, id) order."""
    bsz, _, h, w = guide.shape
    src, dst = grid_edges(h, w, guide.device)
    weight = grid_weights(guide)
    ids = mst_reference(weight, h, w).sort(dim=1)[0]  # by edge id: the stable sort below breaks ties by id
    return _tree_reference(src[ids], dst[ids], weight.gather(1, ids).double(), h, w)


def reweight_reference(edges: torch.Tensor, features: torch.Tensor) -> Tree:
    """torch backend: the given MST edges with weights from `features`, KRT rebuilt by Kruskal."""
    src, dst = edges[:, :, 0], edges[:, :, 1]
    return _tree_reference(src, dst, pair_weights(features, src, dst), *features.shape[2:])


# ----------------------------------------------------------------------------------------------
# cpu (numba): images in parallel, each image's stages sequential


@numba.njit(parallel=True, cache=True)
def _grid_weights_cpu(guide, out):
    bsz, c, h, w = guide.shape
    nv = (h - 1) * w
    for row in numba.prange(bsz * h):  # image rows in parallel: a batch of one still uses every thread
        b = row // h
        r = row % h
        for col in range(w):
            if r + 1 < h:
                acc = np.float32(0.0)
                for ch in range(c):
                    d = guide[b, ch, r + 1, col] - guide[b, ch, r, col]
                    acc += d * d
                out[b, r * w + col] = acc
            if col + 1 < w:
                acc = np.float32(0.0)
                for ch in range(c):
                    d = guide[b, ch, r, col + 1] - guide[b, ch, r, col]
                    acc += d * d
                out[b, nv + r * (w - 1) + col] = acc


def grid_weights_cpu(guide: np.ndarray) -> np.ndarray:
    """numba version of `grid_weights` (float32, same rounding: numba contracts no multiply-add) -> (B, E) float32."""
    bsz, _, h, w = guide.shape
    out = np.empty((bsz, h * (w - 1) + (h - 1) * w), dtype=np.float32)
    _grid_weights_cpu(np.ascontiguousarray(guide, dtype=np.float32), out)
    return out


MST_DIGIT = 11
MST_PASSES = 3  # 3 * 11 = 33 >= the 31 bits of a non-negative float32


@numba.njit(cache=True)
def _mst_grid(weight, h, w, words, tmp, union_find, horizontal, src, dst, altitude):
    """One image: the official MST of the grid, its edges in (key, id) order with their float32 weights.

    words = key bits << 32 | direction << 31 | first pixel, key = fl32(weight + 1) (non-negative
    floats order like their bits); the low 32 bits order like the official edge id (vertical
    edges first, then by first pixel, which grows with the id) and give both endpoints without
    a division. A stable LSD radix sort of the key bits (11-bit digits, a pass skipped where
    every key shares the digit), then Kruskal with union by size and path halving.
    `horizontal` (N,) float32 scratch holds the horizontal weights by first pixel.
    """
    m = weight.shape[0]
    n = h * w
    if m == 0:
        return
    key = tmp.view(np.float32)[:m]  # tmp is free until the sort: the keys, as float32
    for e in range(m):
        key[e] = weight[e] + np.float32(1.0)
    bits = key.view(np.int32)
    nv = (h - 1) * w
    for e in range(nv):
        words[e] = (np.int64(bits[e]) << 32) | e
    e = nv
    for r in range(h):
        for c in range(w - 1):
            p = r * w + c
            words[e] = (np.int64(bits[e]) << 32) | (1 << 31) | p
            horizontal[p] = weight[e]
            e += 1
    radix = 1 << MST_DIGIT
    mask = radix - 1
    counts = np.zeros((MST_PASSES, radix), dtype=np.int64)
    for e in range(m):
        k = words[e] >> 32
        for d in range(MST_PASSES):
            counts[d, (k >> (d * MST_DIGIT)) & mask] += 1
    flips = 0
    for d in range(MST_PASSES):
        shift = 32 + d * MST_DIGIT
        c = counts[d]
        if c[(words[0] >> shift) & mask] == m:
            continue
        acc = 0
        for j in range(radix):
            cj = c[j]
            c[j] = acc
            acc += cj
        sw, dw = (words, tmp) if flips % 2 == 0 else (tmp, words)
        for e in range(m):
            x = sw[e]
            j = (x >> shift) & mask
            dw[c[j]] = x
            c[j] += 1
        flips += 1
    if flips % 2 == 1:
        words[:] = tmp
    parent, comp = union_find[0], union_find[1]
    for i in range(n):
        parent[i] = i
        comp[i] = 1
    t = 0
    for j in range(m):
        if t == n - 1:
            break
        low = words[j] & 0xFFFFFFFF
        a = low & 0x7FFFFFFF
        across = low >> 31
        b = a + 1 if across else a + w
        ra = _find(parent, a)
        rb = _find(parent, b)
        if ra == rb:
            continue
        src[t] = a
        dst[t] = b
        altitude[t] = horizontal[a] if across else weight[a]
        if comp[ra] < comp[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        comp[ra] += comp[rb]
        t += 1


@numba.njit(parallel=True, cache=True)
def _mst_batch(weight, h, w, words, union_find, horizontal, src, dst, altitude):
    for b in numba.prange(weight.shape[0]):
        _mst_grid(weight[b], h, w, words[b, 0], words[b, 1], union_find[b], horizontal[b], src[b], dst[b], altitude[b])


def mst_cpu(weight: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst (B, N-1) int64, weight (B, N-1) float64) of every image's official MST, in (key, id) order."""
    bsz, m = weight.shape
    n = height * width
    src = np.empty((bsz, n - 1), dtype=np.int64)
    dst = np.empty((bsz, n - 1), dtype=np.int64)
    altitude = np.empty((bsz, n - 1), dtype=np.float64)
    words = np.empty((bsz, 2, m), dtype=np.int64)
    union_find = np.empty((bsz, 2, n), dtype=np.int32)
    horizontal = np.empty((bsz, n), dtype=np.float32)
    _mst_batch(np.ascontiguousarray(weight), height, width, words, union_find, horizontal, src, dst, altitude)
    return src, dst, altitude


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
    ordered = True
    for e in range(m):
        keys[e] = bits[e]
        vals[e] = src[e] | (dst[e] << 32)
        ordered = ordered and (e == 0 or bits[e - 1] <= bits[e])
    if ordered:  # already in order (the MST edges of a continuous guide often are): nothing to move
        return
    radix = 1 << RADIX_BITS
    mask = radix - 1
    counts = np.zeros((RADIX_PASSES, radix), dtype=np.int64)
    for e in range(m):
        k = bits[e]
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
    """KRT of given spanning-tree edges: batched stable radix sort by weight, Kruskal and leaf ranges with numba.

    src/dst (B, N-1) int64 tree edges, weight (B, N-1) float64 >= 0; ties keep the given order.
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
    with stage("krt"):
        _kruskal_batch(sort_buf, n, union_find, edges, altitude, children, hi)
    with stage("leaf ranges"):
        _ranges_batch(children, n, order, lo, hi)
    return Tree(height, width, *(torch.from_numpy(a) for a in (edges, altitude, children, order, lo, hi)))


def build_tree_cpu(guide: torch.Tensor, stage: Stage = no_stage) -> Tree:
    """cpu backend: numba float32 grid weights, official MST, then radix sort, Kruskal and leaf ranges of its edges."""
    _, _, h, w = guide.shape
    g = guide.detach().float().numpy()
    with stage("weights"):
        weight = grid_weights_cpu(g)
    with stage("mst"):
        src, dst, altitude = mst_cpu(weight, h, w)
    return tree_cpu(src, dst, altitude, h, w, stage)


def reweight_cpu(edges: torch.Tensor, features: torch.Tensor) -> Tree:
    """cpu backend: `pair_weights`, then the numba sort / Kruskal / leaf ranges over the N-1 given edges."""
    src, dst = edges[:, :, 0], edges[:, :, 1]
    weight = pair_weights(features, src, dst)
    return tree_cpu(src.numpy(), dst.numpy(), weight.numpy(), *features.shape[2:])
