"""Every third-party package that pyengine/ imports is declared in pyproject.toml's dependencies."""
import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_import_is_declared():
    declared = declared_distributions()
    module_to_dists = packages_distributions()
    undeclared = {}
    for module, files in imported_top_level_modules(ROOT / "pyengine").items():
        if module in sys.stdlib_module_names or module == "pyengine":
            continue
        # A module not installed here is taken to be its own distribution name.
        dists = {d.lower().replace("_", "-") for d in module_to_dists.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(files)
    assert undeclared == {}, f"imported by pyengine/ but not in pyproject.toml's dependencies: {undeclared}"


def test_every_declared_dependency_has_a_lower_bound():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if ">=" not in d] == []
