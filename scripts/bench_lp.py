"""Benchmark APro local propagation: official unfold vs reference vs CPU route vs memory floor.

    python scripts/bench_lp.py --size 512 --k 21 --iters 20 --kernel-size 5 --repeats 3
    python scripts/bench_lp.py --compile 5 9 11 33 99     # first-call (compile) time per kernel size

Prints a markdown table; `run(...)` returns the rows for a combined benchmark script.
The memory floor is `iters` copies of the unary map (one read and one write per iteration).
--compile times the CPU route's first call (numba compilation included) and second call for each
kernel size, each in a fresh process with an empty numba cache, against the first size's
first call in the same run: sizes up to 9 get generated straight-line stencils, larger ones the
loop form (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from maskclip_apro.apro import local_propagation
from maskclip_apro.kernels.lp import lp_cpu, lp_unfold, lp_weights


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(size: int = 512, k: int = 21, iters: int = 20, kernel_size: int = 5, repeats: int = 3) -> list[dict]:
    """Best-of-`repeats` seconds per method on one (1, k, size, size) map; ratios vs unfold and floor."""
    gen = torch.Generator().manual_seed(0)
    unary = torch.softmax(torch.randn(1, k, size, size, generator=gen), 1)
    image = torch.rand(1, 3, size, size, generator=gen)
    copy = torch.empty_like(unary)

    def floor() -> None:
        for _ in range(iters):
            copy.copy_(unary)

    def lp(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: local_propagation(unary, image, kernel_size=kernel_size, iters=iters, backend=backend)

    weights = lp_weights(image, 0.15, kernel_size)
    local_propagation(unary[..., :32, :32], image[..., :32, :32], kernel_size=kernel_size, iters=2, backend="cpu")
    methods = {
        "unfold (official style)": lambda: lp_unfold(unary, image, 0.15, kernel_size, iters),
        "torch reference": lp("torch"),
        "cpu route": lp("cpu"),
        "cpu route, stencil only (weights precomputed)": lambda: lp_cpu(unary, weights, iters),
        "memory floor (copy x iters)": floor,
    }
    times = {name: _best(fn, repeats) for name, fn in methods.items()}
    base, bound = times["unfold (official style)"], times["memory floor (copy x iters)"]
    return [
        dict(method=name, seconds=t, speedup_vs_unfold=base / t, ratio_vs_floor=t / bound)
        for name, t in times.items()
    ]


_FIRST_CALL = """
import sys, time, torch
from maskclip_apro.apro import local_propagation
k = int(sys.argv[1])
gen = torch.Generator().manual_seed(0)
unary, image = torch.rand(1, 21, 64, 64, generator=gen).softmax(1), torch.rand(1, 3, 64, 64, generator=gen)
times = []
for _ in range(2):
    start = time.perf_counter()
    local_propagation(unary, image, kernel_size=k, iters=5, backend="cpu")
    times.append(time.perf_counter() - start)
print(*times)
"""


def compile_rows(sizes: list[int]) -> list[dict]:
    """First and second call of the CPU route per kernel size, each in a fresh process and numba cache."""
    rows = []
    for k in sizes:
        with tempfile.TemporaryDirectory() as cache:
            done = subprocess.run([sys.executable, "-c", _FIRST_CALL, str(k)], capture_output=True, text=True,
                                  env={**os.environ, "NUMBA_CACHE_DIR": cache}, check=True)
        first, second = (float(v) for v in done.stdout.split()[-2:])
        rows.append(dict(kernel_size=k, first=first, second=second))
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| method | time (ms) | speed-up vs unfold | x memory floor |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seconds'] * 1e3:.1f} | {r['speedup_vs_unfold']:.1f}x | {r['ratio_vs_floor']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--k", type=int, default=21, help="number of channels (classes)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", type=int, nargs="+", metavar="KERNEL_SIZE",
                        help="instead: first-call (compile) time of the CPU route for these kernel sizes")
    args = parser.parse_args()
    if args.compile:
        rows = compile_rows(args.compile)
        print("LP CPU route, 64x64, K=21, 5 iters; fresh process and empty numba cache per size\n")
        print("| kernel size | first call (s, compile included) | second call (s) | first call vs the first size's |")
        print("|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['kernel_size']} | {r['first']:.2f} | {r['second']:.3f} | {r['first'] / rows[0]['first']:.2f}x |")
        return
    rows = run(args.size, args.k, args.iters, args.kernel_size, args.repeats)
    print(f"LP {args.size}x{args.size}, K={args.k}, {args.iters} iters, {args.kernel_size}x{args.kernel_size}, "
          f"{torch.get_num_threads()} torch threads, best of {args.repeats}\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
