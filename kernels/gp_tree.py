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
def _kruskal_sorted(keys, vals, n, union_find, edges, altitude, children, order, lo, hi):
    """One image, edges sorted by `_sort_edges`: Kruskal, then ranges and leaf order.

    Union by size gives every KRT node's leaf count as it is created; one pass in reverse
    creation order then sets lo/hi of both children of every node and the leaf order.
    union_find (3, N) int32 is scratch.
    """
    weight = keys.view(np.float64)
    parent, comp, top = union_find[0], union_find[1], union_find[2]
    for i in range(n):
        parent[i] = i
        comp[i] = 1  # component sizes (union by size)
        top[i] = i  # KRT node standing for each union-find root
    size = hi  # leaf counts first, turned into range ends below
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
def _kruskal_batch(src, dst, bits, n, sort_buf, union_find, edges, altitude, children, order, lo, hi):
    """Images in parallel: radix sort, then Kruskal and the leaf ranges (scratch passed in)."""
    for b in numba.prange(bits.shape[0]):
        keys, vals = sort_buf[b, 0], sort_buf[b, 1]
        _sort_edges(src[b], dst[b], bits[b], keys, vals, sort_buf[b, 2], sort_buf[b, 3])
        _kruskal_sorted(keys, vals, n, union_find[b], edges[b], altitude[b], children[b], order[b], lo[b], hi[b])


def kruskal_cpu(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Batched sort + Kruskal + KRT + leaf order with numba, straight to the Tree fields.

    src/dst (B, E) int64 edges in any order (a broadcast view is fine), weight (B, E) float64 >= 0.
    Returns edges (B, N-1, 2), altitude (B, N-1), children (B, N-1, 2), order (B, N), lo, hi (B, 2N-1).
    N < 2**31 (endpoints are packed in one int64, union-find arrays are int32). All memory is
    allocated here by numpy, which asks for huge pages; numba's own allocations of the same
    scratch fault in 4 KiB pages and were measurably slower.
    """
    bsz, m = weight.shape
    edges = np.empty((bsz, n - 1, 2), dtype=np.int64)
    altitude = np.empty((bsz, n - 1), dtype=np.float64)
    children = np.empty((bsz, n - 1, 2), dtype=np.int64)
    order = np.empty((bsz, n), dtype=np.int64)
    lo = np.empty((bsz, 2 * n - 1), dtype=np.int64)
    hi = np.empty((bsz, 2 * n - 1), dtype=np.int64)
    sort_buf = np.empty((bsz, 4, m), dtype=np.int64)
    union_find = np.empty((bsz, 3, n), dtype=np.int32)
    src, dst, weight = (np.ascontiguousarray(a) for a in (src, dst, weight))
    _kruskal_batch(src, dst, weight.view(np.int64), n, sort_buf, union_find, edges, altitude, children, order, lo, hi)
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
