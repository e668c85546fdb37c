"""The packages of saesweep depend on each other in one direction: no import cycle.

A node is a subpackage or a top-level module of saesweep/ (the package's own __init__.py is
the node `saesweep`); an edge is any import between two nodes, at module level or inside a
function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "saesweep"
ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"


def node_of(dotted: str) -> str:
    """The node a module or an imported name `saesweep.X...` belongs to."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return "saesweep"
    top = ROOT / parts[1]
    return parts[1] if top.with_suffix(".py").exists() or top.is_dir() else "saesweep"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(stmt: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` statement in `module` imports from."""
    if not stmt.level:
        return stmt.module or ""
    parts = module.split(".")
    package = parts[: len(parts) + is_package - stmt.level]
    return ".".join(package + ([stmt.module] if stmt.module else []))


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every saesweep module or name `tree` imports, as dotted names."""
    names = set()
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.Import):
            names.update(alias.name for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = absolute(stmt, module, is_package)
            names.update(f"{base}.{alias.name}" for alias in stmt.names)
    return {name for name in names if name.split(".")[0] == "saesweep"}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        source = node_of(module)
        tree = ast.parse(path.read_text(), str(path))
        targets = {node_of(name) for name in imported(tree, module, path.stem == "__init__")}
        graph.setdefault(source, set()).update(targets - {source})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            if cycle := visit(target, [*path, node]):
                return cycle
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node, []))), None)


def documented_order() -> list[list[str]]:
    """The layers of docs/architecture.md's dependency line, lowest first."""
    text = ARCHITECTURE.read_text().split("## Dependencies between packages", 1)[1]
    line = text.split("```\n", 2)[1].strip()
    return [layer.split(", ") for layer in line.split(" <- ")]


def test_graph_sees_every_package():
    graph = import_graph()
    assert {"collect", "format", "store", "train", "errors", "saesweep"} <= set(graph)
    assert "format" in graph["collect"] and "store" in graph["format"]


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between saesweep's packages: " + " -> ".join(cycle)


def test_architecture_doc_states_the_import_order():
    layer = {name: i for i, names in enumerate(documented_order()) for name in names}
    graph = import_graph()
    assert sorted(layer) == sorted(graph), "docs/architecture.md names other packages"
    upward = [(a, b) for a, targets in graph.items() for b in targets if layer[b] >= layer[a]]
    assert not upward, f"imports docs/architecture.md's dependency line does not allow: {upward}"
