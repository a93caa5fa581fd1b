"""The packages' import graph has no circle (every import counts, TYPE_CHECKING or not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lb", "mesh", "registry", "sidecar", "mesh_native")


def import_graph() -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).glob("*.py"):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            found = set()
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
            deps[name] = found
    return {m: {d for d in found if d in deps and d != m} for m, found in deps.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d, [*path, d])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_module_imports_in_a_circle():
    graph = import_graph()
    assert "lb.proxy" in graph and "lb.server" in graph["lb.proxy"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_check_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
