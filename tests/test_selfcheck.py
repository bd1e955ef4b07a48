"""backend="auto"'s Triton self-check (kernels/selfcheck.py): correct kernels pass it, a wrong or failing
kernel makes "auto" fall back to "cpu" with one warning line, and the verdict is cached per device.

The kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py); the passing check uses
12x12 guides instead of the 64x64 a GPU runs, because the interpreter pays per kernel program.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from maskclip_apro.kernels import gp_tree, registry, selfcheck

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    selfcheck.forget()
    yield
    selfcheck.forget()


def test_the_triton_kernels_pass_their_self_check():
    assert selfcheck.verify(CPU, registry.OPS, size=12) is None


def test_the_guides_are_tie_heavy():
    g = selfcheck.guides()
    weights = gp_tree.grid_weights(g)
    for image in weights:  # most edges share their weight with many others: tie-breaking decides the tree
        assert image.unique().numel() <= 64 and image.numel() == 2 * 64 * 63


def wrong_tree(guide):
    tree = gp_tree.build_tree_cpu(guide.cpu())
    return dataclasses.replace(tree, order=tree.order.flip(-1))


def broken_launch(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")


@pytest.mark.parametrize(
    "op, impl, message",
    [
        ("build_tree", wrong_tree, "build_tree differs from the cpu backend in tree.order"),
        ("build_tree", broken_launch,
         "build_tree failed (RuntimeError: CUDA error: an illegal memory access was encountered)"),
    ],
)
def test_a_wrong_or_failing_kernel_means_the_cpu_backend_and_one_warning(op, impl, message, monkeypatch, caplog):
    monkeypatch.setitem(registry.OPS[op], "triton", impl)
    with caplog.at_level(logging.WARNING, logger="maskclip_apro.kernels.selfcheck"):
        assert selfcheck.triton_verified(CPU, registry.OPS) is False
        assert selfcheck.triton_verified(CPU, registry.OPS) is False  # cached: checked and reported once
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "\n" not in line
    assert line == f"backend=auto on cpu uses the cpu backend: the Triton self-check failed: {message} " \
                   "(backend='triton' runs the kernels anyway)"


def test_a_propagation_off_by_more_than_the_tolerance_is_caught(monkeypatch):
    tree_op = registry.OPS["build_tree"]
    monkeypatch.setitem(tree_op, "triton", lambda g: gp_tree.build_tree_cpu(g.cpu()))
    monkeypatch.setitem(registry.OPS["reweight"], "triton", lambda e, f: gp_tree.reweight_cpu(e.cpu(), f.cpu()))
    cpu_propagate = registry.OPS["propagate"]["cpu"]
    monkeypatch.setitem(registry.OPS["propagate"], "triton", lambda u, *rest: cpu_propagate(u, *rest) + 1e-4)
    assert selfcheck.verify(CPU, registry.OPS, size=8).startswith("propagate differs from the cpu backend by 0.0001")


def test_auto_on_cuda_falls_back_when_the_check_fails(monkeypatch):
    """resolve("auto", cuda) runs the check for that device once; the failing verdict picks "cpu"."""
    calls = []
    monkeypatch.setattr(registry._triton, "triton_ready", lambda device: True)
    monkeypatch.setattr(selfcheck, "verify", lambda device, ops: calls.append(str(device)) or "propagate differs")
    cuda = torch.device("cuda:0")
    assert [registry.resolve("auto", cuda) for _ in range(3)] == ["cpu"] * 3
    assert calls == ["cuda:0"]
    assert registry.resolve("triton", cuda) == "triton"  # asked for by name: never checked
