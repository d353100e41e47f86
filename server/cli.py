"""The `flux2-local` command: the typer app and its commands. `serve` starts the server from its options (the table
in options.py); the client commands are in client_commands.py, the offline tools in tool_commands.py."""

from __future__ import annotations

import logging
from dataclasses import replace

import typer
from fastapi import FastAPI

from pipeline.engine import Engine
from pipeline.loader import quiet_progress_bars
from pipeline.model_choice import ModelChoiceError, resolve_models
from pipeline.pool import ModelPool
from pipeline.prompt_enhancement import EnhancerError, check_enhancer_model

from .app import create_app
from .client_commands import edit, generate
from .history import HistoryDB, HistoryUnavailable, open_history
from .history_commands import history
from .metrics import Metrics
from .options import ServeConfig, serve_command
from .reproduce_command import reproduce
from .request_ids import configure_logging
from .runtime import serve_app
from .scaleout import ScaleOutError
from .settings import model_ids_for
from .tool_commands import bench, tiny_weights

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A local OpenAI-compatible image API server for FLUX.2 weights (diffusers).",
)
log = logging.getLogger("flux2")

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@app.command()
@serve_command
def serve(config: ServeConfig) -> None:
    """Serve the OpenAI image API (/v1/images/generations, /edits, /variations, /v1/models, /health, /metrics)."""
    settings = config.settings
    configure_logging(settings.log_level)
    quiet_progress_bars()
    if not settings.api_keys and settings.host not in _LOCAL_HOSTS:
        log.warning(
            "\n%s\n  NO API KEY, and listening on %s: anyone who can reach this address can use the GPU "
            "and read the images.\n  Set --api-key (or FLUX2_API_KEYS / --api-key-file), or bind "
            "127.0.0.1.\n%s",
            "*" * 96,
            settings.host,
            "*" * 96,
        )
    try:  # before the models load: a history that cannot be used stops the start at once, and says why
        history_db = open_history(settings.history_path) if settings.history else None
    except HistoryUnavailable as exc:
        log.error("%s", exc)
        raise typer.Exit(code=2) from exc
    try:
        config.ray.check()
    except ScaleOutError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if config.ray.enabled:
        from .ray_serving import serve_on_ray  # Ray itself only loads there, and only when installed

        raise typer.Exit(code=serve_on_ray(config))
    try:
        app = build_app(config, history_db=history_db)
    except (ModelChoiceError, EnhancerError) as exc:
        log.error("%s", exc)
        raise typer.Exit(code=2) from exc
    serve_app(app, settings.host, settings.port, settings.log_level, settings.shutdown_timeout)


def build_app(config: ServeConfig, replica: str | None = None, history_db: HistoryDB | None = None) -> FastAPI:
    """The app and its engine for these options: the models resolved (ModelChoiceError if one cannot be served),
    the served ids named. `replica` names the process in x-flux2-replica (Ray Serve replicas build theirs here);
    `history_db`, already opened and checked (else the app opens its own)."""
    if config.engine.enhancer_model:
        check_enhancer_model(config.engine.enhancer_model)
    served = resolve_models(replace(config.models, prompt_cache=config.engine.prompt_cache_bytes > 0))
    settings = replace(
        config.settings,
        model_ids=model_ids_for([(c.name, c.spec.aliases) for c in served.configs]),
        test_models=served.test_models,
    )
    log.info("serving ids: %s", ", ".join(f"{i} -> {n}" if i != n else i for i, n in settings.model_ids.items()))
    metrics = Metrics()
    engine = Engine(
        ModelPool(served.configs, max_loaded=config.models.max_loaded), config.engine, on_batch=metrics.observe_batch
    )
    return create_app(settings, engine, metrics=metrics, replica=replica, history_db=history_db)


app.command("tiny-weights")(tiny_weights)
app.command()(generate)
app.command()(edit)
app.command()(reproduce)
app.command()(history)
app.command()(bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
