"""GP propagation over a Kruskal reconstruction tree (KRT), all channels at once.

For leaf i, every pixel j meets i first at their lowest common KRT ancestor u, whose altitude
w_u is the largest edge on the MST path (the minimax distance), so with a_u = exp(-w_u / zeta^2)
(`node_affinity`, the one place zeta enters)

    sum_j psi(i, j) phi_j = phi_i + sum_{u ancestor of i} a_u * S(sibling side of i at u).

With leaves in KRT DFS order and prefix sums P, the subtree sums are S = P[hi] - P[lo]; each
internal node u with children A = [lo, mid) and B = [mid, hi) adds a_u S_B over A and a_u S_A
over B, i.e. three point updates of a difference array (+a S_B at lo, +a (S_A - S_B) at mid,
-a S_A at hi) whose prefix sum is the per-leaf total. The same with phi = 1 gives the
normaliser. Sums are float64; the output has the unary's dtype. docs/kernels.md has the
derivation and the backends.

One signature for the three implementations (one image per batch row, N pixels):
propagate(unary (B, K, N) float, order (B, N) pixel at each leaf position, lo / hi (B, 2N-1)
leaf ranges, children (B, N-1, 2), altitude (B, N-1), zeta > 0) -> (B, K, N).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ._triton import INTERPRETED, tl, triton


def node_ranges(lo: torch.Tensor, hi: torch.Tensor, children: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(lo, mid, hi) of every internal node: its range and the split between its two children."""
    n = children.shape[1] + 1
    return lo[:, n:], hi.gather(1, children[:, :, 0]), hi[:, n:]


def node_affinity(altitude: torch.Tensor, zeta: float) -> torch.Tensor:
    """a_u = exp(-w_u / zeta^2) of every internal node (B, N-1), float64, for every backend.

    zeta is the `zeta` of `maskclip_apro.apro.propagate`: refine.apro.zeta_g in pass 1, zeta_h in
    the second pass.
    """
    return torch.exp(-altitude.double() / zeta**2)


# ----------------------------------------------------------------------------------------------
# reference


def propagate_reference(unary, order, lo, hi, children, altitude, zeta: float) -> torch.Tensor:
    """Vectorised torch version, literally: ones channel, prefix sums, difference array."""
    bsz, k, n = unary.shape
    idx = order[:, None, :].expand(bsz, k + 1, n)
    x = torch.cat([unary.double(), torch.ones(bsz, 1, n, dtype=torch.float64, device=unary.device)], 1)
    x = x.gather(2, idx)  # leaf order
    prefix = torch.nn.functional.pad(x.cumsum(2), (1, 0))  # P[p] = sum of the first p leaves
    l, m, h = (r[:, None, :].expand(bsz, k + 1, n - 1) for r in node_ranges(lo, hi, children))
    a = node_affinity(altitude, zeta)[:, None, :]
    s_a = prefix.gather(2, m) - prefix.gather(2, l)
    s_b = prefix.gather(2, h) - prefix.gather(2, m)
    diff = torch.zeros(bsz, k + 1, n + 1, dtype=torch.float64, device=unary.device)
    diff.scatter_add_(2, l, a * s_b)
    diff.scatter_add_(2, m, a * (s_a - s_b))
    diff.scatter_add_(2, h, -a * s_a)
    total = x + diff.cumsum(2)[:, :, :n]
    y = total[:, :k] / total[:, k:]
    return torch.empty_like(unary).scatter_(2, idx[:, :k], y.to(unary.dtype))


# ----------------------------------------------------------------------------------------------
# cpu (numba)


@numba.njit(parallel=True, cache=True)
def _node_tables(children, lo, hi, affinity, scratch, tl_lo, tl_mid, tl_hi, tl_a, inv_den):
    """Internal nodes in DFS preorder (for cache locality) with their affinities, and 1 / normaliser
    per leaf position.

    scratch (B, 2N-1) float64 holds each image's preorder positions, then its difference array.
    """
    bsz, m = children.shape[0], children.shape[1]
    n = m + 1
    for b in numba.prange(bsz):
        pre = scratch[b].view(np.int64)
        pre[2 * n - 2] = 0
        for t in range(m - 1, -1, -1):
            u = n + t
            ca = children[b, t, 0]
            pre[ca] = pre[u] + 1
            pre[children[b, t, 1]] = pre[u] + 2 * (hi[b, ca] - lo[b, ca])
            r = pre[u] - lo[b, u]  # preorder rank among internal nodes
            tl_lo[b, r] = lo[b, u]
            tl_mid[b, r] = hi[b, ca]
            tl_hi[b, r] = hi[b, u]
            tl_a[b, r] = affinity[b, t]
        diff = scratch[b, : n + 1]
        diff[:] = 0.0
        for r in range(m):
            l, mid, h, a = tl_lo[b, r], tl_mid[b, r], tl_hi[b, r], tl_a[b, r]
            s_a = mid - l
            s_b = h - mid
            diff[l] += a * s_b
            diff[mid] += a * (s_a - s_b)
            diff[h] -= a * s_a
        acc = 0.0
        for p in range(n):
            acc += diff[p]
            inv_den[b, p] = 1.0 / (1.0 + acc)


@numba.njit(parallel=True, cache=True)
def _propagate_channels(phi, order, tl_lo, tl_mid, tl_hi, tl_a, inv_den, out, scratch):
    """One channel at a time per thread (thread c takes the c-th slice of the B*K channels).

    Per channel: prefix sums in leaf order, with the difference array initialised to the
    differences of consecutive leaf values so that its running sum includes phi itself (the
    last pass then reads no phi: ~8% faster; float64 rounding of these differences is far
    below the prefix sums'); the three point updates of every node in preorder; one running
    sum scattered back. One channel's prefix and difference arrays (16 N bytes) stay close to
    a core's L2: several channels per node sweep (channel-last blocks) was slower here.
    """
    bsz, k, n = phi.shape
    m = n - 1
    work = bsz * k
    chunks = scratch.shape[0]
    for c in numba.prange(chunks):
        prefix = scratch[c, 0]
        diff = scratch[c, 1]
        for wi in range(c * work // chunks, (c + 1) * work // chunks):
            b = wi // k
            x = phi[b, wi % k]
            y = out[b, wi % k]
            o = order[b]
            node_lo, node_mid, node_hi, node_a, den = tl_lo[b], tl_mid[b], tl_hi[b], tl_a[b], inv_den[b]
            prefix[0] = 0.0
            s = 0.0
            prev = 0.0
            for p in range(n):
                v = np.float64(x[o[p]])
                s += v
                prefix[p + 1] = s
                diff[p] = v - prev  # the running sum below then starts from phi itself
                prev = v
            diff[n] = 0.0
            for r in range(m):
                l, mid, h, a = node_lo[r], node_mid[r], node_hi[r], node_a[r]
                p_mid = prefix[mid]
                s_a = p_mid - prefix[l]
                s_b = prefix[h] - p_mid
                diff[l] += a * s_b
                diff[mid] += a * (s_a - s_b)
                diff[h] -= a * s_a
            acc = 0.0
            for p in range(n):
                acc += diff[p]
                y[o[p]] = acc * den[p]


def propagate_cpu(unary, order, lo, hi, children, altitude, zeta: float) -> torch.Tensor:
    """numba: node tables once per image, then channels in parallel with O(N) scratch per thread.

    Scratch is allocated by numpy (huge pages) rather than inside the kernels (4 KiB faults).
    """
    bsz, k, n = unary.shape
    work_dtype = unary.dtype if unary.dtype in (torch.float32, torch.float64) else torch.float32
    phi = unary.to(work_dtype).contiguous().numpy()
    m = n - 1
    tl_lo = np.empty((bsz, m), dtype=np.int32)
    tl_mid = np.empty((bsz, m), dtype=np.int32)
    tl_hi = np.empty((bsz, m), dtype=np.int32)
    tl_a = np.empty((bsz, m), dtype=np.float64)
    inv_den = np.empty((bsz, n), dtype=np.float64)
    _node_tables(
        children.numpy(), lo.numpy(), hi.numpy(), node_affinity(altitude, zeta).numpy(),
        np.empty((bsz, 2 * n - 1)), tl_lo, tl_mid, tl_hi, tl_a, inv_den,
    )
    out = np.empty_like(phi)
    chunks = max(1, min(bsz * k, numba.get_num_threads()))
    scratch = np.empty((chunks, 2, n + 1))
    _propagate_channels(phi, order.to(torch.int32).numpy(), tl_lo, tl_mid, tl_hi, tl_a, inv_den, out, scratch)
    return torch.from_numpy(out).to(unary.dtype)


# ----------------------------------------------------------------------------------------------
# triton


def contribution_tables(order, lo, hi, children, altitude, zeta: float) -> tuple[torch.Tensor, ...]:
    """Per-tree tables of the Triton path, built once for all channels (torch, deterministic).

    Each internal node's three point updates become four contributions c * (P[i] - P[j]), the
    update at mid split in two:

        target lo:  +a (P[hi] - P[mid])      target mid: +a (P[mid] - P[lo]) and -a (P[hi] - P[mid])
        target hi:  -a (P[mid] - P[lo])

    sorted by target position (ties in a fixed order). The running sum of the sorted values up
    to the last contribution with target p is the difference array's prefix sum at p, so no
    difference array (and no atomic) is needed. Every position 0 <= p < N is a target (p = 0
    is the root's lo, p >= 1 the mid of the lowest common ancestor of leaves p - 1 and p).
    Returns (order int32 (B, N), i, j int32 (B, 4(N-1)), c float64, dest int32): dest is the
    target where a group's last contribution leaves the running sum, -1 elsewhere.
    """
    l, m, h = node_ranges(lo, hi, children)
    a = node_affinity(altitude, zeta)
    target, perm = torch.sort(torch.cat([l, m, m, h], 1), dim=1, stable=True)
    i = torch.cat([h, m, h, m], 1).gather(1, perm)
    j = torch.cat([m, l, m, l], 1).gather(1, perm)
    c = torch.cat([a, a, -a, -a], 1).gather(1, perm)
    last = torch.ones_like(target, dtype=torch.bool)
    last[:, :-1] = target[:, 1:] != target[:, :-1]
    dest = torch.where(last, target, -1)
    as32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    return as32(order), as32(i), as32(j), c.contiguous(), as32(dest)


def _block(total: int, device_block: int = 1024) -> int:
    """Elements per program: `device_block` on a GPU; under the interpreter as few programs as possible."""
    return min(triton.next_power_of_2(max(total, 1)), 1 << 16) if INTERPRETED else device_block


if triton is not None:

    @triton.jit
    def _leaf_values(unary, order, r, k, k_total, c0, n, p, mask):
        """(pixel, float64 value) at leaf positions p of row r (image r // k, channel c0 + r % k)."""
        b = r // k
        pix = tl.load(order + b * n + p, mask=mask, other=0)
        row = unary + (b * k_total + c0 + r - b * k) * n
        return pix, tl.load(row + pix, mask=mask, other=0.0).to(tl.float64)

    @triton.jit
    def _contrib_values(prefix, ci, cj, cc, r, k, n, length, q, mask):
        """Values c * (P[i] - P[j]) of the sorted contributions q of row r."""
        b = r // k
        i = tl.load(ci + b * length + q, mask=mask, other=0)
        j = tl.load(cj + b * length + q, mask=mask, other=0)
        c = tl.load(cc + b * length + q, mask=mask, other=0.0)
        row = prefix + r * (n + 1)
        return c * (tl.load(row + i, mask=mask, other=0.0) - tl.load(row + j, mask=mask, other=0.0))

    @triton.jit
    def _tiles_before(sums, r, t, n_tiles, TILES: tl.constexpr):
        """Sum of the tile sums of row r before tile t, always added in the same order."""
        idx = tl.arange(0, TILES)
        return tl.sum(tl.load(sums + r * n_tiles + idx, mask=idx < t, other=0.0), axis=0)

    @triton.jit
    def _leaf_sums_kernel(unary, order, sums, n, k, k_total, c0, n_tiles, BLOCK: tl.constexpr):
        """Program (tile, row): the sum of the row's leaf values in the tile."""
        t = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        p = t * BLOCK + tl.arange(0, BLOCK)
        _, x = _leaf_values(unary, order, r, k, k_total, c0, n, p, p < n)
        tl.store(sums + r * n_tiles + t, tl.sum(x, axis=0))

    @triton.jit
    def _prefix_kernel(unary, order, sums, prefix, n, k, k_total, c0, n_tiles, BLOCK: tl.constexpr,
                       TILES: tl.constexpr):
        """Program (tile, row): prefix sums P[p + 1] of the leaf values (P[0] = 0)."""
        t = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        p = t * BLOCK + tl.arange(0, BLOCK)
        mask = p < n
        _, x = _leaf_values(unary, order, r, k, k_total, c0, n, p, mask)
        row = prefix + r * (n + 1)
        tl.store(row + p + 1, _tiles_before(sums, r, t, n_tiles, TILES) + tl.cumsum(x, axis=0), mask=mask)
        tl.store(row + p, tl.zeros([BLOCK], tl.float64), mask=p == 0)

    @triton.jit
    def _contrib_sums_kernel(prefix, ci, cj, cc, sums, n, k, length, n_tiles, BLOCK: tl.constexpr):
        """Program (tile, row): the sum of the row's contribution values in the tile."""
        t = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        q = t * BLOCK + tl.arange(0, BLOCK)
        v = _contrib_values(prefix, ci, cj, cc, r, k, n, length, q, q < length)
        tl.store(sums + r * n_tiles + t, tl.sum(v, axis=0))

    @triton.jit
    def _contrib_scan_kernel(prefix, ci, cj, cc, dest, sums, acc, n, k, length, n_tiles, BLOCK: tl.constexpr,
                             TILES: tl.constexpr):
        """Program (tile, row): running sums of the row's contribution values; the one at each target
        group's last contribution goes to acc[target] (the difference array's prefix sum there)."""
        t = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        b = r // k
        q = t * BLOCK + tl.arange(0, BLOCK)
        mask = q < length
        v = _contrib_values(prefix, ci, cj, cc, r, k, n, length, q, mask)
        at = tl.load(dest + b * length + q, mask=mask, other=-1)
        running = _tiles_before(sums, r, t, n_tiles, TILES) + tl.cumsum(v, axis=0)
        tl.store(acc + r * (n + 1) + at, running, mask=mask & (at >= 0))

    @triton.jit
    def _output_kernel(unary, order, acc, scale, out, n, k, k_total, c0, BLOCK: tl.constexpr):
        """Program (tile, row): (phi + acc) * scale at every leaf position, written at the leaf's pixel."""
        t = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        b = r // k
        p = t * BLOCK + tl.arange(0, BLOCK)
        mask = p < n
        pix, x = _leaf_values(unary, order, r, k, k_total, c0, n, p, mask)
        d = tl.load(acc + r * (n + 1) + p, mask=mask, other=0.0)
        y = (x + d) * tl.load(scale + b * n + p, mask=mask, other=0.0)
        tl.store(out + (b * k_total + c0 + r - b * k) * n + pix, y.to(out.dtype.element_ty), mask=mask)


def _propagate_rows(unary, tables, scale, out, c0: int, k: int) -> None:
    """out[:, c0:c0+k] = (phi + sum of contributions) * scale for channels c0..c0+k of `unary` (B, K, N).

    Five launches, each over (tile, image * channel): leaf tile sums, leaf prefix sums P,
    contribution tile sums, contribution running sums (kept at each target), output. Every sum is a fixed tree of
    additions (tl.sum / tl.cumsum within a tile, the tile sums before it in index order), so
    the result does not depend on scheduling.
    """
    order, ci, cj, cc, dest = tables
    bsz, k_total, n = unary.shape
    length = ci.shape[1]
    rows = bsz * k
    dev = unary.device
    block = _block(n)
    tiles = triton.cdiv(n, block)
    sums = torch.empty(rows, tiles, dtype=torch.float64, device=dev)
    prefix = torch.empty(rows, n + 1, dtype=torch.float64, device=dev)
    grid = (tiles, rows)
    _leaf_sums_kernel[grid](unary, order, sums, n, k, k_total, c0, tiles, BLOCK=block)
    _prefix_kernel[grid](unary, order, sums, prefix, n, k, k_total, c0, tiles, BLOCK=block,
                         TILES=triton.next_power_of_2(tiles))
    cblock = _block(length, 4096)
    ctiles = triton.cdiv(length, cblock)
    csums = torch.empty(rows, ctiles, dtype=torch.float64, device=dev)
    acc = torch.empty_like(prefix)
    cgrid = (ctiles, rows)
    _contrib_sums_kernel[cgrid](prefix, ci, cj, cc, csums, n, k, length, ctiles, BLOCK=cblock)
    _contrib_scan_kernel[cgrid](prefix, ci, cj, cc, dest, csums, acc, n, k, length, ctiles, BLOCK=cblock,
                                TILES=triton.next_power_of_2(ctiles))
    _output_kernel[grid](unary, order, acc, scale, out, n, k, k_total, c0, BLOCK=block)


CHUNK_BYTES = 1 << 32  # float64 temporaries of one channel chunk (P and acc: 16 bytes per pixel and channel)


def propagate_triton(unary, order, lo, hi, children, altitude, zeta: float) -> torch.Tensor:
    """Triton: per-tree contribution tables once, then deterministic scans per channel; no atomics.

    The normaliser is the same computation on a ones channel with scale 1, kept in leaf order;
    channels go in chunks of at most CHUNK_BYTES of temporaries, so peak memory stays near the
    output's size for large batches. Bitwise reproducible run to run.
    """
    bsz, k, n = unary.shape
    if n == 1:
        return unary.clone()
    tables = contribution_tables(order, lo, hi, children, altitude, zeta)
    ones = torch.ones(bsz, 1, n, dtype=torch.float64, device=unary.device)
    den = torch.empty_like(ones)
    in_leaf_order = torch.arange(n, dtype=torch.int32, device=unary.device).expand(bsz, n).contiguous()
    _propagate_rows(ones, (in_leaf_order, *tables[1:]), ones[:, 0], den, 0, 1)
    inv_den = den[:, 0].reciprocal()
    phi = unary.contiguous()
    out = torch.empty_like(phi)
    step = max(1, CHUNK_BYTES // (16 * bsz * n))
    for c in range(0, k, step):
        _propagate_rows(phi, tables, inv_den, out, c, min(step, k - c))
    return out
