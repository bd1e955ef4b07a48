"""GP tree build on the GPU, parallel in every stage: Triton kernels, with torch ops for weights and sorting.

Returns exactly the `gp_tree.Tree` of the CPU path (same MST, same KRT, same leaf order).
A batch of B images is one graph with B components (vertex b*N + x, edge b*E + e), so every
launch covers the whole batch. Stages (docs/kernels.md gives the proofs and the counts):

1. weights: `gp_tree.grid_weights` (torch), float64.
2. MST, Borůvka rounds. Each component's lightest outgoing edge in the order (weight, edge id):
   an atomic min over the weight's bits (non-negative doubles order like their bits read as
   int64), then an atomic min over the ids of the edges at that weight (no 64-bit word holds
   both). Every component hooks onto the component across its edge; of a mutual pair the
   smaller root stays. Pointer jumping then sends every vertex to its new root. Components at
   least halve per round (<= log2 N rounds); edges inside a component leave the work list.
   With a strict total order the MST is unique, so it is the one Kruskal finds.
3. sort: the N-1 MST edges of each image, kept in edge-id order by `masked_select`, sorted
   with torch.sort(stable=True): ascending (weight, edge id), Kruskal's order.
4. KRT children, divide and conquer over the bits of the sorted edge index t: node N+t's
   children are the top KRT nodes of its endpoints' components in the forest of edges < t.
   Levels from the highest bit down: every edge starts labelled by its endpoints (leaves);
   at bit beta, the edges with bit beta = 0 (left halves) are unioned, each with its own
   node, in a union-find whose root is the largest node id (= the top of the component), and
   every edge with bit beta = 1 relabels its endpoints to their roots. After the last level
   each edge's labels are its children. One union-find serves all blocks of a level at once
   (a KRT node is the label of edges in one block per level only); its entries carry the
   level, so no reset is needed. Hooks are lock-free (compare-and-swap, smaller root under
   larger); finds halve paths.
5. leaf ranges: the Euler tour of the KRT (enter and exit events, first child first) as a
   linked list, ranked by ceil(log2(4N)) rounds of pointer jumping with suffix sums of the
   leaf count: lo = leaves before a node's enter event, hi = leaves before its exit event.

Instrumentation for the benchmark: `COUNTS` (launches per kernel), `READS` (host reads, i.e.
synchronisations) and `TRIPS` (the longest in-kernel loop of the union-find kernels).
"""

from __future__ import annotations

import collections

import torch

from ._triton import INTERPRETED, tl, triton
from .gp_tree import Stage, Tree, grid_edges, grid_weights, no_stage, pair_weights

COUNTS: collections.Counter = collections.Counter()  # kernel name -> launches
READS: collections.Counter = collections.Counter()  # host reads of device values (synchronisations)
TRIPS: dict[str, torch.Tensor] = {}  # kernel -> longest in-kernel loop per level, last KRT build (device)

JUMP_STEPS = 4  # pointer-jumping steps per launch: one host read per launch checks convergence
_NONE_EDGE = 2**31 - 1
_NONE_WEIGHT = 2**63 - 1


def _block(total: int) -> int:
    """Elements per program: 1024 on a GPU; under the interpreter as few programs as possible."""
    return min(triton.next_power_of_2(max(total, 1)), 1 << 16) if INTERPRETED else 1024


def _launch(kernel, total: int, *args, **meta) -> None:
    block = _block(total)
    kernel[(triton.cdiv(max(total, 1), block),)](*args, BLOCK=block, **meta)
    COUNTS[kernel.__name__] += 1


def _read(x: torch.Tensor) -> list:
    READS["reads"] += 1
    return x.tolist()


if triton is not None:

    # ------------------------------------------------------------------------------------------
    # MST: Borůvka rounds

    @triton.jit
    def _mst_min_kernel(act_in, n_in, act_out, n_out, src, dst, wbits, comp, best_w, num_edges, n,
                        FIRST: tl.constexpr, BLOCK: tl.constexpr):
        """Edges between components: atomic min of the weight bits at both components; compact them."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < tl.load(n_in)
        if FIRST:
            ge = offs
        else:
            ge = tl.load(act_in + offs, mask=mask, other=0).to(tl.int64)
        b = ge // num_edges
        e = ge - b * num_edges
        cu = tl.load(comp + b * n + tl.load(src + e, mask=mask, other=0), mask=mask, other=0)
        cv = tl.load(comp + b * n + tl.load(dst + e, mask=mask, other=0), mask=mask, other=0)
        alive = mask & (cu != cv)
        w = tl.load(wbits + ge, mask=alive, other=0)
        tl.atomic_min(best_w + cu, w, mask=alive)
        tl.atomic_min(best_w + cv, w, mask=alive)
        keep = alive.to(tl.int32)
        base = tl.atomic_add(n_out, tl.sum(keep, axis=0))
        tl.store(act_out + base + tl.cumsum(keep, axis=0) - keep, ge.to(tl.int32), mask=alive)

    @triton.jit
    def _mst_pick_kernel(act, n_act, src, dst, wbits, comp, best_w, best_e, num_edges, n, BLOCK: tl.constexpr):
        """Among the edges at a component's lightest weight, the smallest edge id (atomic min)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < tl.load(n_act)
        ge = tl.load(act + offs, mask=mask, other=0)
        g64 = ge.to(tl.int64)
        b = g64 // num_edges
        e = g64 - b * num_edges
        cu = tl.load(comp + b * n + tl.load(src + e, mask=mask, other=0), mask=mask, other=0)
        cv = tl.load(comp + b * n + tl.load(dst + e, mask=mask, other=0), mask=mask, other=0)
        w = tl.load(wbits + g64, mask=mask, other=0)
        tl.atomic_min(best_e + cu, ge, mask=mask & (w == tl.load(best_w + cu, mask=mask, other=0)))
        tl.atomic_min(best_e + cv, ge, mask=mask & (w == tl.load(best_w + cv, mask=mask, other=0)))

    @triton.jit
    def _mst_hook_kernel(comp, best_e, src, dst, nxt, mst, n_hooks, total, num_edges, n, BLOCK: tl.constexpr):
        """Every root with an edge hooks onto the other side (the smaller root of a mutual pair stays).

        nxt gets each vertex's new parent: its current root, or for a root, the root it hooks on.
        """
        x = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = x < total
        c = tl.load(comp + x, mask=mask, other=0)
        root = mask & (c == x)
        ge = tl.load(best_e + x, mask=root, other=2147483647)
        has = root & (ge != 2147483647)
        g64 = ge.to(tl.int64)
        b = g64 // num_edges
        e = g64 - b * num_edges
        cu = tl.load(comp + b * n + tl.load(src + e, mask=has, other=0), mask=has, other=0)
        cv = tl.load(comp + b * n + tl.load(dst + e, mask=has, other=0), mask=has, other=0)
        other = cu.to(tl.int64) + cv - x
        mutual = tl.load(best_e + other, mask=has, other=-1) == ge
        hook = has & ~(mutual & (x < other))
        tl.store(nxt + x, tl.where(hook, other, c).to(tl.int32), mask=mask)
        tl.store(mst + g64, tl.full([BLOCK], 1, tl.int8), mask=has)
        tl.atomic_add(n_hooks, tl.sum(hook.to(tl.int32), axis=0))

    @triton.jit
    def _jump_kernel(parent, changed, total, STEPS: tl.constexpr, BLOCK: tl.constexpr):
        """STEPS pointer-jumping steps in place: parent[x] <- parent[parent[x]].

        Every write replaces a pointer by one of its ancestors, so other lanes' concurrent reads
        stay correct and only speed this up; a launch in which no pointer moved means converged.
        """
        x = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = x < total
        p = tl.load(parent + x, mask=mask, other=0)
        moved = tl.zeros([BLOCK], tl.int32)
        for _ in tl.static_range(STEPS):
            gp = tl.load(parent + p, mask=mask, other=0, volatile=True)
            step = mask & (gp != p)
            tl.store(parent + x, gp, mask=step)
            moved += step.to(tl.int32)
            p = gp
        tl.atomic_add(changed, tl.sum(moved, axis=0))

    # ------------------------------------------------------------------------------------------
    # KRT: union-find with level-stamped entries (level << 32 | parent; other levels read as roots)

    @triton.jit
    def _uf_union(uf, a, b, level, active):
        """Join the sets of a and b (active lanes); returns the loop trips.

        One loop climbs from a and b with path halving (stamped entries of other levels read
        as roots) and, where both are roots, hooks the lower-priority root under the other by
        CAS; a lane whose CAS lost simply climbs on. Priority = Knuth's multiplicative hash, a
        bijection on 32-bit ids: linking in a pseudo-random order keeps the trees shallow
        (linking by id made chains as long as the rank-increasing paths of a component). The
        loop calls no other jit function: the interpreter pays for every nested call.
        """
        go = active
        trips = tl.zeros((), tl.int32)
        while tl.max(go.to(tl.int32), axis=0) > 0:
            ea = tl.load(uf + a, mask=go, other=-1, volatile=True)
            eb = tl.load(uf + b, mask=go, other=-1, volatile=True)
            pa = tl.where(go & ((ea >> 32) == level), ea & 0xFFFFFFFF, a)
            pb = tl.where(go & ((eb >> 32) == level), eb & 0xFFFFFFFF, b)
            roots = go & (pa == a) & (pb == b)
            try_ = roots & (a != b)
            a_low = ((a * 2654435761) & 0xFFFFFFFF) < ((b * 2654435761) & 0xFFFFFFFF)
            # lanes not trying CAS their own entry (no contention); lanes out of the work (padding) entry 0
            low = tl.where(try_, tl.where(a_low, a, b), tl.where(go, a, 0))
            cur = tl.where(try_, tl.where(a_low, ea, eb), -2)  # -2: no entry holds it, so no write
            old = tl.atomic_cas(uf + low, cur, tl.where(try_, (level << 32) | tl.where(a_low, b, a), -2))
            go = go & ~(roots & ((a == b) | (old == cur)))
            ga = tl.load(uf + pa, mask=go & (pa != a), other=-1, volatile=True)
            gb = tl.load(uf + pb, mask=go & (pb != b), other=-1, volatile=True)
            ga = tl.where((ga >> 32) == level, ga & 0xFFFFFFFF, pa)
            gb = tl.where((gb >> 32) == level, gb & 0xFFFFFFFF, pb)
            tl.store(uf + a, (level << 32) | ga, mask=go & (pa != a) & (ga != pa))
            tl.store(uf + b, (level << 32) | gb, mask=go & (pb != b) & (gb != pb))
            a = tl.where(go & (pa != a), ga, a)
            b = tl.where(go & (pb != b), gb, b)
            trips += 1
        return trips

    @triton.jit
    def _uf_find2(uf, a, b, level, go_a, go_b):
        """Roots of a and b (lanes go_a / go_b) with path halving; returns (root a, root b, loop trips)."""
        trips = tl.zeros((), tl.int32)
        while tl.max((go_a | go_b).to(tl.int32), axis=0) > 0:
            ea = tl.load(uf + a, mask=go_a, other=-1, volatile=True)
            eb = tl.load(uf + b, mask=go_b, other=-1, volatile=True)
            pa = tl.where((ea >> 32) == level, ea & 0xFFFFFFFF, a)
            pb = tl.where((eb >> 32) == level, eb & 0xFFFFFFFF, b)
            go_a = go_a & (pa != a)
            go_b = go_b & (pb != b)
            ga = tl.load(uf + pa, mask=go_a, other=-1, volatile=True)
            gb = tl.load(uf + pb, mask=go_b, other=-1, volatile=True)
            ga = tl.where((ga >> 32) == level, ga & 0xFFFFFFFF, pa)
            gb = tl.where((gb >> 32) == level, gb & 0xFFFFFFFF, pb)
            tl.store(uf + a, (level << 32) | ga, mask=go_a & (ga != pa))
            tl.store(uf + b, (level << 32) | gb, mask=go_b & (gb != pb))
            a = tl.where(go_a, ga, a)
            b = tl.where(go_b, gb, b)
            trips += 1
        return a, b, trips

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
        tl.atomic_max(uf + label, (level.to(tl.int64) << 32) | (b * nodes + n + t), mask=left)

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_union_kernel(labels, uf, trips, total, m_edges, nodes, n, beta, level, BLOCK: tl.constexpr):
        """Every left edge's node joins the node its endpoint label points at (unless it is that node)."""
        h = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        i = h // 2
        b = i // m_edges
        t = i - b * m_edges
        left = (h < 2 * total) & _krt_left(t, m_edges, beta)
        node = b * nodes + n + t
        top = tl.load(uf + tl.load(labels + h, mask=left, other=0), mask=left, other=-1, volatile=True) & 0xFFFFFFFF
        tl.atomic_max(trips, _uf_union(uf, node, top, level.to(tl.int64), left & (top != node)))

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_top_kernel(uf, top, trips, total, m_edges, nodes, n, beta, level, BLOCK: tl.constexpr):
        """Every component's top: the largest node id in it, stamped with the level, at its root (atomic max)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b = i // m_edges
        t = i - b * m_edges
        left = (i < total) & _krt_left(t, m_edges, beta)
        lvl = level.to(tl.int64)
        node = b * nodes + n + t
        root, _, k = _uf_find2(uf, node, node, lvl, left, tl.zeros_like(left))
        tl.atomic_max(top + root, (lvl << 32) | node, mask=left)
        tl.atomic_max(trips, k)

    @triton.jit(do_not_specialize=["beta", "level"])
    def _krt_relabel_kernel(labels, uf, top, trips, total, m_edges, beta, level, BLOCK: tl.constexpr):
        """Edges with bit beta = 1 take the tops of their endpoints' components in the left half as labels."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        t = i % m_edges
        right = (i < total) & (((t >> beta) & 1) == 1)
        lvl = level.to(tl.int64)
        a = tl.load(labels + 2 * i, mask=right, other=0).to(tl.int64)
        b = tl.load(labels + 2 * i + 1, mask=right, other=0).to(tl.int64)
        ra, rb, k = _uf_find2(uf, a, b, lvl, right, right)
        ta = tl.load(top + ra, mask=right, other=-1)
        tb = tl.load(top + rb, mask=right, other=-1)
        tl.store(labels + 2 * i, tl.where((ta >> 32) == lvl, ta & 0xFFFFFFFF, a).to(tl.int32), mask=right)
        tl.store(labels + 2 * i + 1, tl.where((tb >> 32) == lvl, tb & 0xFFFFFFFF, b).to(tl.int32), mask=right)
        tl.atomic_max(trips, k)

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


def boruvka_mst(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """MST membership (B, E) bool of every image's edges (src/dst (E,) shared, weight (B, E) float64 >= 0).

    The graph of each image must be connected (the grid is).
    """
    bsz, num_edges = weight.shape
    dev = weight.device
    total_v, total_e = bsz * n, bsz * num_edges
    src32, dst32 = src.to(torch.int32).contiguous(), dst.to(torch.int32).contiguous()
    wbits = weight.contiguous().view(torch.int64)
    comp = torch.arange(total_v, dtype=torch.int32, device=dev)
    nxt = torch.empty_like(comp)
    best_w = torch.full((total_v,), _NONE_WEIGHT, dtype=torch.int64, device=dev)
    best_e = torch.full((total_v,), _NONE_EDGE, dtype=torch.int32, device=dev)
    mst = torch.zeros(total_e, dtype=torch.int8, device=dev)
    act_in, act_out = torch.empty(total_e, dtype=torch.int32, device=dev), torch.empty(total_e, dtype=torch.int32, device=dev)
    # counters: [edges in the work list, edges left after the min pass, hooks, pointers moved]
    counts = torch.tensor([total_e, 0, 0, 0], dtype=torch.int32, device=dev)
    work, found, first = total_e, 0, True
    while found < bsz * (n - 1):
        counts[1:] = 0
        _launch(_mst_min_kernel, work, act_in, counts[0:], act_out, counts[1:], src32, dst32, wbits, comp, best_w,
                num_edges, n, FIRST=first)
        _launch(_mst_pick_kernel, work, act_out, counts[1:], src32, dst32, wbits, comp, best_w, best_e, num_edges, n)
        _launch(_mst_hook_kernel, total_v, comp, best_e, src32, dst32, nxt, mst, counts[2:], total_v, num_edges, n)
        work, hooks = _read(counts[1:3])
        if hooks == 0:
            raise ValueError("boruvka_mst needs a connected graph per image")
        found += hooks
        if found < bsz * (n - 1):
            while True:
                counts[3] = 0
                _launch(_jump_kernel, total_v, nxt, counts[3:], total_v, STEPS=JUMP_STEPS)
                if _read(counts[3:])[0] == 0:
                    break
            comp, nxt = nxt, comp
            best_w.fill_(_NONE_WEIGHT)
            best_e.fill_(_NONE_EDGE)
            act_in, act_out = act_out, act_in
            counts[0] = work
            first = False
    return mst.view(bsz, num_edges).bool()


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
        _launch(_krt_relabel_kernel, total, labels, uf, top, trips[level, 2:], total, m_edges, beta, level)
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


def build_tree_triton(guide: torch.Tensor, stage: Stage = no_stage) -> Tree:
    """triton backend: grid weights, Borůvka MST, sort, KRT, leaf ranges; all on the guide's device."""
    bsz, _, h, w = guide.shape
    n = h * w
    if n == 1:
        return _single_pixels(bsz, guide.device)
    with stage("weights"):
        src, dst = grid_edges(h, w, guide.device)
        weight = grid_weights(guide)
    with stage("mst"):
        mst = boruvka_mst(src, dst, weight, n)
    with stage("sort"):
        ids = mst.nonzero()[:, 1].view(bsz, n - 1)  # row-major: each image's MST edges by edge id
        weight, perm = torch.sort(weight.masked_select(mst).view(bsz, n - 1), dim=1, stable=True)
        ids = ids.gather(1, perm)
        edges = torch.stack([src[ids], dst[ids]], dim=2)
    return _tree_from_mst(edges, weight, h, w, stage)


def reweight_triton(edges: torch.Tensor, features: torch.Tensor, stage: Stage = no_stage) -> Tree:
    """triton backend: the given MST edges with weights from `features`, sorted; KRT and leaf ranges rebuilt."""
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
