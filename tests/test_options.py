"""The serve options, written once in server/options.py: each has help, an env var and a default read from the
object it configures; the command line, the environment and the README all say the same."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
import typer
from conftest import RunningServer
from typer.testing import CliRunner

from pipeline.engine import EngineOptions
from pipeline.model_choice import ModelChoice
from server.options import OPTIONS, ServeConfig, field_default, serve_command
from server.scaleout import RayOptions
from server.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
BY_NAME = {option.name: option for option in OPTIONS}


def test_every_option_has_help_an_env_var_and_a_default_from_its_field():
    assert len(BY_NAME) == len(OPTIONS)
    for option in OPTIONS:
        assert option.help.strip().endswith("."), option.name
        assert re.fullmatch(r"FLUX2_[A-Z_]+", option.envvar), option.name
        if option.feeds is not None:
            field = option.field or option.name
            # Back and forth through the unit: the option's default sets exactly the field's default.
            assert option.unit.into(option.default) == field_default(option.feeds, field), option.name
    assert len({o.envvar for o in OPTIONS}) == len(OPTIONS)


def test_no_field_is_set_by_two_options_and_every_settable_field_has_one():
    fed = [(o.feeds, o.field or o.name) for o in OPTIONS if o.feeds is not None]
    assert len(set(fed)) == len(fed)
    # Filled after the options: the served ids (from the models as resolved) and the keys (--api-key, its file).
    apart = {
        (Settings, "model_ids"),
        (Settings, "test_models"),
        (Settings, "api_keys"),
        (EngineOptions, "progress_log_seconds"),
        (ModelChoice, "prompt_cache"),  # from --prompt-cache-mb (> 0), for the offload planner's notes
    }
    every = {(cls, f.name) for cls in (Settings, EngineOptions, ModelChoice, RayOptions) for f in fields(cls)}
    assert set(fed) == every - apart


def _capture(args: list[str], env: dict[str, str]) -> ServeConfig:
    seen: list[ServeConfig] = []
    app = typer.Typer()

    @app.command()
    @serve_command
    def serve(config: ServeConfig) -> None:
        """Capture."""
        seen.append(config)

    app.command("other")(lambda: None)  # two commands: `serve` is named on the command line as in flux2-local
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_the_defaults_make_the_default_objects():
    config = _capture([], {})
    assert config.settings == Settings()
    assert config.engine == EngineOptions()
    assert config.models == ModelChoice()
    assert config.ray == RayOptions()


def test_env_vars_and_flags_set_their_fields_in_their_units(tmp_path):
    (tmp_path / "keys").write_text("k3  # a comment\n")
    env = {
        "FLUX2_MAX_STEPS": "7",
        "FLUX2_BATCH_WINDOW_MS": "5",
        "FLUX2_PROMPT_CACHE_MB": "3",
        "FLUX2_RETENTION_HOURS": "0.5",
        "FLUX2_API_KEYS": "k1, k2",
        "FLUX2_API_KEY_FILE": str(tmp_path / "keys"),
        "FLUX2_CORS_ORIGINS": "https://a.lan https://b.lan",
        "FLUX2_MODEL": "one two=/m/two",
        "FLUX2_METRICS": "false",
        "FLUX2_DEVICE": "cpu",
        "FLUX2_MAX_LOADED_MODELS": "2",
        "FLUX2_PORT": "9100",
        "FLUX2_AUTOSCALE": "1:3",
        "FLUX2_GPUS_PER_REPLICA": "0.5",
    }
    config = _capture(
        [
            "--max-output-megapixels",
            "9",
            "--max-input-megapixels",
            "0.5",
            "--max-body-mb",
            "2",
            "--host",
            "0.0.0.0",
            "--playground-open",
            "--shutdown-timeout",
            "4",
            "--ray",
        ],
        env,
    )
    settings, engine, models = config.settings, config.engine, config.models
    assert (settings.max_steps, settings.retention_seconds, settings.metrics, settings.port) == (7, 1800, False, 9100)
    assert settings.api_keys == ("k1", "k2", "k3")
    assert settings.cors_origins == ("https://a.lan", "https://b.lan")
    assert settings.max_output_pixels == 4 * 1024**2  # never above the product's 4 MP
    assert (settings.max_input_pixels, settings.max_body_bytes) == (500_000, 2 * 1024**2)
    assert (settings.host, settings.playground_open, settings.shutdown_timeout) == ("0.0.0.0", True, 4.0)
    assert (engine.batch_window, engine.prompt_cache_bytes) == (0.005, 3 * 1024**2)
    assert (models.sources, models.device, models.max_loaded) == (("one", "two=/m/two"), "cpu", 2)
    assert config.ray == RayOptions(enabled=True, autoscale="1:3", gpus_per_replica=0.5)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.choices], ids=lambda o: o.name)
def test_a_choice_outside_the_list_is_a_usage_error(option):
    app = typer.Typer()
    app.command("serve")(serve_command(lambda config: None))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", option.flag, "nope"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2
    assert f"Invalid value for {option.flag}: must be one of {', '.join(option.choices)}" in result.output


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.value_type in (int, float)], ids=lambda o: o.name)
def test_a_negative_number_is_a_usage_error(option):
    """`--max-queue-images -1` started a server once; every number an option takes is 0 or more."""
    app = typer.Typer()
    app.command("serve")(serve_command(lambda config: None))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", option.flag, "-1"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option.flag}: must be 0 or more, got -1" in result.output


def _serve(*args: str):
    app = typer.Typer()
    app.command("serve")(serve_command(lambda config: None))
    app.command("other")(lambda: None)
    return CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.mark.parametrize("flag", ["--max-steps", "--max-batch-images"])
def test_a_count_that_would_serve_nothing_is_a_usage_error(flag):
    """`--max-steps 0` refused every explicit step count yet ran the models' defaults."""
    result = _serve(flag, "0")
    assert result.exit_code == 2 and f"Invalid value for {flag}: must be 1 or more, got 0" in result.output


def test_choices_are_read_in_any_case_and_a_bad_log_level_is_a_usage_error():
    """`--log-level loud` ended in a traceback (logging's ValueError); INFO, CPU are the choices' own."""
    seen = _capture(["--log-level", "INFO", "--device", "CPU"], {})
    assert (seen.settings.log_level, seen.models.device) == ("info", "cpu")
    result = _serve("--log-level", "loud")
    assert result.exit_code == 2 and "Invalid value for --log-level: must be one of debug, info, warning, error" in (
        result.output
    )


def test_an_unreadable_key_file_is_a_usage_error(tmp_path):
    for path, reason in ((tmp_path / "missing.txt", "No such file or directory"), (tmp_path, "Is a directory")):
        result = _serve("--api-key-file", str(path))
        assert result.exit_code == 2, result.output
        assert f"Invalid value for --api-key-file: cannot read {path}: {reason}" in " ".join(result.output.split())
        assert "Traceback" not in result.output


def test_the_help_names_the_extras_to_install():
    """rich read `[quant]` in `pip install -e '.[quant]'` as markup and dropped it from --help."""
    app = typer.Typer()
    app.command("serve")(serve_command(lambda config: None))
    app.command("other")(lambda: None)
    text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"}).output
    flat = "".join(line.strip("│ ") for line in text.splitlines())
    assert flat.count("'.[quant]'") == 2 and "'.[ray]'" in flat and "\\[" not in flat


def _readme_rows() -> list[list[str]]:
    section = README.read_text().split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `--")
    ]


def _readme_default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def test_the_readme_table_lists_every_option_with_its_env_var_and_default():
    rows = _readme_rows()
    assert [row[0] for row in rows] == [
        f"`{o.flag}/--no-{o.flag[2:]}`" if o.default is True else f"`{o.flag}`" for o in OPTIONS
    ]
    for (_, env, default, _meaning), option in zip(rows, OPTIONS, strict=True):
        assert env == f"`{option.envvar}`"
        if option.default is None:
            assert not default.startswith("`"), f"{option.flag}: the README names a value the code does not have"
        else:
            assert default.startswith(_readme_default(option.default)), (option.flag, default)


def test_a_real_server_takes_its_options_from_the_environment(tiny_klein, tmp_path):
    env = {"FLUX2_MAX_STEPS": "2", "FLUX2_MAX_PROMPT_CHARS": "5", "FLUX2_MODEL": f"env-named={tiny_klein}"}
    with RunningServer([], tmp_path, env=env) as server:
        assert httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"] == "env-named"
        steps = httpx.post(
            f"{server.base_url}/v1/images/generations",
            timeout=60,
            json={"prompt": "x", "size": "16x16", "num_inference_steps": 3},
        )
        assert steps.status_code == 400 and steps.json()["error"]["param"] == "num_inference_steps"
        prompt = httpx.post(
            f"{server.base_url}/v1/images/generations",
            timeout=60,
            json={"prompt": "a long prompt", "size": "16x16", "num_inference_steps": 1},
        )
        assert prompt.status_code == 400 and prompt.json()["error"]["param"] == "prompt"
