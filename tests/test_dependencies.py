"""Every module the installed package imports at run time is a declared dependency (issue: the README's serve
command once died on an undeclared `httpx`). Read from the source, so an import inside a function cannot hide."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = {"server", "pipeline"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.split(r"[\s<>=!~\[;(]", requirement, maxsplit=1)[0])


def _imports() -> dict[str, set[str]]:
    """{top-level module: {"file" or "file (lazy)"}} over server/ and pipeline/, third-party modules only; "lazy"
    marks an import inside a function."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "server").rglob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            where = str(path.relative_to(ROOT)) + ("" if id(node) in top_level else " (lazy)")
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                    found.setdefault(top, set()).add(where)
    return found


def test_every_runtime_import_is_a_declared_dependency():
    """Core dependencies for everything; a module of an optional extra (not `test`) only imported lazily, inside
    the function that needs it, so a serve install without the extra still imports every module."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    optional = {
        _requirement_name(r)
        for extra, requirements in project["optional-dependencies"].items()
        if extra != "test"
        for r in requirements
    }
    distributions = packages_distributions()
    missing = []
    for module, places in sorted(_imports().items()):
        names = {_normalize(d) for d in distributions.get(module, [module])}
        if names & declared:
            continue
        if names & optional and all(place.endswith("(lazy)") for place in places):
            continue
        missing.append(f"{module} (imported by {', '.join(sorted(places))}; from {', '.join(sorted(names))})")
    assert not missing, "imported at run time but not declared (or an extra's module imported eagerly):\n  " + (
        "\n  ".join(missing)
    )


def test_the_scan_sees_imports_inside_functions():
    # pool.py imports psutil inside a function, client.py imports httpx at the top: both must be seen.
    found = _imports()
    assert "pipeline/pool.py (lazy)" in found["psutil"]
    assert "server/client.py" in found["httpx"]
    assert found["torchao"] == {"pipeline/quantization.py (lazy)"}
    assert "fastapi" in found and "torch" in found
