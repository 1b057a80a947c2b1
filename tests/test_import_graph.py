"""dynaconv's modules import each other without cycles, also counting imports inside functions
and imports for annotations only; the ground floor never reaches up to a family.

An import placed inside a function to dodge a cycle still is one: the two modules depend on
each other, so neither can be read, tested or loaded alone; nor can they when one imports the
other under ``if TYPE_CHECKING:``. The graphs are built from the source (``ast``): the runtime
graph has an edge for every ``import`` of a dynaconv module anywhere in a module, except under
``if TYPE_CHECKING:``; the type-only graph has those edges too.

The ground floor (:data:`GROUND_FLOOR`: ``nn.Conv2d``'s arguments, padding, the execution-form
vocabulary, the registries and the layer contract) imports only itself and names no family:
adding a family is adding a folder under ``dynaconv/layers/``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dynaconv
import dynaconv.families

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


#: The modules below the family packages.
GROUND_FLOOR = (
    "dynaconv.spec",
    "dynaconv.padding",
    "dynaconv.folding",
    "dynaconv.heap",
    "dynaconv.native",
    "dynaconv.dispatch",
    "dynaconv.kernels",
    "dynaconv.registry",
    "dynaconv.reference",
    "dynaconv.families",
    "dynaconv.layers._base",
)


def _imports(
    name: str, package: bool, tree: ast.Module, modules, type_only: bool = False
) -> list[tuple[str, bool]]:
    """``(imported dynaconv module, whether the import runs at module level)`` pairs; with
    ``type_only``, the imports under ``if TYPE_CHECKING:`` are counted too."""
    skipped = set() if type_only else _type_checking_nodes(tree)
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


def _graph(
    type_only: bool = False,
) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    modules = _modules()
    graph, imports = {}, {}
    for name, (path, package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        imports[name] = _imports(name, package, tree, modules, type_only)
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


def test_no_import_cycle_counting_imports_for_annotations():
    graph, _ = _graph(type_only=True)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle (with TYPE_CHECKING imports): " + " -> ".join(cycle or [])


def test_the_type_only_graph_sees_annotation_imports():
    runtime, _ = _graph()
    typed, _ = _graph(type_only=True)
    assert "dynaconv.spec" in typed["dynaconv.layers.dgc.functional"]
    assert "dynaconv.spec" not in runtime["dynaconv.layers.dgc.functional"]


def test_the_ground_floor_imports_only_the_ground_floor():
    graph, _ = _graph(type_only=True)
    assert set(GROUND_FLOOR) <= set(graph)
    upward = [
        f"{name} -> {target}"
        for name in GROUND_FLOOR
        for target in sorted(graph[name])
        if target not in GROUND_FLOOR
    ]
    assert not upward, "the ground floor imports: " + ", ".join(upward)


def _family_words() -> set[str]:
    words = set()
    for name, family in dynaconv.families.FAMILIES.items():
        words |= {name, family.layer.__name__, family.layer.title}
    return {w.lower() for w in words if w}


def _code_words(tree: ast.Module) -> set[str]:
    """The identifiers and string constants of ``tree``'s code (docstrings left out)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update(node.name.split("."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words.update(re.findall(r"[A-Za-z0-9_-]+", node.value))
    return {w.lower() for w in words}


def test_the_ground_floor_names_no_family():
    modules = _modules()
    family_words = _family_words()
    assert {"condconv", "dgc", "learnedgroupconv2d"} <= family_words
    named = {
        name: sorted(_code_words(ast.parse(modules[name][0].read_text())) & family_words)
        for name in GROUND_FLOOR
    }
    assert not any(named.values()), f"family names in ground-floor code: {named}"


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
