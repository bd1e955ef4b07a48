"""GP tree build on the GPU, parallel in every stage, with no host reads: Triton kernels and torch ops.

Returns exactly the `gp_tree.Tree` of the CPU path (same official MST, same KRT, same leaf
order). A batch of B images is one graph with B components (vertex b*N + x, edge b*E + e), so
every launch covers the whole batch. The number of launches depends only on the shape, never
on the data, and nothing waits for the device: on CUDA the build can be captured in a CUDA
graph (`GRAPHS`). Stages (docs/kernels.md gives the proofs and the counts):

1. weights: `gp_tree.grid_weights` (torch, float32) and the official MST keys fl32(w + 1).
2. MST, ceil(log2 N) Borůvka rounds of three launches. min: every edge between two components
   takes an atomic min of (key bits << 32 | edge id) at both components (a non-negative float
   orders like its bits, so one 64-bit word holds the lexicographic order) and joins the next
   round's work list. union: every component root with a pick marks its edge as an MST edge
   and unites the edge's endpoints in a lock-free union-find (compare-and-swap of a root under
   a root of higher pseudo-random priority, path halving). compress: every vertex points at its
   root. The components of every image at least halve per round, so after ceil(log2 N) rounds
   each image is one tree; a round with no work left costs three launches that do nothing.
   With a strict total order the MST is unique, so it is the official Borůvka's.
3. sort: a static-size stable partition (cumsum of the MST flags, a scatter) lists each image's
   N-1 MST edges by id; one sort of (weight bits << 32 | edge id) gives Kruskal's order.
4. KRT children, divide and conquer over the bits of the sorted edge index t: node N+t's
   children are the top KRT nodes of its endpoints' components in the forest of edges < t.
   Levels from the highest bit down: every edge starts labelled by its endpoints (leaves);
   at bit beta, the edges with bit beta = 0 (left halves) are unioned, each with its own
   node, in a union-find whose root is the largest node id (= the top of the component), and
   every edge with bit beta = 1 relabels its endpoints to their roots. After the last level
   each edge's labels are its children. One union-find serves all blocks of a level at once
   (a KRT node is the label of edges in one block per level only); its entries carry the
   level, so no reset is needed. Hooks are lock-free (compare-and-swap, lower priority root
   under higher); finds halve paths.
5. leaf ranges: the Euler tour of the KRT (enter and exit events, first child first) as a
   linked list, ranked by ceil(log2(4N)) rounds of pointer jumping with suffix sums of the
   leaf count: lo = leaves before a node's enter event, hi = leaves before its exit event.

Every atomic is relaxed: each is a reduction, a counter, or a compare-and-swap that publishes
nothing but its own word (docs/kernels.md argues each one). Lanes that do not take part in an
atomic or a load address a valid element or are masked.

Instrumentation for the benchmark: `COUNTS` (launches per kernel) and `TRIPS` (the longest
in-kernel loop of the union-find kernels).
"""

from __future__ import annotations

import collections
import warnings

import torch

from ._triton import INTERPRETED, tl, triton
from .gp_tree import Stage, Tree, grid_edges, grid_weights, mst_keys, no_stage, pair_weights

COUNTS: collections.Counter = collections.Counter()  # kernel name -> launches
TRIPS: dict[str, torch.Tensor] = {}  # kernel -> longest in-kernel loop per round / level, last build (device)
GRAPHS = True  # on CUDA, replay the build from a CUDA graph captured once per input shape

_NONE_KEY = 2**63 - 1
_DEVICE_BLOCK = 256  # 2 elements per thread (4 warps): at most 48 registers per kernel (docs/kernels.md)


def _block(total: int, device_block: int) -> int:
    """Elements per program: `device_block` on a GPU, under the interpreter as few programs as possible.

    tests/triton_harness.py replaces this function to run every launch with small blocks.
    """
    return min(triton.next_power_of_2(max(total, 1)), 1 << 16) if INTERPRETED else device_block


def _launch(kernel, total: int, *args, **meta) -> None:
    block = _block(total, _DEVICE_BLOCK)
    kernel[(triton.cdiv(max(total, 1), block),)](*args, BLOCK=block, **meta)
    COUNTS[kernel.__name__] += 1


def rounds_for(n: int) -> int:
    """Borůvka rounds that join any N vertices: ceil(log2 N), components at least halve per round."""
    return max(1, (n - 1).bit_length())


if triton is not None:

    # ------------------------------------------------------------------------------------------
    # MST: Borůvka rounds over a lock-free union-find

    @triton.jit
    def _endpoints(e, w, nv):
        """Pixels of grid edge e (official numbering: nv vertical edges first, then horizontal)."""
        q = e - nv
        r = q // tl.maximum(w - 1, 1)
        vertical = e < nv
        return tl.where(vertical, e, q + r), tl.where(vertical, e + w, q + r + 1)

    @triton.jit
    def _priority(x):
        """Knuth's multiplicative hash, a bijection on 32-bit ids: roots are linked in a pseudo-random order."""
        return (x.to(tl.int64) * 2654435761) & 0xFFFFFFFF

    @triton.jit
    def _find(parent, x, go):
        """Roots of x (lanes go) with path halving on int32 parent entries; returns (roots, loop trips)."""
        trips = tl.zeros((), tl.int32)
        while tl.max(go.to(tl.int32), axis=0) > 0:
            p = tl.load(parent + x, mask=go, other=0, volatile=True)
            go = go & (p != x)
            g = tl.load(parent + p, mask=go, other=0, volatile=True)
            tl.store(parent + x, g, mask=go & (g != p))
            x = tl.where(go, g, x)
            trips += 1
        return x, trips

    @triton.jit
    def _link(parent, a, b, go):
        """Unite the sets of a and b (lanes go; a = b = 0 elsewhere); returns the loop trips.

        Both climb with path halving; where both are roots, the lower-priority root is hooked
        under the other by a compare-and-swap expecting it to be a root still; a lane whose CAS
        lost climbs on. Lanes not trying CAS their own valid entry with an impossible expected
        value (-1), so nothing is written and no address is out of bounds.
        """
        trips = tl.zeros((), tl.int32)
        while tl.max(go.to(tl.int32), axis=0) > 0:
            pa = tl.load(parent + a, mask=go, other=0, volatile=True)
            pb = tl.load(parent + b, mask=go, other=0, volatile=True)
            roots = go & (pa == a) & (pb == b)
            go = go & ~(roots & (a == b))
            try_ = roots & (a != b)
            a_low = _priority(a) < _priority(b)
            low = tl.where(a_low, a, b)
            old = tl.atomic_cas(parent + tl.where(try_, low, a), tl.where(try_, low, -1),
                                tl.where(try_, tl.where(a_low, b, a), -1), sem="relaxed")
            go = go & ~(try_ & (old == low))
            ma = go & (pa != a)
            mb = go & (pb != b)
            ga = tl.load(parent + pa, mask=ma, other=0, volatile=True)
            gb = tl.load(parent + pb, mask=mb, other=0, volatile=True)
            tl.store(parent + a, ga, mask=ma & (ga != pa))
            tl.store(parent + b, gb, mask=mb & (gb != pb))
            a = tl.where(ma, ga, a)
            b = tl.where(mb, gb, b)
            trips += 1
        return trips

    @triton.jit
    def _mst_min_kernel(act_in, n_in, act_out, n_out, kbits, parent, best, num_edges, n, w, nv,
                        FIRST: tl.constexpr, BLOCK: tl.constexpr):
        """Edges between components: atomic min of (key bits << 32 | id) at both components; compact them."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < tl.load(n_in)
        if FIRST:
            ge = offs
        else:
            ge = tl.load(act_in + offs, mask=mask, other=0).to(tl.int64)
        b = ge // num_edges
        e = ge - b * num_edges
        u, v = _endpoints(e, w, nv)
        cu = tl.load(parent + b * n + u, mask=mask, other=0)
        cv = tl.load(parent + b * n + v, mask=mask, other=0)
        alive = mask & (cu != cv)
        key = (tl.load(kbits + ge, mask=alive, other=0).to(tl.int64) << 32) | e
        tl.atomic_min(best + cu, key, mask=alive, sem="relaxed")
        tl.atomic_min(best + cv, key, mask=alive, sem="relaxed")
        keep = alive.to(tl.int32)
        base = tl.atomic_add(n_out, tl.sum(keep, axis=0), sem="relaxed")
        tl.store(act_out + base + tl.cumsum(keep, axis=0) - keep, ge.to(tl.int32), mask=alive)

    @triton.jit
    def _mst_union_kernel(best, parent, flags, trips, n_alive, total, num_edges, n, w, nv, BLOCK: tl.constexpr):
        """Every component with a pick marks its edge and unites the edge's endpoints; picks are reset."""
        x = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = (x < total) & (tl.load(n_alive) > 0)
        key = tl.load(best + x, mask=mask, other=9223372036854775807)
        has = key != 9223372036854775807
        tl.store(best + x, tl.full([BLOCK], 9223372036854775807, tl.int64), mask=has)
        e = key & 0xFFFFFFFF
        b = x // n
        u, v = _endpoints(e, w, nv)
        tl.store(flags + b * num_edges + e, tl.full([BLOCK], 1, tl.int8), mask=has)
        base = b * n
        k = _link(parent, tl.where(has, base + u, 0).to(tl.int32), tl.where(has, base + v, 0).to(tl.int32), has)
        tl.atomic_max(trips, k, sem="relaxed")

    @triton.jit
    def _mst_compress_kernel(parent, trips, n_alive, total, BLOCK: tl.constexpr):
        """Every vertex points at its root (the next round reads components in one load)."""
        x = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = (x < total) & (tl.load(n_alive) > 0)
        root, k = _find(parent, tl.where(mask, x, 0).to(tl.int32), mask)
        tl.store(parent + x, root, mask=mask)
        tl.atomic_max(trips, k, sem="relaxed")

    # ------------------------------------------------------------------------------------------
    # KRT: union-find with level-stamped entries (level << 32 | parent; other levels read as roots)

    @triton.jit
    def _uf_union(uf, a, b, level, go):
        """Join the sets of a and b (lanes go; a = b = 0 elsewhere); returns the loop trips.

        One loop climbs from a and b with path halving (stamped entries of other levels read
        as roots) and, where both are roots, hooks the lower-priority root under the other by
        CAS; a lane whose CAS lost simply climbs on. Linking in a pseudo-random order keeps the
        trees shallow (linking by id made chains as long as the rank-increasing paths of a
        component). Lanes not trying CAS their own valid entry expecting -2, which no entry
        holds: nothing is written and no address is out of bounds. The loop calls no other jit
        function: the interpreter pays for every nested call.
        """
        trips = tl.zeros((), tl.int32)
        while tl.max(go.to(tl.int32), axis=0) > 0:
            ea = tl.load(uf + a, mask=go, other=-1, volatile=True)
            eb = tl.load(uf + b, mask=go, other=-1, volatile=True)
            pa = tl.where((ea >> 32) == level, ea & 0xFFFFFFFF, a)
            pb = tl.where((eb >> 32) == level, eb & 0xFFFFFFFF, b)
            roots = go & (pa == a) & (pb == b)
            go = go & ~(roots & (a == b))
            try_ = roots & (a != b)
            a_low = ((a * 2654435761) & 0xFFFFFFFF) < ((b * 2654435761) & 0xFFFFFFFF)
            old = tl.atomic_cas(uf + tl.where(try_, tl.where(a_low, a, b), a), tl.where(try_, tl.where(a_low, ea, eb), -2),
                                tl.where(try_, (level << 32) | tl.where(a_low, b, a), -2), sem="relaxed")
            go = go & ~(try_ & (old == tl.where(a_low, ea, eb)))
            ma = go & (pa != a)
            mb = go & (pb != b)
            ga = tl.load(uf + pa, mask=ma, other=-1, volatile=True)
            gb = tl.load(uf + pb, mask=mb, other=-1, volatile=True)
            ga = tl.where((ga >> 32) == level, ga & 0xFFFFFFFF, pa)
            gb = tl.where((gb >> 32) == level, gb & 0xFFFFFFFF, pb)
            tl.store(uf + a, (level << 32) | ga, mask=ma & (ga != pa))
            tl.store(uf + b, (level << 32) | gb, mask=mb & (gb != pb))
            a = tl.where(ma, ga, a)
            b = tl.where(mb, gb, b)
            trips += 1
        return trips

    @triton.jit
    def _uf_find(uf, a, level, go):
        """Roots of a (lanes go) with path halving; returns (roots, loop trips)."""
        trips = tl.zeros((), tl.int32)
        while tl.max(go.to(tl.int32), axis=0) > 0:
            ea = tl.load(uf + a, mask=go, other=-1, volatile=True)
            pa = tl.where((ea >> 32) == level, ea & 0xFFFFFFFF, a)
            go = go & (pa != a)
            ga = tl.load(uf + pa, mask=go, other=-1, volatile=True)
            ga = tl.where((ga >> 32) == level, ga & 0xFFFFFFFF, pa)
            tl.store(uf + a, (level << 32) | ga, mask=go & (ga != pa))
            a = tl.where(go, ga, a)
            trips += 1
        return a, trips

    @triton.jit
    def _krt_left(t, m_edges, beta):
        """Edges with bit beta = 0 whose block has a right half (the others relabel nothing)."""
        return (((t >> beta) & 1) == 0) & ((((t >> beta) | 1) << beta) < m_edges)

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_hook_kernel(labels, uf, total, m_edges, nodes, n, beta, level, BLOCK: tl.constexpr):
        """Every endpoint label of a left edge points at its largest incident left edge's node (atomic max).

        Lane = half edge (edge i, endpoint j). Entries of other levels are smaller, so the max
        also overwrites them. Labels never become roots again this level, so no link targets them.
        """
        h = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        i = h // 2
        b = i // m_edges
        t = i - b * m_edges
        left = (h < 2 * total) & _krt_left(t, m_edges, beta)
        label = tl.load(labels + h, mask=left, other=0)
        tl.atomic_max(uf + label, (level.to(tl.int64) << 32) | (b * nodes + n + t), mask=left, sem="relaxed")

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_union_kernel(labels, uf, trips, total, m_edges, nodes, n, beta, level, BLOCK: tl.constexpr):
        """Every left edge's node joins the node its endpoint label points at (unless it is that node)."""
        h = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        i = h // 2
        b = i // m_edges
        t = i - b * m_edges
        left = (h < 2 * total) & _krt_left(t, m_edges, beta)
        node = tl.where(left, b * nodes + n + t, 0)
        top = tl.load(uf + tl.load(labels + h, mask=left, other=0), mask=left, other=0, volatile=True) & 0xFFFFFFFF
        go = left & (top != node)
        k = _uf_union(uf, tl.where(go, node, 0), tl.where(go, top, 0), level.to(tl.int64), go)
        tl.atomic_max(trips, k, sem="relaxed")

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_top_kernel(uf, top, trips, total, m_edges, nodes, n, beta, level, BLOCK: tl.constexpr):
        """Every component's top: the largest node id in it, stamped with the level, at its root (atomic max)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b = i // m_edges
        t = i - b * m_edges
        left = (i < total) & _krt_left(t, m_edges, beta)
        lvl = level.to(tl.int64)
        node = tl.where(left, b * nodes + n + t, 0)
        root, k = _uf_find(uf, node, lvl, left)
        tl.atomic_max(top + root, (lvl << 32) | node, mask=left, sem="relaxed")
        tl.atomic_max(trips, k, sem="relaxed")

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_relabel_kernel(labels, uf, top, trips, total, m_edges, beta, level, BLOCK: tl.constexpr):
        """Endpoint labels of edges with bit beta = 1 become the tops of their components in the left half.

        Lane = half edge (edge i, endpoint j): one find per lane.
        """
        h = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        t = (h // 2) % m_edges
        right = (h < 2 * total) & (((t >> beta) & 1) == 1)
        lvl = level.to(tl.int64)
        a = tl.load(labels + h, mask=right, other=0).to(tl.int64)
        root, k = _uf_find(uf, a, lvl, right)
        above = tl.load(top + root, mask=right, other=-1)
        tl.store(labels + h, tl.where((above >> 32) == lvl, above & 0xFFFFFFFF, a).to(tl.int32), mask=right)
        tl.atomic_max(trips, k, sem="relaxed")

    # ------------------------------------------------------------------------------------------
    # leaf ranges: Euler tour ranked by pointer jumping

    @triton.jit
    def _tour_kernel(children, nxt, val, total, nodes, n, m_edges, BLOCK: tl.constexpr):
        """Successor of every event (2g = enter node g, 2g+1 = exit); a leaf's enter event weighs 1.

        nxt starts as the identity: the root's exit stays its own successor (the list's end).
        """
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = g < total
        b = g // nodes
        u = g - b * nodes
        leaf = mask & (u < n)
        inner = mask & (u >= n)
        tl.store(nxt + 2 * g, (2 * g + 1).to(tl.int32), mask=leaf)
        tl.store(val + 2 * g, tl.full([BLOCK], 1, tl.int32), mask=leaf)
        ci = 2 * (b * m_edges + u - n)
        c0 = tl.load(children + ci, mask=inner, other=0).to(tl.int64)
        c1 = tl.load(children + ci + 1, mask=inner, other=0).to(tl.int64)
        tl.store(nxt + 2 * g, (2 * c0).to(tl.int32), mask=inner)
        tl.store(nxt + 2 * c0 + 1, (2 * c1).to(tl.int32), mask=inner)
        tl.store(nxt + 2 * c1 + 1, (2 * g + 1).to(tl.int32), mask=inner)

    @triton.jit
    def _rank_kernel(nxt_in, val_in, nxt_out, val_out, total, BLOCK: tl.constexpr):
        """One synchronous jump: val <- val + val[next], next <- next[next]."""
        x = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = x < total
        p = tl.load(nxt_in + x, mask=mask, other=0)
        tl.store(val_out + x, tl.load(val_in + x, mask=mask, other=0) + tl.load(val_in + p, mask=mask, other=0), mask=mask)
        tl.store(nxt_out + x, tl.load(nxt_in + p, mask=mask, other=0), mask=mask)

    @triton.jit
    def _ranges_kernel(val, lo, hi, order, total, nodes, n, BLOCK: tl.constexpr):
        """lo/hi from the suffix leaf counts of every node's enter/exit event; leaves fill the leaf order."""
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = g < total
        b = g // nodes
        u = g - b * nodes
        start = n - tl.load(val + 2 * g, mask=mask, other=0).to(tl.int64)
        tl.store(lo + g, start, mask=mask)
        tl.store(hi + g, n - tl.load(val + 2 * g + 1, mask=mask, other=0).to(tl.int64), mask=mask)
        tl.store(order + b * n + start, u, mask=mask & (u < n))


def boruvka_mst(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Official-MST membership (B, E) bool of every image's grid edges from float32 weights (B, E) (`grid_weights`)."""
    bsz, num_edges = weight.shape
    n = height * width
    dev = weight.device
    total_v, total_e = bsz * n, bsz * num_edges
    if total_e >= 2**31:
        raise ValueError(f"boruvka_mst: {bsz} images of {n} pixels exceed 2**31 edges in one batch")
    rounds = rounds_for(n)
    kbits = mst_keys(weight).contiguous().view(torch.int32)
    parent = torch.arange(total_v, dtype=torch.int32, device=dev)
    best = torch.full((total_v,), _NONE_KEY, dtype=torch.int64, device=dev)
    flags = torch.zeros(total_e, dtype=torch.int8, device=dev)
    act = [torch.empty(total_e, dtype=torch.int32, device=dev) for _ in range(2)]
    work = torch.zeros(rounds + 1, dtype=torch.int32, device=dev)  # edges in each round's work list
    work[0] = total_e
    trips = torch.zeros(rounds, 2, dtype=torch.int32, device=dev)
    nv = (height - 1) * width
    for r in range(rounds):
        _launch(_mst_min_kernel, total_e, act[r % 2], work[r:], act[1 - r % 2], work[r + 1:], kbits, parent, best,
                num_edges, n, width, nv, FIRST=r == 0)
        _launch(_mst_union_kernel, total_v, best, parent, flags, trips[r, 0:], work[r + 1:], total_v, num_edges, n,
                width, nv)
        _launch(_mst_compress_kernel, total_v, parent, trips[r, 1:], work[r + 1:], total_v)
    TRIPS.update(zip(["_mst_union_kernel", "_mst_compress_kernel"], trips.T))
    return flags.view(bsz, num_edges).bool()


def kruskal_order(flags: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """Ids (B, N-1) of the MST edges (flags (B, E)) in Kruskal order (weight, id), without host reads.

    A stable partition by a scatter to static positions (the N-1 MST edges first, by id), then
    one sort of unique keys (float32 weight bits << 32 | id): the order needs no stable sort.
    """
    ids = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
    inc = flags.cumsum(1)
    slots = torch.where(flags, inc - 1, ids - inc + (n - 1))
    mst = torch.empty_like(slots).scatter_(1, slots, ids)[:, : n - 1]
    keys = (weight.view(torch.int32).gather(1, mst).long() << 32) | mst
    return keys.sort(dim=1)[0] & 0xFFFFFFFF


def krt_children(src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """children (B, N-1, 2) of the KRT of every image's MST edges src/dst (B, N-1), sorted ascending."""
    bsz, m_edges = src.shape
    nodes = 2 * n - 1
    base = (torch.arange(bsz, device=src.device) * nodes)[:, None]
    labels = torch.stack([src + base, dst + base], dim=2).to(torch.int32).contiguous()
    levels = m_edges.bit_length()
    trips = torch.zeros(levels, 3, dtype=torch.int32, device=src.device)
    uf = torch.full((bsz * nodes,), -1, dtype=torch.int64, device=src.device)
    top = torch.full_like(uf, -1)
    total = bsz * m_edges
    for level, beta in enumerate(reversed(range(levels))):
        _launch(_krt_hook_kernel, 2 * total, labels, uf, total, m_edges, nodes, n, beta, level)
        _launch(_krt_union_kernel, 2 * total, labels, uf, trips[level, 0:], total, m_edges, nodes, n, beta, level)
        _launch(_krt_top_kernel, total, uf, top, trips[level, 1:], total, m_edges, nodes, n, beta, level)
        _launch(_krt_relabel_kernel, 2 * total, labels, uf, top, trips[level, 2:], total, m_edges, beta, level)
    TRIPS.update(zip(["_krt_union_kernel", "_krt_top_kernel", "_krt_relabel_kernel"], trips.T))
    return labels.to(torch.int64) - base[:, :, None]


def leaf_ranges(children: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order (B, N), lo, hi (B, 2N-1)) from KRT children (B, N-1, 2), by ranking the Euler tour."""
    bsz = children.shape[0]
    nodes = 2 * n - 1
    dev = children.device
    base = (torch.arange(bsz, device=dev) * nodes)[:, None, None]
    events = 2 * bsz * nodes
    nxt = torch.arange(events, dtype=torch.int32, device=dev)
    val = torch.zeros(events, dtype=torch.int32, device=dev)
    _launch(_tour_kernel, bsz * nodes, (children + base).to(torch.int32).contiguous(), nxt, val, bsz * nodes,
            nodes, n, n - 1)
    nxt2, val2 = torch.empty_like(nxt), torch.empty_like(val)
    for _ in range((2 * nodes - 2).bit_length()):  # the tour of one image has 2 * nodes events
        _launch(_rank_kernel, events, nxt, val, nxt2, val2, events)
        nxt, nxt2, val, val2 = nxt2, nxt, val2, val
    lo = torch.empty(bsz, nodes, dtype=torch.int64, device=dev)
    hi = torch.empty_like(lo)
    order = torch.empty(bsz, n, dtype=torch.int64, device=dev)
    _launch(_ranges_kernel, bsz * nodes, val, lo, hi, order, bsz * nodes, nodes, n)
    return order, lo, hi


def _single_pixels(bsz: int, dev: torch.device) -> Tree:
    empty = torch.empty(bsz, 0, 2, dtype=torch.int64, device=dev)
    zeros = torch.zeros(bsz, 1, dtype=torch.int64, device=dev)
    return Tree(1, 1, empty, torch.empty(bsz, 0, dtype=torch.float64, device=dev), empty.clone(), zeros,
                zeros.clone(), zeros + 1)


def _tree_from_mst(edges: torch.Tensor, weight: torch.Tensor, height: int, width: int, stage: Stage) -> Tree:
    """Sorted MST edges (B, N-1, 2) -> KRT and leaf ranges."""
    n = height * width
    with stage("krt"):
        children = krt_children(edges[:, :, 0], edges[:, :, 1], n)
    with stage("leaf ranges"):
        order, lo, hi = leaf_ranges(children, n)
    return Tree(height, width, edges, weight, children, order, lo, hi)


def _build(guide: torch.Tensor, stage: Stage) -> Tree:
    bsz, _, h, w = guide.shape
    n = h * w
    if n == 1:
        return _single_pixels(bsz, guide.device)
    with stage("weights"):
        src, dst = grid_edges(h, w, guide.device)
        weight = grid_weights(guide)
    with stage("mst"):
        flags = boruvka_mst(weight, h, w)
    with stage("sort"):
        ids = kruskal_order(flags, weight, n)
        edges = torch.stack([src[ids], dst[ids]], dim=2)
        altitude = weight.gather(1, ids).double()
    return _tree_from_mst(edges, altitude, h, w, stage)


def _reweight(edges: torch.Tensor, features: torch.Tensor, stage: Stage) -> Tree:
    bsz, _, h, w = features.shape
    n = h * w
    if n == 1:
        return _single_pixels(bsz, features.device)
    with stage("weights"):
        weight = pair_weights(features, edges[:, :, 0], edges[:, :, 1])
    with stage("sort"):
        weight, perm = torch.sort(weight, dim=1, stable=True)
        edges = edges.gather(1, perm[:, :, None].expand(-1, -1, 2))
    return _tree_from_mst(edges, weight, h, w, stage)


_GRAPHS: dict[tuple, tuple] = {}  # (op, shapes, dtypes, device) -> (graph, static inputs, static Tree), oldest first
GRAPH_LIMIT = 4  # graphs kept (each holds its memory pool): images of many sizes recapture, never pile up


def _graphed(op, key: tuple, *inputs: torch.Tensor) -> Tree:
    """`op(*inputs)` replayed from a CUDA graph captured on the first call with this key; a fresh Tree each call.

    Capture runs the build once on a side stream (compiling and warming every kernel), then
    records it; a later call copies its inputs into the captured ones, replays, and clones the
    outputs (the next replay overwrites them). The `GRAPH_LIMIT` most recently used keys are
    kept. If capture fails, that key builds eagerly from then on, after one warning.
    """
    entry = _GRAPHS.pop(key, None)
    if entry is None:
        while len(_GRAPHS) >= GRAPH_LIMIT:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        static = [x.clone() for x in inputs]
        try:
            side = torch.cuda.Stream(inputs[0].device)
            side.wait_stream(torch.cuda.current_stream(inputs[0].device))
            with torch.cuda.stream(side):
                op(*static, no_stage)
            torch.cuda.current_stream(inputs[0].device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = op(*static, no_stage)
            entry = (graph, static, out)
        except RuntimeError as err:  # pragma: no cover - needs a GPU
            warnings.warn(f"gp tree build: CUDA graph capture failed ({err}); building without graphs", stacklevel=3)
            entry = (None, None, None)
    _GRAPHS[key] = entry  # most recently used last
    graph, static, out = entry
    if graph is None:  # pragma: no cover - needs a GPU
        return op(*inputs, no_stage)
    for s, x in zip(static, inputs):
        s.copy_(x)
    graph.replay()
    return Tree(out.height, out.width, *(getattr(out, f).clone() for f in Tree.ARRAYS))


def _use_graph(x: torch.Tensor, stage: Stage) -> bool:
    return GRAPHS and stage is no_stage and x.is_cuda and not INTERPRETED


def build_tree_triton(guide: torch.Tensor, stage: Stage = no_stage) -> Tree:
    """triton backend: grid weights, Borůvka MST, sort, KRT, leaf ranges; all on the guide's device, no host reads."""
    if _use_graph(guide, stage):  # pragma: no cover - needs a GPU
        return _graphed(_build, ("build", tuple(guide.shape), guide.dtype, guide.device), guide.contiguous())
    return _build(guide, stage)


def reweight_triton(edges: torch.Tensor, features: torch.Tensor, stage: Stage = no_stage) -> Tree:
    """triton backend: the given MST edges with weights from `features`, sorted; KRT and leaf ranges rebuilt."""
    if _use_graph(features, stage):  # pragma: no cover - needs a GPU
        key = ("reweight", tuple(edges.shape), tuple(features.shape), features.dtype, features.device)
        return _graphed(_reweight, key, edges.contiguous(), features.contiguous())
    return _reweight(edges, features, stage)
