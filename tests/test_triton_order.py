"""Every Triton kernel under tests/triton_harness.py: shuffled programs, small blocks, bounds-checked.

The tree (build and reweight), GP propagation and LP must give the `cpu` backend's results on
tie-heavy guides (constant, few colours, regions, ramps), odd sizes and batches, whatever the
program order and the block size. Sizes are tiny: the interpreter pays per program.
"""

from __future__ import annotations

import pytest
import torch

import triton
import triton.language as tl
from maskclip_apro.kernels import gp_propagate, gp_tree, gp_tree_triton, lp
from triton_harness import LAUNCHED, LOG, OutOfBounds, harness, jit_functions

KINDS = ("constant", "colours", "regions", "ramp")
NOT_LAUNCHED = {"maskclip_apro.kernels._triton._probe": "decorated only to detect the interpreter"}


def guides(b: int, h: int, w: int, seed: int = 0, first: int = 0) -> torch.Tensor:
    """Image i has the tie-heavy kind KINDS[(first + i) % 4]."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(b, 3, h, w)
    for i in range(b):
        kind = KINDS[(first + i) % len(KINDS)]
        if kind == "constant":
            out[i] = 0.5
        elif kind == "colours":  # two or three colours
            out[i] = torch.randint(0, 2 + i % 2, (1, h, w), generator=gen).float().expand(3, h, w) / 2
        elif kind == "regions":  # four constant blocks
            out[i] = 0.0
            out[i, 0, : h // 2] = 1.0
            out[i, 1, :, w // 2 :] = 0.5
        else:  # ramp: every horizontal edge has the same weight, every vertical edge zero
            out[i] = torch.linspace(0, 1, w).expand(3, h, w)
    return out


def assert_same_tree(got: gp_tree.Tree, want: gp_tree.Tree) -> None:
    for field in gp_tree.Tree.ARRAYS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def tree_case(b, h, w, order, seed, block, first=0):
    guide = guides(b, h, w, seed, first)
    features = guides(b, h, w, seed + 1, first + 1) + 0.25 * guide
    want = gp_tree.build_tree_cpu(guide)
    want_again = gp_tree.reweight_cpu(want.edges, features)
    with harness(order, seed, block):
        got = gp_tree_triton.build_tree_triton(guide)
        got_again = gp_tree_triton.reweight_triton(want.edges, features)
    assert_same_tree(got, want)
    assert_same_tree(got_again, want_again)


TREE_CASES = [  # (B, H, W, order, seed, block)
    (3, 13, 11, "forward", 0, None),  # the module's blocks: padding lanes in the last program
    (1, 7, 5, "reversed", 1, None),
    (2, 7, 5, "random", 2, 16),
]


@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tree_matches_cpu(case):
    tree_case(*case)


def propagate_case(b, k, h, w, order, seed, block, zeta=0.4):
    guide = guides(b, h, w, seed)
    tree = gp_tree.build_tree_cpu(guide)
    unary = torch.rand(b, k, h * w, generator=torch.Generator().manual_seed(seed))
    args = (unary, tree.order, tree.lo, tree.hi, tree.children, tree.altitude, zeta)
    want = gp_propagate.propagate_cpu(*args)
    with harness(order, seed, block):
        got = gp_propagate.propagate_triton(*args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    return got


PROPAGATE_CASES = [  # (B, K, H, W, order, seed, block)
    (3, 2, 13, 11, "forward", 0, None),
    (2, 2, 7, 5, "reversed", 1, 8),
    (1, 2, 5, 3, "random", 2, 2),
]


@pytest.mark.parametrize("case", PROPAGATE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_propagate_matches_cpu(case):
    propagate_case(*case)


def test_propagate_is_bitwise_reproducible_under_any_program_order():
    """float64 outputs expose every rounding: for a given block size, every run and program order
    gives one result (sums follow the tiles, never the schedule)."""
    guide = guides(2, 5, 3, 7)
    tree = gp_tree.build_tree_cpu(guide)
    unary = torch.rand(2, 1, 15, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    args = (unary, tree.order, tree.lo, tree.hi, tree.children, tree.altitude, 0.3)
    plain = [gp_propagate.propagate_triton(*args) for _ in range(2)]
    assert torch.equal(plain[0], plain[1])
    small = []
    for order, seed in [("forward", 0), ("reversed", 0), ("random", 1), ("random", 2)]:
        with harness(order, seed, 8):
            small.append(gp_propagate.propagate_triton(*args))
    for got in small[1:]:
        assert torch.equal(got, small[0])
    for got in (plain[0], small[0]):
        torch.testing.assert_close(got, gp_propagate.propagate_cpu(*args), atol=1e-12, rtol=0)


LP_CASES = [  # (B, K, H, W, kernel size, order, seed, block)
    (3, 5, 13, 11, 3, "forward", 0, None),
    (3, 2, 7, 5, 3, "random", 1, 4),
]


def lp_case(b, k, h, w, ks, order, seed, block):
    """LP (3x3 windows keep to one compile of the cpu stencil: it is generated per window size)."""
    image = guides(b, h, w, seed)
    unary = torch.rand(b, k, h, w, generator=torch.Generator().manual_seed(seed))
    want = lp.lp_cpu_image(unary, image, 0.5, ks, 2)
    with harness(order, seed, block):
        got = lp.lp_triton_image(unary, image, 0.5, ks, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", LP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_lp_matches_cpu(case):
    lp_case(*case)


def test_block_one_and_every_kernel_runs_under_the_harness():
    """BLOCK 1 in every launch, results as on the cpu backend; and every @triton.jit function in
    kernels/ was launched or called under the harness, so a new kernel (or a module without
    `_block`) cannot escape it."""
    LOG.clear()
    tree_case(1, 3, 3, "random", 5, 1)
    propagate_case(2, 1, 3, 3, "random", 5, 1)
    lp_case(1, 2, 3, 3, 3, "random", 5, 1)
    assert LOG and all(blocks and set(blocks.values()) == {1} for _, blocks in LOG), LOG
    missing = set(jit_functions()) - set(LAUNCHED) - set(NOT_LAUNCHED)
    assert not missing, f"jit functions never run under the harness: {sorted(missing)}"


# ----------------------------------------------------------------------------------------------
# the harness itself, on kernels written to break its rules


@triton.jit
def _unmasked_cas_kernel(x, n, BLOCK: tl.constexpr):
    """The pattern of issue 17 item 1: lanes that do not try still CAS their own (padding) address."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_cas(x + offs, tl.where(offs < n, 0, -2), tl.where(offs < n, 1, -2))


@triton.jit
def _chain_kernel(x, BLOCK: tl.constexpr):
    """Correct only if program p - 1 ran before program p: x[p] = x[p - 1] + 1."""
    p = tl.program_id(0)
    if p > 0:
        tl.store(x + p, tl.load(x + p - 1) + 1)


def test_harness_catches_an_unmasked_cas_past_the_end():
    x = torch.zeros(5, dtype=torch.int64)
    _unmasked_cas_kernel[(1,)](x, 5, BLOCK=8)  # the plain interpreter lets it through
    with harness("forward"), pytest.raises(OutOfBounds, match=r"_unmasked_cas_kernel program \(0, 0, 0\): "
                                                              r"atomic_cas through argument 'x' \(5 elements of 8 "
                                                              r"bytes\) reaches element offsets \[5, 6, 7\]"):
        _unmasked_cas_kernel[(1,)](x, 5, BLOCK=8)
    with harness("forward"):
        _unmasked_cas_kernel[(1,)](torch.zeros(8, dtype=torch.int64), 8, BLOCK=8)


def test_harness_checks_against_the_view_passed():
    base = torch.zeros(10, dtype=torch.int64)
    with harness("forward"), pytest.raises(OutOfBounds, match=r"reaches element offsets \[4, 5, 6, 7\]"):
        _unmasked_cas_kernel[(1,)](base[2:6], 4, BLOCK=8)  # lanes 4-7 land inside `base`, not the view


def test_harness_reorders_programs():
    results = {}
    for order in ("forward", "reversed", "random"):
        x = torch.zeros(6, dtype=torch.int32)
        with harness(order, seed=0):
            _chain_kernel[(6,)](x, BLOCK=1)
        results[order] = x.tolist()
    assert results["forward"] == [0, 1, 2, 3, 4, 5]
    assert results["reversed"] == [0, 1, 1, 1, 1, 1]
    assert results["random"] != results["forward"]
