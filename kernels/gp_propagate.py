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

if triton is not None:

    @triton.jit
    def _range_add_kernel(prefix, node_lo, node_mid, node_hi, node_a, diff, m, n1, k, BLOCK: tl.constexpr):
        """Program (image * channel, node block): three float64 atomic point updates per node."""
        row = tl.program_id(0).to(tl.int64)
        b = row // k
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < m
        l = tl.load(node_lo + b * m + offs, mask=mask, other=0)
        mid = tl.load(node_mid + b * m + offs, mask=mask, other=0)
        h = tl.load(node_hi + b * m + offs, mask=mask, other=0)
        a = tl.load(node_a + b * m + offs, mask=mask, other=0.0)
        base = row * n1
        p_l = tl.load(prefix + base + l, mask=mask, other=0.0)
        p_m = tl.load(prefix + base + mid, mask=mask, other=0.0)
        p_h = tl.load(prefix + base + h, mask=mask, other=0.0)
        s_a = p_m - p_l
        s_b = p_h - p_m
        tl.atomic_add(diff + base + l, a * s_b, mask=mask)
        tl.atomic_add(diff + base + mid, a * (s_a - s_b), mask=mask)
        tl.atomic_add(diff + base + h, -a * s_a, mask=mask)


def _block(total: int) -> int:
    """Elements per program: 1024 on a GPU; under the interpreter as few programs as possible."""
    return min(triton.next_power_of_2(max(total, 1)), 1 << 16) if INTERPRETED else 1024


def _range_add_triton(prefix, l, m, h, a) -> torch.Tensor:
    bsz, k, n1 = prefix.shape
    diff = torch.zeros_like(prefix)
    block = _block(n1 - 2)
    grid = (bsz * k, triton.cdiv(n1 - 2, block))
    _range_add_kernel[grid](prefix, l, m, h, a, diff, n1 - 2, n1, k, BLOCK=block)
    return diff


CHUNK_BYTES = 1 << 32  # float64 temporaries of one channel chunk (about 40 bytes per pixel and channel)


def propagate_triton(unary, order, lo, hi, children, altitude, zeta: float) -> torch.Tensor:
    """Triton range-add kernel; gathers, float64 prefix sums (torch.cumsum) and the scatter in torch.

    The normaliser is computed once per image; channels go in chunks of at most CHUNK_BYTES of
    temporaries, so peak memory stays near the output's size for large batches.
    """
    bsz, k, n = unary.shape
    if n == 1:
        return unary.clone()
    l, m, h = (r.contiguous() for r in node_ranges(lo, hi, children))
    a = node_affinity(altitude, zeta).contiguous()
    ones = torch.arange(n + 1, dtype=torch.float64, device=unary.device).expand(bsz, 1, n + 1).contiguous()
    den = 1.0 + _range_add_triton(ones, l, m, h, a).cumsum(2)[:, :, :n]
    out = torch.empty_like(unary, memory_format=torch.contiguous_format)
    step = max(1, CHUNK_BYTES // (40 * bsz * n))
    for c in range(0, k, step):
        chunk = unary[:, c : c + step]
        idx = order[:, None, :].expand(bsz, chunk.shape[1], n)
        x = chunk.double().gather(2, idx)
        prefix = torch.nn.functional.pad(x.cumsum(2), (1, 0))
        y = (x + _range_add_triton(prefix, l, m, h, a).cumsum(2)[:, :, :n]) / den
        out[:, c : c + step].scatter_(2, idx, y.to(unary.dtype))
    return out
