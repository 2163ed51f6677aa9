"""The package's shape: the import graph built from the source (every import, function-level ones
included) has no cycle, and dependencies point one way through the layers (docs/architecture.md)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ["finetune", "finetune.errors", "finetune.allocator", "finetune.environment", "finetune.progress"],
    ["finetune.config"],
    ["finetune.data"],
    ["finetune.models"],
    ["finetune.adapters"],
    ["finetune.tasks"],
    ["finetune.run"],
    ["finetune.inference"],
    ["finetune.outputs"],
    ["finetune.training"],
    ["finetune.report"],
    ["finetune.cli", "finetune.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The finetune module an imported name refers to (``finetune.a.b.func`` → ``finetune.a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            target = resolve(name)
            if target and target != module:
                found.add(target)
    return found  # `from finetune.x import y` imports the package finetune.x too: its __init__ runs


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> int:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_package():
    assert len(MODULES) > 40
    assert "finetune.training.checkpoint" in GRAPH["finetune.training.loop"]
    # a function-level import is an edge too
    assert "finetune.outputs.merge" in GRAPH["finetune.training.loop"]
    assert "finetune.adapters" in GRAPH["finetune.training.loop"]  # from finetune import adapters


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_dependencies_point_down_the_layers():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, "imports of a later layer: " + "; ".join(sorted(upward))


def test_every_subpackage_is_installed():
    """pyproject.toml lists the packages a wheel carries: each folder with an __init__.py is there
    (an editable install finds them all anyway, so only this test sees a missing one)."""
    import re

    text = (PACKAGE.parent / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(finetune[\w.]*)"', re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)))
    found = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
