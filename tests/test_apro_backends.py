"""The backend contract: one table (kernels/registry.py), every backend reachable, one device rule, clear errors."""

from __future__ import annotations

import pytest
import torch

import maskclip_apro.kernels._triton as ktriton
from maskclip_apro.apro import build_tree, global_propagation, local_propagation, propagate, reweight
from maskclip_apro.kernels import registry


def inputs(h: int = 4, w: int = 5):
    gen = torch.Generator().manual_seed(0)
    guide = torch.rand(2, 3, h, w, generator=gen)
    unary = torch.rand(2, 3, h, w, generator=gen).softmax(1)
    features = torch.rand(2, 4, h, w, generator=gen)
    return guide, unary, features


def call_all(backend: str, guide, unary, features) -> dict[str, torch.Tensor]:
    """Every public entry point once with `backend`; tensors to compare across backends."""
    tree = build_tree(guide, backend=backend)
    again = reweight(tree, features, backend=backend)
    return {
        "build_tree": torch.cat([tree.children.flatten(), tree.order.flatten(), tree.lo.flatten(), tree.hi.flatten()]),
        "reweight": torch.cat([again.children.flatten(), again.order.flatten(), again.lo.flatten()]),
        "propagate": propagate(again, unary, 0.5, backend=backend),
        "global_propagation": global_propagation(unary, guide, 0.5, backend=backend),
        "local_propagation": local_propagation(unary, guide, kernel_size=3, iters=2, backend=backend),
    }


def test_table_is_complete():
    assert set(registry.OPS) == {"build_tree", "reweight", "propagate", "local_propagation"}
    for op, impls in registry.OPS.items():
        assert set(impls) == {"torch", "cpu", "triton"}, op


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_each_backend_is_reached_through_the_public_api(backend, monkeypatch):
    calls = []
    for op, impls in registry.OPS.items():
        fn = impls[backend]
        monkeypatch.setitem(impls, backend, lambda *a, _fn=fn, _op=op: calls.append(_op) or _fn(*a))
    guide, unary, features = inputs()
    got = call_all(backend, guide, unary, features)
    assert calls == ["build_tree", "reweight", "propagate", "build_tree", "propagate", "local_propagation"]
    ref = call_all("torch", guide, unary, features)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)


def test_auto_resolution(monkeypatch):
    assert registry.resolve("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(registry.selfcheck, "triton_verified", lambda device, ops: True)
    assert registry.resolve("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(registry.selfcheck, "triton_verified", lambda device, ops: False)
    assert registry.resolve("auto", torch.device("cuda")) == "cpu"  # Triton disagreed with the CPU path there
    monkeypatch.setattr(ktriton, "triton_ready", lambda device: False)
    assert registry.resolve("auto", torch.device("cuda")) == "cpu"  # no usable Triton: the CPU path (host copy)


def test_unknown_backend_lists_the_choices():
    guide, unary, features = inputs()
    tree = build_tree(guide, backend="cpu")
    for fn in [
        lambda: build_tree(guide, backend="gpu"),
        lambda: reweight(tree, features, backend="numba"),
        lambda: propagate(tree, unary, 0.5, backend="fast"),
        lambda: global_propagation(unary, guide, 0.5, backend="cuda"),
        lambda: local_propagation(unary, guide, backend="Triton"),
    ]:
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'cpu', 'triton'\)"):
            fn()


def triton_calls(guide, unary, features):
    tree = build_tree(guide, backend="cpu")
    return [
        lambda: build_tree(guide, backend="triton"),
        lambda: reweight(tree, features, backend="triton"),
        lambda: propagate(tree, unary, 0.5, backend="triton"),
        lambda: global_propagation(unary, guide, 0.5, backend="triton"),
        lambda: local_propagation(unary, guide, backend="triton"),
    ]


def test_triton_on_cpu_tensors_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(ktriton, "INTERPRETED", False)
    for fn in triton_calls(*inputs()):
        with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors.*got tensors on cpu"):
            fn()


def test_triton_missing_raises(monkeypatch):
    monkeypatch.setattr(ktriton, "triton", None)
    for fn in triton_calls(*inputs()):
        with pytest.raises(ValueError, match="needs the triton package"):
            fn()


@pytest.fixture(scope="module")
def lazy():
    """torch's lazy-tensor device: a second real device on a CPU-only machine."""
    ts_backend = pytest.importorskip("torch._lazy.ts_backend")
    ts_backend.init()
    return torch.device("lazy")


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_cpu_backend_copies_to_the_host_and_back(lazy, backend):
    """The device rule: the CPU path computes on the host and returns on the inputs' device."""
    guide, unary, features = inputs()
    tree = build_tree(guide.to(lazy), backend=backend)
    assert tree.device.type == "lazy" and tree.order.device.type == "lazy"
    again = reweight(tree, features.to(lazy), backend=backend)
    outputs = {
        "propagate": propagate(again, unary.to(lazy), 0.5, backend=backend),
        "global_propagation": global_propagation(unary.to(lazy), guide.to(lazy), 0.5, backend=backend),
        "local_propagation": local_propagation(unary.to(lazy), guide.to(lazy), kernel_size=3, iters=2, backend=backend),
    }
    expected = call_all("cpu", guide, unary, features)
    assert torch.equal(again.children.cpu(), reweight(build_tree(guide), features).children)
    for name, y in outputs.items():
        assert y.device.type == "lazy", name
        torch.testing.assert_close(y.cpu(), expected[name], atol=0, rtol=0)


def test_triton_never_moves_tensors_to_another_device(lazy, monkeypatch):
    monkeypatch.setattr(ktriton, "INTERPRETED", False)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors.*got tensors on lazy"):
        build_tree(inputs()[0].to(lazy), backend="triton")
