"""dynaconv's modules import each other without cycles, also counting imports inside functions.

An import placed inside a function to dodge a cycle still is one: the two modules depend on
each other, so neither can be read, tested or loaded alone. The graph is built from the source
(``ast``): every ``import`` of a dynaconv module anywhere in a module, except under
``if TYPE_CHECKING:`` (annotations only), is an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dynaconv

ROOT = Path(dynaconv.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ["dynaconv", *path.relative_to(ROOT).with_suffix("").parts]
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _module_level(tree: ast.Module) -> set[int]:
    """The statements that run on import: top level, also inside top-level ``if``/``try``."""
    nodes = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If | ast.Try):
            nodes |= {id(child) for child in ast.walk(node)}
    return nodes


def _imports(name: str, package: bool, tree: ast.Module, modules) -> list[tuple[str, bool]]:
    """``(imported dynaconv module, whether the import runs at module level)`` pairs."""
    skipped = _type_checking_nodes(tree)
    module_level = _module_level(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if package else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            # ``from package import submodule`` needs the submodule (the package is its parent,
            # already importing); ``from module import name`` needs the module.
            targets = [t for t in submodules if t in modules] or [module]
        else:
            continue
        top = id(node) in module_level
        found += [(t, top) for t in targets if t in modules and t != name]
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    modules = _modules()
    graph, imports = {}, {}
    for name, (path, package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        imports[name] = _imports(name, package, tree, modules)
        graph[name] = {target for target, _ in imports[name]}
    return graph, imports


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_package():
    graph, _ = _graph()
    assert "dynaconv.layers.condconv" in graph and "dynaconv.dispatch" in graph
    assert "dynaconv.layers.condconv.functional" in graph["dynaconv.layers.condconv.layer"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_dynaconv_modules():
    graph, _ = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_kernels_and_functional_import_dynaconv_at_module_level():
    """No lazy import of another dynaconv module inside a function (the kind a cycle forces)."""
    _, imports = _graph()
    lazy = [
        f"{name} -> {target}"
        for name, found in imports.items()
        if name.startswith(("dynaconv.layers", "dynaconv.kernels", "dynaconv.spec"))
        for target, module_level in found
        if not module_level
    ]
    assert not lazy, "imports inside functions: " + ", ".join(lazy)
