"""The package's import graph: acyclic, and layered as docs/architecture.md draws it.

The graph is read from the source with ast, so it holds every import, including those inside
functions (a lazy import that breaks a cycle at run time is still a cycle of the design). An
edge A -> B means module A imports module B; importing a.b.c from outside the package a.b
also runs a.b's __init__, so that edge is added too (the root package's excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import maskclip_apro
import maskclip_apro.kernels

ROOT = "maskclip_apro"
# Components (maskclip_apro.<name>) by layer: a component imports only components of lower layers.
LAYERS = [
    {"constants", "checks", "palette", "geometry", "samples", "distributed"},
    {"writing", "kernels"},
    {"apro", "data", "generator", "postprocess"},
    {"refiners"},
    {"config", "schema", "visualize"},
    {"segmenter"},
    {"", "evaluation"},  # "" is the root package (maskclip_apro/__init__.py: the public API)
    {"pipeline", "student"},
    {"cli", "demo"},
]
# Where Hydra and OmegaConf may be imported: the edge that turns configs into plain values.
CONFIG_EDGE = ("maskclip_apro.config", "maskclip_apro.schema", "maskclip_apro.cli", "maskclip_apro.student.trainer")


def _sources() -> dict[str, Path]:
    """Module name -> file, for maskclip_apro/ and kernels/ (installed as maskclip_apro.kernels)."""
    bases = ((Path(maskclip_apro.__file__).parent, ROOT), (Path(maskclip_apro.kernels.__file__).parent, f"{ROOT}.kernels"))
    modules = {}
    for base, prefix in bases:
        for path in base.rglob("*.py"):
            parts = [prefix, *path.relative_to(base).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package modules it imports, module -> the top-level outside packages it imports)."""
    modules = _sources()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    inner: dict[str, set[str]] = {m: set() for m in modules}
    outer: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if module in packages else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                base = node.module if node.level == 0 else ".".join(
                    parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != ROOT:
                    outer[module].add(target.split(".")[0])
                    continue
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                chain = target.split(".")
                for depth in range(2, len(chain) + 1):
                    ancestor = ".".join(chain[:depth])
                    if depth == len(chain) or not (module == ancestor or module.startswith(ancestor + ".")):
                        inner[module].add(ancestor)
        inner[module].discard(module)
    return inner, outer


def _component(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_acyclic():
    cycle = _find_cycle(_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_component_has_a_layer():
    components = {_component(m) for m in _graph()[0]}
    placed = set().union(*LAYERS)
    assert components <= placed, f"components without a layer in LAYERS: {sorted(components - placed)}"


def test_components_import_only_lower_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _graph()[0].items()
        for target in targets
        if _component(target) != _component(module) and layer[_component(target)] >= layer[_component(module)]
    )
    assert not upward, "imports against the layering (docs/architecture.md):\n" + "\n".join(upward)


def test_refiners_and_kernels_know_nothing_of_generators_data_commands_or_configs():
    inner, outer = _graph()
    for module in inner:
        if _component(module) in ("refiners", "kernels", "apro"):
            assert not {_component(t) for t in inner[module]} & {"generator", "data", "cli", "student", "config"}, module
            assert not outer[module] & {"hydra", "omegaconf"}, module


def test_hydra_and_omegaconf_stay_at_the_config_edge():
    _, outer = _graph()
    users = sorted(m for m, names in outer.items() if names & {"hydra", "omegaconf"})
    assert [m for m in users if not m.startswith(CONFIG_EDGE)] == []
