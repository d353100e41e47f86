"""The pipeline package never needs the HTTP stack; the CLI explains every option."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_pipeline_imports_without_fastapi():
    code = ("import sys\n"
            "for name in ('fastapi', 'starlette', 'uvicorn', 'server'): sys.modules[name] = None\n"
            "import pipeline.engine, pipeline.runner, pipeline.loader, pipeline.weights, pipeline.placement, "
            "pipeline.sizes, pipeline.codecs, pipeline.jobs, pipeline.tiny_weights, pipeline.accounting, "
            "pipeline.masking, pipeline.prompts, pipeline.references, pipeline.model_choice\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("option", ["--model", "--host", "--port", "--device", "--dtype", "--offload",
                                    "--model-name", "--output-dir", "--public-url", "--weights-dir"])
def test_serve_help_documents_each_option_and_its_env_var(option):
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert option in result.output
    assert "FLUX2_" + option.removeprefix("--").replace("-", "_").upper() in result.output


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("flux2-local")
    assert exe, "pip install -e . puts flux2-local on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in out and "tiny-weights" in out
