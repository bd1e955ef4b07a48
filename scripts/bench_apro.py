"""APro benchmarks in one run (design 7): GP against the seed's per-channel algorithm and a clone
floor, LP against the official unfold formulation and a copy floor. Ratios come from this run.

    python scripts/bench_apro.py                      # 512x512, GP K = 21 60 171, LP K = 21
    python scripts/bench_apro.py --size 256 --repeats 1
"""

from __future__ import annotations

import argparse
import platform

import numba
import torch

import bench_gp
import bench_lp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--gp-ks", type=int, nargs="+", default=[21, 60, 171])
    parser.add_argument("--lp-k", type=int, default=21)
    parser.add_argument("--lp-iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numba {numba.__version__} ({numba.get_num_threads()} threads), best of {args.repeats}\n"
    )
    print(f"## GP, {args.size}x{args.size}, zeta {bench_gp.ZETA}\n")
    print(bench_gp.to_markdown(bench_gp.run(args.size, args.gp_ks, args.repeats)))
    print(f"\n## LP, {args.size}x{args.size}, K={args.lp_k}, {args.lp_iters} iterations, 5x5\n")
    print(bench_lp.to_markdown(bench_lp.run(args.size, args.lp_k, args.lp_iters, 5, args.repeats)))


if __name__ == "__main__":
    main()
