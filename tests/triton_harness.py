"""Run Triton kernels under the interpreter with shuffled programs, small blocks and bounds checks.

The interpreter (TRITON_INTERPRET=1) runs a launch's programs one after another in grid order,
with whatever block the caller chose, and reads or writes any address a lane computes. A kernel
that is only correct in that order, or only with one block size, or that touches memory outside
its tensors, passes there and fails on a GPU. `harness(...)` changes three things while active:

- order: the programs of every launch run in "forward", "reversed" or "random" (seeded) order;
- block: every kernel module in `maskclip_apro.kernels` chooses its elements per program through a
  module-level `_block(...)`; the harness replaces each with one returning `block` (None keeps
  the module's choice). Every launch records its BLOCK* constexprs (`LOG`), so a test can check
  the override reached every kernel;
- bounds: every pointer argument maps to its tensor's bytes [data_ptr, data_ptr + extent); the
  provenance travels with each pointer through the interpreter's ops (a pointer built from
  several arguments may lie in any of them), and every load, store and atomic fails with
  `OutOfBounds` (kernel, program, op, argument, element offsets) when a lane it executes (mask
  true; `atomic_cas` has no mask, so every lane) lies outside. The check runs before the access.

Nothing here names a kernel: kernels are found by their module (`jit_functions`) and every
launch and device-function call is counted in `LAUNCHED`. Tied to triton 3.8's interpreter
(triton/runtime/interpreter.py: GridExecutor.__call__, InterpretedFunction.__call__, and the
InterpreterBuilder's create_* methods).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import itertools
import pkgutil
import random

import numpy as np
import triton
import triton.language as tl
import triton.runtime.interpreter as interp

import maskclip_apro.kernels as kernels_pkg

LAUNCHED: collections.Counter = collections.Counter()  # "module.function" -> launches and device calls
LOG: list[tuple[str, dict]] = []  # (kernel, its BLOCK* constexprs) per launch while a harness is active
_TAG = "harness_args"  # TensorHandle.attr key: names of the arguments a pointer may point into
_CHECKED = {"create_masked_load": (0, 1), "create_masked_store": (0, 2), "create_atomic_rmw": (1, 3),
            "create_atomic_cas": (0, None)}  # method -> (pointer position, mask position)
_ORIGINAL = {"grid": interp.GridExecutor.__call__, "device": interp.InterpretedFunction.__call__}


class OutOfBounds(AssertionError):
    """A lane that executes a memory op addresses bytes outside every tensor its pointer came from."""


class _State:
    order = "forward"
    rng = random.Random(0)
    kernel = ""
    program = (0, 0, 0)
    ranges: dict[str, tuple[int, int, int]] = {}  # argument -> (first byte, end byte, element size)
    scope = None  # the running launch's patches of triton.language
    patched: set = set()  # modules whose triton.language the running launch has patched


def jit_functions() -> dict[str, object]:
    """Every @triton.jit function defined in a module of maskclip_apro.kernels, by "module.name"."""
    found = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, interp.InterpretedFunction) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def _key(fn) -> str:
    return f"{fn.__module__}.{fn.__name__}"


def _extent(tensor) -> tuple[int, int, int]:
    """Bytes [start, end) spanned by a (possibly strided) tensor view, and its element size."""
    t = tensor.base if isinstance(tensor, triton.runtime.jit.TensorWrapper) else tensor
    size = t.element_size()
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr(), size
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * size, size


def _check(op: str, ptrs, mask) -> None:
    active = np.ones(ptrs.data.shape, bool) if mask is None else np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)
    if not active.any():
        return
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    addr = ptrs.data[active].astype(np.int64)
    names = sorted(ptrs.attr.get(_TAG, _State.ranges))  # no provenance: any argument will do
    ok = np.zeros(addr.shape, bool)
    for name in names:
        start, end, _ = _State.ranges[name]
        ok |= (addr >= start) & (addr + width <= end)
    if ok.all():
        return
    name = names[0] if names else "?"
    start, end, size = _State.ranges.get(name, (0, 0, 1))
    bad = (addr[~ok] - start) // width
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    raise OutOfBounds(
        f"{_State.kernel} program {_State.program}: {op.removeprefix('create_')} through argument "
        f"{' / '.join(repr(n) for n in names) or '(none)'} ({(end - start) // size} elements of {size} bytes) "
        f"reaches element offsets [{shown}] ({bad.size} of {addr.size} executing lanes)"
    )


def _checked(name: str, method):
    ptr_at, mask_at = _CHECKED[name]

    def op(*args):
        _check(name, args[ptr_at], None if mask_at is None else args[mask_at])
        return method(*args)

    return op


def _tracked(method):
    """Builder op whose pointer result inherits the provenance of its pointer operands."""

    def op(*args, **kwargs):
        out = method(*args, **kwargs)
        if isinstance(out, interp.TensorHandle) and isinstance(out.dtype, tl.pointer_type) and _TAG not in out.attr:
            tags = [a.attr[_TAG] for a in args if isinstance(a, interp.TensorHandle) and _TAG in a.attr]
            if tags:
                out.attr[_TAG] = frozenset().union(*tags)
        return out

    return op


def _unchecked(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"tests/triton_harness.py does not bounds-check {name}; extend it first")

    return op


def _run_grid(self, *args_dev, **kwargs):
    """GridExecutor.__call__ with the harness's program order, argument ranges and launch log."""
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    scope = _State.scope = interp._patch_lang(self.fn)
    _State.patched = {self.fn.__module__}
    kernel = _key(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        ranges = {n: _extent(a) for n, a in args.items() if n not in self.constexprs and hasattr(a, "data_ptr")}
        args = {n: a if n in self.constexprs else interp._implicit_cvt(a) for n, a in args.items()}
        for name in ranges:
            args[name].handle.attr[_TAG] = frozenset([name])
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        programs = list(itertools.product(*(range(g) for g in grid)))
        if _State.order == "reversed":
            programs.reverse()
        elif _State.order == "random":
            _State.rng.shuffle(programs)
        LAUNCHED[kernel] += 1
        LOG.append((kernel, {n: args[n] for n in self.constexprs if n.startswith("BLOCK")}))
        _State.kernel, _State.ranges = kernel, ranges
        interp.interpreter_builder.set_grid_dim(*grid)
        for program in programs:
            _State.program = program
            interp.interpreter_builder.set_grid_idx(*program)
            self.fn(**args)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, (OutOfBounds, NotImplementedError)):
            cause = cause.__cause__
        if cause is not None:
            raise cause.with_traceback(None) from None
        raise interp.InterpreterError(repr(e)) from e
    finally:
        scope.restore()
        _State.ranges, _State.scope = {}, None
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def _device_call(self, *args, **kwargs):
    """A jit function called from a kernel: counted; triton.language patched once per launch and module."""
    LAUNCHED[_key(self.fn)] += 1
    if _State.scope is not None and self.fn.__module__ not in _State.patched:
        _State.patched.add(self.fn.__module__)
        _State.scope._changes.extend(interp._patch_lang(self.fn)._changes)  # restored with the launch's
    return self.rewrite()(*args, **kwargs)


@contextlib.contextmanager
def harness(order: str = "random", seed: int = 0, block: int | None = None):
    """Run every Triton launch inside with programs in `order`, `block` elements per program, bounds-checked."""
    if order not in ("forward", "reversed", "random"):
        raise ValueError(f"order must be forward, reversed or random, got {order!r}")
    builder = interp.interpreter_builder
    patched_builder = []
    patched_modules = []
    for name, method in inspect.getmembers(builder, inspect.ismethod):
        if name in _CHECKED:
            wrapper = _checked(name, method)
        elif "descriptor" in name:
            wrapper = _unchecked(name)
        elif name.startswith("create_") or name in ("binary_op", "ternary_op", "unary_op", "cast_impl"):
            wrapper = _tracked(method)
        else:
            continue
        setattr(builder, name, wrapper)
        patched_builder.append(name)
    if block is not None:
        for info in pkgutil.iter_modules(kernels_pkg.__path__):
            module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
            if callable(getattr(module, "_block", None)):
                patched_modules.append((module, module._block))
                module._block = lambda *args, **kwargs: block
    _State.order, _State.rng = order, random.Random(seed)
    interp.GridExecutor.__call__ = _run_grid
    interp.InterpretedFunction.__call__ = _device_call
    try:
        yield
    finally:
        interp.GridExecutor.__call__ = _ORIGINAL["grid"]
        interp.InterpretedFunction.__call__ = _ORIGINAL["device"]
        for name in patched_builder:
            delattr(builder, name)
        for module, original in patched_modules:
            module._block = original
        _State.order = "forward"
