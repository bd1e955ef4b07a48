"""GP against a brute force that follows the equations literally, against the official union-find, properties, bad input.

The triton backend runs under TRITON_INTERPRET=1 (tests/conftest.py) on a subset of the cases:
the interpreter pays per kernel program. tests/test_gp_device.py compares its trees with the CPU path's.
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np
import pytest
import torch
from test_gp_ties import official_two_pass

from maskclip_apro.apro.gp import Tree, build_tree, global_propagation, propagate, reweight

BACKENDS = ["torch", "cpu"]


# ----------------------------------------------------------------------------------------------
# oracle: grid graph, Prim's MST, BFS max edge from every node, dense psi, weighted average


def grid_graph(h: int, w: int) -> list[tuple[int, int]]:
    edges = []
    for r in range(h):
        for c in range(w):
            if c + 1 < w:
                edges.append((r * w + c, r * w + c + 1))
            if r + 1 < h:
                edges.append((r * w + c, (r + 1) * w + c))
    return edges


def sq_dist(feat: np.ndarray, i: int, j: int) -> float:
    return float(((feat[:, i] - feat[:, j]) ** 2).sum())


def prim_mst(n: int, weighted: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    adj = [[] for _ in range(n)]
    for i, j, wt in weighted:
        adj[i].append((wt, j))
        adj[j].append((wt, i))
    seen = [False] * n
    seen[0] = True
    heap = [(wt, 0, j) for wt, j in adj[0]]
    heapq.heapify(heap)
    tree = []
    while heap:
        wt, i, j = heapq.heappop(heap)
        if seen[j]:
            continue
        seen[j] = True
        tree.append((i, j, wt))
        for wt2, k in adj[j]:
            if not seen[k]:
                heapq.heappush(heap, (wt2, j, k))
    assert len(tree) == n - 1
    return tree


def maxedge_matrix(n: int, tree: list[tuple[int, int, float]]) -> np.ndarray:
    adj = [[] for _ in range(n)]
    for i, j, wt in tree:
        adj[i].append((j, wt))
        adj[j].append((i, wt))
    out = np.zeros((n, n))
    for s in range(n):
        seen = [False] * n
        seen[s] = True
        queue = deque([s])
        while queue:
            v = queue.popleft()
            for u, wt in adj[v]:
                if not seen[u]:
                    seen[u] = True
                    out[s, u] = max(out[s, v], wt)
                    queue.append(u)
    return out


def brute_force_on_tree(unary: np.ndarray, tree: list[tuple[int, int, float]], zeta: float) -> np.ndarray:
    """unary (K, N): y_i = sum_j phi_j psi(i, j) / sum_j psi(i, j) over ALL pixels."""
    psi = np.exp(-maxedge_matrix(unary.shape[1], tree) / zeta**2)
    return (unary @ psi.T) / psi.sum(1)


def brute_force(unary: torch.Tensor, guide: torch.Tensor, zeta: float) -> torch.Tensor:
    b, k, h, w = unary.shape
    out = []
    for i in range(b):
        g = guide[i].double().reshape(guide.shape[1], -1).numpy()
        weighted = [(p, q, sq_dist(g, p, q)) for p, q in grid_graph(h, w)]
        tree = prim_mst(h * w, weighted) if h * w > 1 else []
        out.append(brute_force_on_tree(unary[i].double().reshape(k, -1).numpy(), tree, zeta))
    return torch.from_numpy(np.stack(out)).reshape(b, k, h, w)


def make_guide(kind: str, b: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(b, 3, h, w, generator=gen)
    if kind == "ties":  # few distinct colours: many equal weights and zero-weight edges
        return torch.randint(0, 3, (b, 3, h, w), generator=gen).float() / 2
    if kind == "regions":  # constant blocks with a little noise in one block
        g = torch.zeros(b, 2, h, w)
        g[:, 0, : h // 2] = 1.0
        g[:, 1, :, w // 2 :] = 0.5
        g[:, :, h // 2 :, w // 2 :] += 0.1 * torch.rand(b, 2, h - h // 2, w - w // 2, generator=gen)
        return g
    raise AssertionError(kind)


CASES = [  # (guide kind, B, K, H, W, zeta)
    ("random", 2, 3, 5, 7, 0.3),
    ("random", 2, 8, 12, 11, 1e-3),
    ("random", 1, 1, 30, 30, 0.5),
    ("random", 3, 2, 9, 9, 1e3),
    ("random", 2, 4, 1, 17, 0.2),
    ("random", 2, 4, 13, 1, 0.2),
    ("random", 1, 2, 1, 1, 0.5),
    ("ties", 2, 5, 10, 10, 0.7),
    ("ties", 2, 2, 1, 12, 0.4),
    ("regions", 2, 6, 16, 14, 0.25),
    ("regions", 1, 3, 20, 9, 10.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}x{c[3]}x{c[4]}-z{c[5]}")
def test_matches_brute_force(case, backend):
    kind, b, k, h, w, zeta = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    guide = make_guide(kind, b, h, w, gen)
    unary = torch.rand(b, k, h, w, generator=gen)
    expected = brute_force(unary, guide, zeta)
    got = global_propagation(unary, guide, zeta, backend=backend)
    assert got.dtype == unary.dtype and got.shape == unary.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


TRITON_CASES = [c for c in CASES if c[3] * c[4] <= 100]  # batches, strips, 1x1, ties (interpreter cost)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}x{c[3]}x{c[4]}-z{c[5]}")
def test_triton_matches_brute_force(case):
    kind, b, k, h, w, zeta = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    guide = make_guide(kind, b, h, w, gen)
    unary = torch.rand(b, k, h, w, generator=gen)
    got = global_propagation(unary, guide, zeta, backend="triton")
    assert got.dtype == unary.dtype and got.shape == unary.shape
    torch.testing.assert_close(got.double(), brute_force(unary, guide, zeta), atol=1e-5, rtol=0)


OFFICIAL_CASES = [c for c in CASES if c[0] != "random" or c[3] * c[4] <= 40]  # ties, regions, strips, 1x1


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("case", OFFICIAL_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}x{c[3]}x{c[4]}-z{c[5]}")
def test_matches_the_official_union_find(case, backend):
    """Against the official MST + gp_process.cu union-find (transcribed in tests/test_gp_ties.py), float32."""
    kind, b, k, h, w, zeta = case
    if backend == "triton" and kind != "ties":
        pytest.skip("interpreter cost: triton runs the tie cases")
    gen = torch.Generator().manual_seed(CASES.index(case))
    guide = make_guide(kind, b, h, w, gen)
    unary = torch.rand(b, k, h, w, generator=gen)
    got = global_propagation(unary, guide, zeta, backend=backend)
    for i in range(b):
        expected = official_two_pass(unary[i].reshape(k, -1).numpy(), guide[i].numpy(), zeta, None)
        torch.testing.assert_close(got[i].reshape(k, -1), torch.from_numpy(expected), atol=2e-5, rtol=0)


def test_trees_identical_across_backends_and_mst_is_minimal():
    gen = torch.Generator().manual_seed(3)
    guide = make_guide("ties", 2, 6, 7, gen)
    trees = {be: build_tree(guide, backend=be) for be in ["torch", "cpu", "triton"]}
    for be in ["cpu", "triton"]:
        for field in ["edges", "altitude", "children", "order", "lo", "hi"]:
            assert torch.equal(getattr(trees[be], field), getattr(trees["torch"], field)), (be, field)
    tree = trees["cpu"]
    n = 42
    for i in range(2):
        g = guide[i].double().reshape(3, -1).numpy()
        prim = prim_mst(n, [(p, q, sq_dist(g, p, q)) for p, q in grid_graph(6, 7)])
        assert tree.altitude[i].sum().item() == pytest.approx(sum(wt for _, _, wt in prim), abs=1e-12)
        # spanning: the N-1 edges connect all pixels
        reached = {0}
        adj = {}
        for p, q in tree.edges[i].tolist():
            adj.setdefault(p, []).append(q)
            adj.setdefault(q, []).append(p)
        stack = [0]
        while stack:
            for q in adj.get(stack.pop(), []):
                if q not in reached:
                    reached.add(q)
                    stack.append(q)
        assert len(reached) == n
        # altitudes ascend (Kruskal order) and every node's leaves form its [lo, hi) range
        assert bool((tree.altitude[i].diff() >= 0).all())
        assert sorted(tree.order[i].tolist()) == list(range(n))
        for t, (ca, cb) in enumerate(tree.children[i].tolist()):
            assert tree.lo[i, n + t] == tree.lo[i, ca] and tree.hi[i, ca] == tree.lo[i, cb]
            assert tree.hi[i, cb] == tree.hi[i, n + t]
    assert isinstance(tree, Tree) and tree.edges.shape == (2, n - 1, 2) and tree.lo.shape == (2, 2 * n - 1)


@pytest.mark.parametrize("kind", ["constant", "scales", "random"])
def test_cpu_radix_sort_gives_the_torch_tree(kind):
    """The cpu backend's radix sort of weight bits must order ties and magnitudes like torch.sort(stable=True)."""
    gen = torch.Generator().manual_seed(21)
    if kind == "constant":  # every weight 0: every radix pass is skipped
        guide = torch.full((2, 3, 9, 8), 0.25)
    elif kind == "scales":  # weights from 1e-12 to 1e6: every digit of the bit pattern varies
        guide = torch.rand(3, 2, 11, 13, generator=gen) * 10.0 ** torch.randint(-6, 4, (3, 1, 11, 13), generator=gen)
    else:
        guide = torch.rand(3, 3, 12, 10, generator=gen)
    cpu, ref = build_tree(guide, backend="cpu"), build_tree(guide, backend="torch")
    for field in ["edges", "altitude", "children", "order", "lo", "hi"]:
        assert torch.equal(getattr(cpu, field), getattr(ref, field)), field


# ----------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_zeta_is_identity_and_huge_zeta_is_mean(backend):
    gen = torch.Generator().manual_seed(11)
    guide = torch.rand(2, 3, 15, 13, generator=gen)  # continuous: no exact-duplicate neighbours
    unary = torch.rand(2, 4, 15, 13, generator=gen)
    tree = build_tree(guide, backend=backend)
    torch.testing.assert_close(propagate(tree, unary, 1e-6, backend=backend), unary, atol=1e-6, rtol=0)
    mean = unary.mean((2, 3), keepdim=True).expand_as(unary)
    torch.testing.assert_close(propagate(tree, unary, 1e8, backend=backend), mean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one_and_channel_permutation(backend):
    gen = torch.Generator().manual_seed(12)
    guide = torch.rand(2, 3, 11, 14, generator=gen)
    probs = torch.rand(2, 6, 11, 14, generator=gen).softmax(1)
    tree = build_tree(guide, backend=backend)
    out = propagate(tree, probs, 0.3, backend=backend)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 11, 14), atol=1e-5, rtol=0)
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(propagate(tree, probs[:, perm], 0.3, backend=backend), out[:, perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_follows_unary(dtype, backend):
    gen = torch.Generator().manual_seed(13)
    guide = torch.rand(1, 3, 6, 5, generator=gen)
    unary = torch.rand(1, 2, 6, 5, generator=gen)
    got = global_propagation(unary.to(dtype), guide, 0.5, backend=backend)
    assert got.dtype == dtype
    tol = 1e-7 if dtype == torch.float64 else 1e-2  # float64 sums; the edge weights are float32 (the official's)
    torch.testing.assert_close(got.double(), brute_force(unary.to(dtype).double(), guide, 0.5), atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reweight_with_original_guide_is_unchanged(backend):
    gen = torch.Generator().manual_seed(14)
    guide = torch.rand(2, 3, 9, 10, generator=gen)
    unary = torch.rand(2, 3, 9, 10, generator=gen)
    tree = build_tree(guide, backend=backend)
    again = reweight(tree, guide, backend=backend)
    torch.testing.assert_close(propagate(again, unary, 0.4, backend=backend), propagate(tree, unary, 0.4, backend=backend),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_reweight_matches_brute_force_on_same_topology(backend):
    gen = torch.Generator().manual_seed(15)
    b, h, w = 2, (8 if backend != "triton" else 4), (9 if backend != "triton" else 5)
    guide = torch.rand(b, 3, h, w, generator=gen)
    features = torch.rand(b, 5, h, w, generator=gen)
    unary = torch.rand(b, 3, h, w, generator=gen)
    tree = reweight(build_tree(guide, backend=backend), features, backend=backend)
    got = propagate(tree, unary, 0.6, backend=backend)
    topology = build_tree(guide, backend="torch").edges
    for i in range(b):
        f = features[i].double().reshape(5, -1).numpy()
        mst = [(p, q, sq_dist(f, p, q)) for p, q in topology[i].tolist()]
        expected = brute_force_on_tree(unary[i].double().reshape(3, -1).numpy(), mst, 0.6)
        torch.testing.assert_close(got[i].double().reshape(3, -1), torch.from_numpy(expected), atol=1e-5, rtol=0)
    assert {tuple(sorted(e)) for e in tree.edges[0].tolist()} == {tuple(sorted(e)) for e in topology[0].tolist()}


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_name_the_argument():
    g = torch.rand(1, 3, 4, 4)
    u = torch.rand(1, 2, 4, 4)
    tree = build_tree(g, backend="cpu")
    cases = [
        (lambda: build_tree(torch.rand(3, 4, 4)), "guide"),
        (lambda: build_tree(torch.zeros(1, 3, 0, 4)), "guide"),
        (lambda: build_tree(torch.ones(1, 3, 4, 4, dtype=torch.int64)), "guide"),
        (lambda: build_tree(g.clone().index_fill_(2, torch.tensor([1]), float("nan"))), "guide"),
        (lambda: build_tree(g, backend="gpu"), "backend"),
        (lambda: propagate(tree, torch.rand(1, 2, 4, 5), 0.5), "unary"),
        (lambda: propagate(tree, torch.rand(2, 2, 4, 4), 0.5), "unary"),
        (lambda: propagate(tree, u.clone().fill_(float("inf")), 0.5), "unary"),
        (lambda: propagate(tree, u, 0.0), "zeta"),
        (lambda: propagate(tree, u, -1.0), "zeta"),
        (lambda: propagate(tree, u, float("nan")), "zeta"),
        (lambda: propagate(tree, u, 0.5, backend="fast"), "backend"),
        (lambda: reweight(tree, torch.rand(1, 5, 3, 4)), "features"),
        (lambda: reweight(tree, torch.rand(1, 5, 4)), "features"),
        (lambda: global_propagation(u, torch.rand(1, 3, 5, 4), 0.5), "unary"),
        (lambda: global_propagation(u[:, :, :0], g, 0.5), "unary"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
