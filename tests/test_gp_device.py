"""The GPU tree build (kernels/gp_tree_triton.py) under TRITON_INTERPRET=1 against the CPU path.

Each shape runs as one batch of guides that stress tie-breaking (constant images, few colours,
ramps that make Borůvka chains), so a batch > 1 is always exercised. Small shapes only: the
interpreter pays per kernel program.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maskclip_apro.kernels import gp_tree, gp_tree_triton


def guides(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(6, 3, h, w): random, few colours, constant, regions, horizontal ramp, anti-diagonal ramp."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    regions = torch.zeros(h, w)
    regions[: h // 2] = 1.0
    regions[:, w // 2 :] += 0.5
    planes = [
        torch.rand(3, h, w, generator=gen),
        torch.randint(0, 3, (3, h, w), generator=gen).float() / 2,
        torch.zeros(3, h, w),
        regions.expand(3, h, w),
        (cols / 4).expand(3, h, w),
        ((rows - cols) / 3).expand(3, h, w),
    ]
    return torch.stack(planes)


def edge_ids(edges: torch.Tensor, h: int, w: int) -> list[set[int]]:
    """Grid edge index of every (src, dst) MST edge, per image."""
    src, dst = gp_tree.grid_edges(h, w)
    index = {(s, d): e for e, (s, d) in enumerate(zip(src.tolist(), dst.tolist()))}
    return [{index[(s, d)] for s, d in image.tolist()} for image in edges]


SHAPES = [(7, 6), (1, 13), (11, 1), (1, 2), (4, 4), (1, 17)]  # 4x4: N-1 = 15 edges; 1x17: 16 (a power of two)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_tree_equals_cpu_tree(shape):
    h, w = shape
    g = guides(h, w)
    cpu = gp_tree.build_tree_cpu(g)
    mst = gp_tree_triton.boruvka_mst(gp_tree.grid_weights(g), h, w)
    assert [set(row.nonzero()[:, 0].tolist()) for row in mst] == edge_ids(cpu.edges, h, w)  # edge for edge
    device = gp_tree_triton.build_tree_triton(g)
    assert (device.height, device.width) == (cpu.height, cpu.width) == (h, w)
    for field in gp_tree.Tree.ARRAYS:  # same sorted MST, KRT children, leaf order and ranges
        assert torch.equal(getattr(device, field), getattr(cpu, field)), field


def test_single_pixels():
    g = torch.rand(3, 2, 1, 1)
    device, cpu = gp_tree_triton.build_tree_triton(g), gp_tree.build_tree_cpu(g)
    for field in gp_tree.Tree.ARRAYS:
        a, b = getattr(device, field), getattr(cpu, field)
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), field


@pytest.mark.parametrize("shape", [(4, 4), (1, 17), (5, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_reweight_equals_cpu_and_reference(shape):
    """KRT of a given tree under new weights with many ties (few distinct feature values)."""
    h, w = shape
    gen = torch.Generator().manual_seed(5)
    tree = gp_tree.build_tree_cpu(torch.rand(3, 3, h, w, generator=gen))
    features = torch.randint(0, 2, (3, 2, h, w), generator=gen).float()
    device = gp_tree_triton.reweight_triton(tree.edges, features)
    cpu = gp_tree.reweight_cpu(tree.edges, features)
    reference = gp_tree.reweight_reference(tree.edges, features)
    for field in gp_tree.Tree.ARRAYS:
        assert torch.equal(getattr(device, field), getattr(cpu, field)), field
        assert torch.equal(getattr(reference, field), getattr(cpu, field)), field


class HostReads(TorchDispatchMode):
    """Records the torch ops whose result the host must wait for (output sizes or values read on the host)."""

    SYNC = {"nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique2"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_launch_counts_are_logarithmic_and_fixed(monkeypatch):
    """Rounds, levels and jumps: O(log N) launches per stage, fixed by the shape (not the data), no host reads."""
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host read: Tensor.tolist") or tolist(self))
    h, w = 9, 8
    n, m = h * w, h * w - 1
    counts = []
    for g in (guides(h, w)[1:2], guides(h, w)[4:5]):
        gp_tree_triton.COUNTS.clear()
        with HostReads() as reads:
            gp_tree_triton.build_tree_triton(g)
        assert reads.ops == []
        counts.append(dict(gp_tree_triton.COUNTS))
    assert counts[0] == counts[1]
    counts = counts[0]
    rounds = math.ceil(math.log2(n))
    for kernel in ["_mst_min_kernel", "_mst_union_kernel", "_mst_compress_kernel"]:
        assert counts[kernel] == rounds
    for kernel in ["_krt_hook_kernel", "_krt_union_kernel", "_krt_top_kernel", "_krt_relabel_kernel"]:
        assert counts[kernel] == m.bit_length()
    assert counts["_rank_kernel"] == math.ceil(math.log2(2 * (2 * n - 1) - 1))
    assert counts["_tour_kernel"] == counts["_ranges_kernel"] == 1


@pytest.mark.parametrize("order, block, shape", [("random", 2, (2, 3)), ("reversed", 4, (1, 5))])
def test_device_tree_is_order_proof_with_small_blocks(order, block, shape):
    """Programs shuffled or reversed, 2 or 4 elements per program, every access bounds-checked (tests/triton_harness.py).

    Two images (few colours, a ramp that chains Borůvka's picks): the interpreter pays per program.
    """
    from triton_harness import harness

    h, w = shape
    g = guides(h, w, seed=block)[[1, 4]]
    cpu = gp_tree.build_tree_cpu(g)
    features = torch.randint(0, 2, (2, 2, h, w), generator=torch.Generator().manual_seed(1)).float()
    with harness(order, seed=block, block=block):
        device = gp_tree_triton.build_tree_triton(g)
        again = gp_tree_triton.reweight_triton(cpu.edges, features)
    expected_again = gp_tree.reweight_cpu(cpu.edges, features)
    for field in gp_tree.Tree.ARRAYS:
        assert torch.equal(getattr(device, field), getattr(cpu, field)), field
        assert torch.equal(getattr(again, field), getattr(expected_again, field)), field


@pytest.mark.skipif(not torch.cuda.is_available() or gp_tree_triton.INTERPRETED, reason="needs a GPU, no interpreter")
def test_cuda_graph_replay_equals_cpu():  # pragma: no cover - needs a GPU
    """The captured build (first call) and its replays (later calls, new data) give the cpu backend's trees."""
    h, w = 9, 8
    for seed in range(3):
        g = guides(h, w, seed=seed)
        device = gp_tree_triton.build_tree_triton(g.cuda())
        cpu = gp_tree.build_tree_cpu(g)
        features = torch.rand(6, 2, h, w, generator=torch.Generator().manual_seed(seed))
        again = gp_tree_triton.reweight_triton(cpu.edges.cuda(), features.cuda())
        expected_again = gp_tree.reweight_cpu(cpu.edges, features)
        for field in gp_tree.Tree.ARRAYS:
            assert torch.equal(getattr(device, field).cpu(), getattr(cpu, field)), field
            assert torch.equal(getattr(again, field).cpu(), getattr(expected_again, field)), field
    assert len(gp_tree_triton._GRAPHS) >= 2 and all(entry[0] is not None for entry in gp_tree_triton._GRAPHS.values())
