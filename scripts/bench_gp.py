"""Benchmark APro global propagation (cpu backend) against the seed's per-channel algorithm and a memory floor.

The baseline is Algorithm 1 of the APro paper as the seed runs it, compiled with numba here so
the comparison is fair: the MST is built once per image (counted in its time), then for every
channel (plus one all-ones channel for the normaliser) a union-find pass over the MST edges in
ascending order with lazy tags, then a DFS that pushes the tags down. The memory floor is
`unary.clone()` (one read and one write of phi). "propagate" is the public call (input
checks included), "kernel only" the numba propagation without them. Peak memory of the GP call is measured in a
fresh subprocess as the growth of the peak RSS (resource.getrusage) over inputs already allocated.

    python scripts/bench_gp.py --size 512 --ks 21 60 171 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numba
import numpy as np
import torch

from maskclip_apro.apro.gp import build_tree, propagate
from maskclip_apro.kernels.gp_propagate import propagate_cpu

ZETA = 0.3


# ----------------------------------------------------------------------------------------------
# baseline: the seed's per-channel lazy union-find (APro Algorithm 1), numba


@numba.njit(cache=True)
def _seed_mst(src, dst, weight_order, n):
    """Kruskal over the grid edges (given in ascending-weight order): MST edges in ascending order."""
    parent = np.arange(n)
    tree = np.empty(n - 1, dtype=np.int64)
    t = 0
    for e in weight_order:
        a, b = src[e], dst[e]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a != b:
            parent[b] = a
            tree[t] = e
            t += 1
    return tree


@numba.njit(cache=True)
def _seed_channel(tsrc, tdst, affinity, phi, out):
    """One channel: union by rank with lazy tags (value(x) = sum of tags to the root), then a DFS."""
    n = phi.shape[0]
    parent = np.arange(n)
    rank = np.zeros(n, dtype=np.int32)
    total = phi.astype(np.float64)
    tag = np.zeros(n)
    for e in range(n - 1):
        a, b = tsrc[e], tdst[e]
        while parent[a] != a:
            a = parent[a]
        while parent[b] != b:
            b = parent[b]
        s_a, s_b = total[a], total[b]
        tag[a] += affinity[e] * s_b
        tag[b] += affinity[e] * s_a
        if rank[a] < rank[b]:
            a, b = b, a
        elif rank[a] == rank[b]:
            rank[a] += 1
        parent[b] = a
        tag[b] -= tag[a]
        total[a] = s_a + s_b
    # DFS over the union-find forest from the root, accumulating tags downwards
    head = np.full(n, -1)
    nxt = np.full(n, -1)
    root = 0
    for x in range(n):
        if parent[x] == x:
            root = x
        else:
            nxt[x] = head[parent[x]]
            head[parent[x]] = x
    stack = np.empty(n, dtype=np.int64)
    stack[0] = root
    top = 1
    out[root] = tag[root]
    while top > 0:
        top -= 1
        x = stack[top]
        c = head[x]
        while c != -1:
            out[c] = out[x] + tag[c]
            stack[top] = c
            top += 1
            c = nxt[c]


def seed_baseline(unary: torch.Tensor, guide: torch.Tensor, zeta: float) -> torch.Tensor:
    """y for one image (1, K, H, W), channel by channel, as the seed computes it."""
    _, k, h, w = unary.shape
    n = h * w
    idx = np.arange(n).reshape(h, w)
    src = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    dst = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    g = guide[0].double().reshape(guide.shape[1], n).numpy()
    weight = ((g[:, src] - g[:, dst]) ** 2).sum(0)
    tree = _seed_mst(src, dst, np.argsort(weight, kind="stable"), n)
    tsrc, tdst = src[tree], dst[tree]
    affinity = np.exp(-weight[tree] / zeta**2)
    phi = unary[0].reshape(k, n).numpy()
    den = np.empty(n)
    _seed_channel(tsrc, tdst, affinity, np.ones(n), den)
    den += 1.0
    out = np.empty((k, n), dtype=phi.dtype)
    num = np.empty(n)
    for c in range(k):
        _seed_channel(tsrc, tdst, affinity, phi[c], num)
        out[c] = (phi[c] + num) / den
    return torch.from_numpy(out).reshape(1, k, h, w)


# ----------------------------------------------------------------------------------------------
# inputs, timing, memory


def make_inputs(size: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A natural-image guide (skimage's astronaut, resized) and softmax unaries at full resolution."""
    gen = torch.Generator().manual_seed(seed)
    try:
        from skimage import data

        img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
        guide = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    except Exception:  # noqa: BLE001 - any missing sample image falls back to noise
        guide = torch.rand(1, 3, size, size, generator=gen)
    unary = torch.rand(1, k, size, size, generator=gen).softmax(1)
    return guide.contiguous(), unary.contiguous()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_peak_kib(reset: bool) -> int:
    """Peak RSS in KiB; on Linux the peak is reset first (clear_refs) so earlier imports do not mask it."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_child(size: int, k: int, queue) -> None:
    guide, unary = make_inputs(size, k)
    propagate(build_tree(guide[:, :, :8, :8], backend="cpu"), unary[:, :, :8, :8], ZETA, backend="cpu")
    before = _rss_peak_kib(reset=True)
    propagate(build_tree(guide, backend="cpu"), unary, ZETA, backend="cpu")
    queue.put((_rss_peak_kib(reset=False) - before) / 1024)


def peak_extra_mb(size: int, k: int) -> float:
    """Peak RSS growth (MiB) of build_tree + propagate over the already-allocated inputs, fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(size, k, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def check_baseline(size: int = 24, k: int = 3) -> float:
    """Max |seed - ours| on a small image; raises if they disagree."""
    guide, unary = make_inputs(size, k, seed=1)
    ours = propagate(build_tree(guide, backend="cpu"), unary, ZETA, backend="cpu")
    diff = (seed_baseline(unary, guide, ZETA) - ours).abs().max().item()
    if not diff < 1e-5:
        raise AssertionError(f"seed baseline and cpu backend disagree by {diff}")
    return diff


def run(size: int = 512, ks: list[int] | tuple[int, ...] = (21, 60, 171), repeats: int = 3) -> list[dict]:
    """Time tree build, propagation, baseline and memory floor for every K; one dict per K."""
    check_baseline()
    rows = []
    for k in ks:
        guide, unary = make_inputs(size, k)
        tree = build_tree(guide, backend="cpu")
        t_build = best_of(lambda: build_tree(guide, backend="cpu"), repeats)
        t_prop = best_of(lambda: propagate(tree, unary, ZETA, backend="cpu"), repeats)
        flat = unary.reshape(1, k, -1)
        parts = (tree.order, tree.lo, tree.hi, tree.children, tree.altitude)
        t_kernel = best_of(lambda: propagate_cpu(flat, *parts, ZETA), repeats)
        t_floor = best_of(unary.clone, repeats)
        t_seed = best_of(lambda: seed_baseline(unary, guide, ZETA), max(1, min(repeats, 2)))
        total = t_build + t_prop
        rows.append(
            {
                "size": size,
                "K": k,
                "build_s": t_build,
                "propagate_s": t_prop,
                "kernel_s": t_kernel,
                "total_s": total,
                "seed_s": t_seed,
                "floor_s": t_floor,
                "speedup_vs_seed": t_seed / total,
                "propagate_vs_floor": t_prop / t_floor,
                "peak_extra_mb": peak_extra_mb(size, k),
                "unary_mb": unary.numel() * unary.element_size() / 2**20,
            }
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| size | K | tree build (s) | propagate (s) | total (s) | seed per-channel (s) | floor clone (s) "
        "| speedup vs seed | propagate / floor | kernel only (s) | kernel / floor | peak extra (MiB) | unary (MiB) |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['K']} | {r['build_s']:.3f} | {r['propagate_s']:.3f} | {r['total_s']:.3f} "
            f"| {r['seed_s']:.3f} | {r['floor_s']:.3f} | {r['speedup_vs_seed']:.1f}x "
            f"| {r['propagate_vs_floor']:.2f}x | {r['kernel_s']:.3f} | {r['kernel_s'] / r['floor_s']:.2f}x "
            f"| {r['peak_extra_mb']:.0f} | {r['unary_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="guide and unary side length (pixels)")
    parser.add_argument("--ks", type=int, nargs="+", default=[21, 60, 171], help="numbers of channels")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    args = parser.parse_args()
    if args.size < 2 or args.repeats < 1 or min(args.ks) < 1:
        parser.error("--size must be >= 2, --repeats and every K >= 1")
    print(f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, zeta {ZETA}")
    print(to_markdown(run(args.size, args.ks, args.repeats)))


if __name__ == "__main__":
    main()
