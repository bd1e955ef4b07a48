"""GP tree build: Kruskal over weight-sorted edges, giving the MST and its Kruskal reconstruction tree.

KRT node ids (design 3.2): leaves 0..N-1 are the pixels (row-major), internal node N+t is
created by the t-th successful union. For one image and edges already sorted by ascending
weight (stable, so every implementation sees the same ties in the same order), each
implementation returns the same four arrays:

- accepted (N-1,): position in the sorted edge list of each MST edge, in creation order;
- children (N-1, 2): KRT ids of the components joined by node N+t, the component of the
  edge's first endpoint first;
- lo (2N-1,): first leaf position of every node's range in the KRT DFS leaf order (left
  child first); a node's range is [lo, lo + size);
- size (2N-1,): number of leaves under every node.

(`kruskal_cpu` sorts by itself and returns the Tree fields directly: MST edges, altitudes,
children, leaf order, lo, hi.)

The leaf order is found without recursion: subtree sizes in creation order, then lo offsets
in reverse creation order (a parent is always created after its children).

Implementations: `kruskal_reference` (plain Python, the readable one), `kruskal_cpu` (numba,
the fast CPU path, images in parallel) and `kruskal_triton` (one Triton program per image,
parent array in global memory, path halving).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch here
    triton = None


def grid_edges(height: int, width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints (src, dst) of the 4-connected grid: all horizontal edges, then all vertical ones."""
    idx = torch.arange(height * width, device=device).reshape(height, width)
    src = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    dst = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return src, dst


def grid_edges_cpu(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of `grid_edges`."""
    idx = np.arange(height * width, dtype=np.int64).reshape(height, width)
    src = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    dst = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
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


@numba.njit(parallel=True, cache=True)
def _grid_weights_cpu(guide, out):
    bsz, c, h, w = guide.shape
    nh = h * (w - 1)
    for b in numba.prange(bsz):
        for r in range(h):
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


def stable_argsort_cpu(weight: np.ndarray) -> np.ndarray:
    """Stable ascending argsort along the last axis of non-negative float64 weights.

    Non-negative IEEE doubles order like their bit patterns read as int64, and the integer
    stable sort is about twice as fast; the permutation equals torch.sort(stable=True)'s.
    """
    return np.argsort(weight.view(np.int64), axis=-1, kind="stable")


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


# ----------------------------------------------------------------------------------------------
# reference


def kruskal_reference(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Kruskal + KRT + leaf ranges for one image, in plain Python (edges sorted by weight)."""
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


# ----------------------------------------------------------------------------------------------
# cpu (numba)


@numba.njit(cache=True)
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@numba.njit(cache=True)
def _kruskal_one(src, dst, perm, weight, n, edges, altitude, children, order, lo, hi):
    parent = np.arange(n)
    rank = np.zeros(n, dtype=np.int32)
    top = np.arange(n)
    t = 0
    for j in range(perm.shape[0]):
        if t == n - 1:
            break
        e = perm[j]
        ra = _find(parent, src[e])
        rb = _find(parent, dst[e])
        if ra == rb:
            continue
        children[t, 0] = top[ra]
        children[t, 1] = top[rb]
        edges[t, 0] = src[e]
        edges[t, 1] = dst[e]
        altitude[t] = weight[e]
        if rank[ra] < rank[rb]:  # union by rank; `top` keeps the KRT identity
            ra, rb = rb, ra
        elif rank[ra] == rank[rb]:
            rank[ra] += 1
        parent[rb] = ra
        top[ra] = n + t
        t += 1
    size = hi  # sizes first, turned into range ends below
    size[:n] = 1
    for t in range(n - 1):
        size[n + t] = size[children[t, 0]] + size[children[t, 1]]
    lo[2 * n - 2] = 0
    for t in range(n - 2, -1, -1):
        ca = children[t, 0]
        lo[ca] = lo[n + t]
        lo[children[t, 1]] = lo[n + t] + size[ca]
    for u in range(2 * n - 1):
        hi[u] += lo[u]
    for i in range(n):
        order[lo[i]] = i


@numba.njit(parallel=True, cache=True)
def _kruskal_batch(src, dst, perm, weight, n, edges, altitude, children, order, lo, hi):
    for b in numba.prange(perm.shape[0]):
        _kruskal_one(src[b], dst[b], perm[b], weight[b], n, edges[b], altitude[b], children[b], order[b], lo[b], hi[b])


def kruskal_cpu(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Batched sort + Kruskal + KRT + leaf order with numba, straight to the Tree fields.

    src/dst (B, E) int64 edges in any order (a broadcast view is fine), weight (B, E) float64 >= 0.
    Returns edges (B, N-1, 2), altitude (B, N-1), children (B, N-1, 2), order (B, N), lo, hi (B, 2N-1).
    """
    bsz = weight.shape[0]
    perm = stable_argsort_cpu(weight)
    edges = np.empty((bsz, n - 1, 2), dtype=np.int64)
    altitude = np.empty((bsz, n - 1), dtype=np.float64)
    children = np.empty((bsz, n - 1, 2), dtype=np.int64)
    order = np.empty((bsz, n), dtype=np.int64)
    lo = np.empty((bsz, 2 * n - 1), dtype=np.int64)
    hi = np.empty((bsz, 2 * n - 1), dtype=np.int64)
    src, dst = np.ascontiguousarray(src), np.ascontiguousarray(dst)
    _kruskal_batch(src, dst, perm, weight, n, edges, altitude, children, order, lo, hi)
    return edges, altitude, children, order, lo, hi


# ----------------------------------------------------------------------------------------------
# triton

if triton is not None:

    @triton.jit
    def _find_triton(parent, x):
        p = tl.load(parent + x, volatile=True)
        while p != x:
            gp = tl.load(parent + p, volatile=True)
            tl.store(parent + x, gp)  # path halving
            tl.debug_barrier()
            x = gp
            p = tl.load(parent + x, volatile=True)
        return x

    @triton.jit
    def _kruskal_kernel(src, dst, num_edges, n, parent, top, accepted, children, lo, size, BLOCK: tl.constexpr):
        """One program = one image; scalar, sequential union-find (the only sequential step)."""
        b = tl.program_id(0).to(tl.int64)
        src += b * num_edges
        dst += b * num_edges
        parent += b * n
        top += b * n
        accepted += b * (n - 1)
        children += b * (2 * n - 2)
        lo += b * (2 * n - 1)
        size += b * (2 * n - 1)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(parent + offs, offs.to(tl.int64), mask=offs < n)
            tl.store(top + offs, offs.to(tl.int64), mask=offs < n)
            tl.store(size + offs, tl.full([BLOCK], 1, tl.int64), mask=offs < n)
        tl.debug_barrier()

        t = tl.zeros((), tl.int64)
        for e in range(num_edges):
            ra = _find_triton(parent, tl.load(src + e))
            rb = _find_triton(parent, tl.load(dst + e))
            if ra != rb:
                tl.store(children + 2 * t, tl.load(top + ra, volatile=True))
                tl.store(children + 2 * t + 1, tl.load(top + rb, volatile=True))
                tl.store(accepted + t, t * 0 + e)
                tl.store(parent + rb, ra)
                tl.store(top + ra, n + t)
                tl.debug_barrier()
                t += 1

        for u in range(n - 1):
            ca = tl.load(children + 2 * u, volatile=True)
            cb = tl.load(children + 2 * u + 1, volatile=True)
            s = tl.load(size + ca, volatile=True) + tl.load(size + cb, volatile=True)
            tl.store(size + n + u, s)
            tl.debug_barrier()
        tl.store(lo + 2 * n - 2, tl.zeros((), tl.int64))
        tl.debug_barrier()
        for i in range(n - 1):
            u = n - 2 - i
            ca = tl.load(children + 2 * u, volatile=True)
            cb = tl.load(children + 2 * u + 1, volatile=True)
            base = tl.load(lo + n + u, volatile=True)
            tl.store(lo + ca, base)
            tl.store(lo + cb, base + tl.load(size + ca, volatile=True))
            tl.debug_barrier()


def kruskal_triton(src: torch.Tensor, dst: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Batched Kruskal + KRT + leaf ranges, one Triton program per image; src/dst (B, E) int64 sorted."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package")
    bsz, num_edges = src.shape
    dev = src.device
    parent = torch.empty(bsz, n, dtype=torch.int64, device=dev)
    top = torch.empty(bsz, n, dtype=torch.int64, device=dev)
    accepted = torch.zeros(bsz, n - 1, dtype=torch.int64, device=dev)
    children = torch.zeros(bsz, n - 1, 2, dtype=torch.int64, device=dev)
    lo = torch.zeros(bsz, 2 * n - 1, dtype=torch.int64, device=dev)
    size = torch.zeros(bsz, 2 * n - 1, dtype=torch.int64, device=dev)
    if n > 1:
        _kruskal_kernel[(bsz,)](
            src.contiguous(), dst.contiguous(), num_edges, n, parent, top, accepted, children, lo, size,
            BLOCK=256, num_warps=1,
        )
    else:
        size.fill_(1)
    return accepted, children, lo, size
