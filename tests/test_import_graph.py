"""pyengine's modules import each other without cycles: the pipeline (load -> quantize -> model ->
kernels -> generate -> energy) and the bench beside it form a directed acyclic graph. Imports inside
functions count too: a cycle hidden in a function still ties the two modules together."""
import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "pyengine"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (what `from module import name` can take from it)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def import_graph() -> dict[str, set[str]]:
    """pyengine module -> the pyengine modules it names in any import statement, anywhere in it.
    `from package import name` points at package.name where that is a module, else at the package
    where the package defines the name."""
    files = {module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in files.items()}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(trees[name]):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[:len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in files:
                        targets.add(full)
                    elif base in files and alias.name in top_level_names(trees[base]):
                        targets.add(base)
                    # else a compiled submodule (pyengine._C), which imports nothing of pyengine's
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []  # state: 1 on the current path, 2 finished

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_correctly():
    graph = import_graph()
    assert "pyengine.kernels.backends" in graph["pyengine.engine"]  # module level
    assert "pyengine.runtime.scheduler" in graph["pyengine.engine"]  # inside a function
    assert "pyengine.engine" in graph["pyengine"]
    assert "pyengine" not in graph["pyengine.kernels.backends"]  # `from pyengine import _C`: the compiled module
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
