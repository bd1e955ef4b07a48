"""A small GP workload for compute-sanitizer (scripts/gpu_check.sh): tree builds and propagation on tie-heavy
guides, at a power-of-two size (where the last program of a launch has padding lanes) and odd sizes.

    compute-sanitizer --tool memcheck python scripts/gpu_check_gp.py            # backend triton, CUDA
    python scripts/gpu_check_gp.py --device cpu --backend cpu --sizes 16        # the same calls on the CPU

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is then its own allocation, so an access
past a tensor's end leaves the allocation and memcheck sees it. Prints one line per size and exits 1 if
a result differs from backend "cpu".
"""

from __future__ import annotations

import argparse

import torch

from maskclip_apro.apro import build_tree, local_propagation, propagate, reweight
from maskclip_apro.kernels import gp_tree, selfcheck


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 131, 64])
    parser.add_argument("--classes", type=int, default=21)
    args = parser.parse_args()
    device = torch.device(args.device)
    failures = 0
    for size in args.sizes:
        guide = selfcheck.guides(size)
        gen = torch.Generator().manual_seed(size)
        unary = torch.softmax(4 * torch.randn(guide.shape[0], args.classes, size, size, generator=gen), 1)
        features = torch.randint(0, 3, (guide.shape[0], 4, size, size), generator=gen).float()
        tree = build_tree(guide.to(device), backend=args.backend)
        again = reweight(tree, features.to(device), backend=args.backend)
        y = propagate(again, unary.to(device), 0.5, backend=args.backend)
        lp = local_propagation(unary.to(device), guide.to(device), kernel_size=5, iters=2, backend=args.backend)
        want_tree = build_tree(guide, backend="cpu")
        want_again = reweight(want_tree, features, backend="cpu")
        same = all(torch.equal(getattr(tree, f).cpu(), getattr(want_tree, f)) for f in gp_tree.Tree.ARRAYS)
        same &= all(torch.equal(getattr(again, f).cpu(), getattr(want_again, f)) for f in gp_tree.Tree.ARRAYS)
        gp_err = (y.cpu() - propagate(want_again, unary, 0.5, backend="cpu")).abs().max().item()
        lp_err = (lp.cpu() - local_propagation(unary, guide, kernel_size=5, iters=2, backend="cpu")).abs().max().item()
        ok = same and gp_err <= selfcheck.ATOL and lp_err <= selfcheck.ATOL
        failures += not ok
        print(f"{size}x{size} x{guide.shape[0]} on {device} ({args.backend}): trees {'equal' if same else 'DIFFER'}, "
              f"GP max diff {gp_err:.2g}, LP max diff {lp_err:.2g} -> {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
