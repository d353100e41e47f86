"""Import every module of `server` and `pipeline` (walked, so an optional or lazy import cannot hide), then every
module they import lazily inside functions. Exits non-zero naming each module that fails."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sys
import tomllib
import traceback
from pathlib import Path

# Modules of optional extras (pip install -e ".[quant]"): imported only inside the functions that need them, and
# absent from a serve install. Module names are the distributions' here (torchao, bitsandbytes).
_PROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
OPTIONAL = {
    re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].replace("-", "_")
    for extra, requirements in _PROJECT["optional-dependencies"].items()
    if extra != "test"
    for requirement in requirements
}

failed: list[str] = []
lazy: set[str] = set()
for package_name in ("pipeline", "server"):
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # report every failure, not the first
            failed.append(f"{info.name}:\n{traceback.format_exc()}")
            continue
        source = Path(module.__file__ or "")
        if source.suffix == ".py":
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    lazy.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    lazy.add(node.module)
        print(f"ok  {info.name}")
for name in sorted(lazy):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            print(f"optional (an extra, not installed here): {name}")
            continue
        failed.append(f"{name} (imported inside a function):\n{traceback.format_exc()}")
    except Exception:
        failed.append(f"{name} (imported inside a function):\n{traceback.format_exc()}")
if failed:
    print("\nFAILED to import:\n" + "\n".join(failed), file=sys.stderr)
    sys.exit(1)
print(f"all modules of server and pipeline import, and the {len(lazy)} modules they name")
