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
    """{top-level module: {files importing it}} over server/ and pipeline/, third-party modules only."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "server").rglob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    distributions = packages_distributions()
    missing = []
    for module, files in sorted(_imports().items()):
        names = {_normalize(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (imported by {', '.join(sorted(files))}; from {', '.join(sorted(names))})")
    assert not missing, "imported at run time but not in [project].dependencies:\n  " + "\n  ".join(missing)


def test_the_scan_sees_imports_inside_functions():
    # pool.py imports psutil inside a function, client.py imports httpx at the top: both must be seen.
    found = _imports()
    assert "pipeline/pool.py" in found["psutil"]
    assert "server/client.py" in found["httpx"]
    assert "fastapi" in found and "torch" in found
