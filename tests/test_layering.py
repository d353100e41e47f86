"""The pipeline package never needs the HTTP stack; the CLI explains every option."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def test_pipeline_imports_without_fastapi():
    code = (
        "import sys\n"
        "for name in ('fastapi', 'starlette', 'uvicorn', 'server'): sys.modules[name] = None\n"
        "import pipeline.engine, pipeline.runner, pipeline.loader, pipeline.weights, pipeline.placement, "
        "pipeline.sizes, pipeline.codecs, pipeline.jobs, pipeline.tiny_weights, pipeline.accounting, "
        "pipeline.masking, pipeline.prompts, pipeline.references, pipeline.model_choice\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def serve_help() -> str:
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    return result.output


@pytest.mark.parametrize(
    "option",
    [
        "--model",
        "--host",
        "--port",
        "--device",
        "--dtype",
        "--offload",
        "--model-name",
        "--output-dir",
        "--public-url",
        "--weights-dir",
    ],
)
def test_serve_help_documents_each_option_and_its_env_var(option, serve_help):
    assert option in serve_help
    assert "FLUX2_" + option.removeprefix("--").replace("-", "_").upper() in serve_help


def test_serve_help_documents_every_option_of_the_table(serve_help):
    from server.options import OPTIONS

    lines = serve_help.splitlines()
    for option in OPTIONS:
        # The option's row, then its help (wrapped over the rows that follow) with the env var at its end.
        (start,) = [i for i, line in enumerate(lines) if re.match(rf"\W*{option.flag}\s", line)]
        end = next(i for i in range(start + 1, len(lines)) if re.match(r"\W*--|╰", lines[i]))
        text = " ".join(" ".join(line.strip("│ ").split()) for line in lines[start:end])
        assert " ".join(option.help.split()[:4]) in text, option.flag
        assert f"[env var: {option.envvar}]" in text, option.flag
        if option.default is not None and not isinstance(option.default, bool):
            assert f"[default: {option.default}]" in text, option.flag


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("flux2-local")
    assert exe, "pip install -e . puts flux2-local on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in out and "tiny-weights" in out


def _modules(package: str) -> list[str]:
    import importlib
    import pkgutil

    return [info.name for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}.")]


def test_every_pipeline_module_imports_without_the_http_stack():
    """pipeline/ never imports server/, FastAPI, Starlette or uvicorn: every module of it (walked, so none is left
    out) imports with those blocked."""
    modules = _modules("pipeline")
    expected = {
        "pipeline.engine",
        "pipeline.handles",
        "pipeline.batching",
        "pipeline.previews",
        "pipeline.text_cache",
        "pipeline.pool",
        "pipeline.runner",
        "pipeline.model_choice",
        "pipeline.internals",
    }
    assert expected <= set(modules)
    code = (
        "import importlib, sys\n"
        "for name in ('fastapi', 'starlette', 'uvicorn', 'server'): sys.modules[name] = None\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pipeline_source_never_names_the_web_stack():
    """What may import what, read from the source (imports inside functions too): pipeline/ imports neither
    server/ nor FastAPI, Starlette or uvicorn."""
    import ast
    from pathlib import Path

    web = {"fastapi", "starlette", "uvicorn", "server"}
    offenders = []
    for path in sorted((Path(__file__).resolve().parent.parent / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in web]
    assert not offenders


def test_every_server_module_imports():
    import importlib

    for name in _modules("server"):
        importlib.import_module(name)
