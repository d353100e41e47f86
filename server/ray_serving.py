"""`serve --ray`: the same FastAPI app as `serve`, one per Ray Serve replica (one engine, one model copy, its GPUs),
behind Ray's HTTP proxy. Also `app_builder`, the import path of deploy/ray-serve.yaml for `serve run` /
`serve deploy`. Ray is imported only inside functions: without the [ray] extra this module still imports, and
`--ray` says how to install it.

A replica builds its app in its constructor and holds its start until the model is loaded (the proxy routes only
to started replicas, so a replacement or a scaled-up replica never answers "loading"). Ray checks its health
through the engine's (a failed engine is replaced), stops routing to it and waits for its requests before it stops
it (scale-down, redeploy, shutdown), and reads its queued images for autoscaling (server/ray_autoscaling.py).
Every replica writes url images into the same --output-dir (a shared path when replicas run on several machines),
so any replica serves any file."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from fastapi import FastAPI

from pipeline.engine import Engine
from pipeline.model_choice import ModelChoiceError, resolve_models, split_name
from pipeline.prompt_enhancement import EnhancerError, check_enhancer_model

from .options import OPTIONS, ServeConfig, read_options
from .ray_autoscaling import IMAGES_METRIC
from .replica_header import replica_name
from .request_ids import configure_logging
from .scaleout import (
    APP_NAME,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    RAY_INSTALL_HINT,
    ScaleOutError,
    deployment_options,
)

log = logging.getLogger("flux2.ray")

_ACTOR_PREFIX = "SERVE_REPLICA::"


class RayMissing(ImportError):
    """Ray Serve is not installed (the [ray] extra)."""


def import_ray() -> tuple[Any, Any]:
    """(ray, ray.serve), or RayMissing saying how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RayMissing(RAY_INSTALL_HINT) from exc
    return ray, serve


# -- one replica ---------------------------------------------------------------------------------------------------
def hold_start_until_ready(app: FastAPI) -> None:
    """Make the app's lifespan start end only once its engine has loaded the default model (and fail if the load
    failed): Ray counts a replica as started, and routes to it, once its ASGI lifespan has started."""
    inner = app.router.lifespan_context
    engine: Engine = app.state.engine

    @asynccontextmanager
    async def until_ready(application: FastAPI) -> AsyncIterator[Any]:
        async with inner(application) as state:
            if not await asyncio.to_thread(engine.wait_ready):
                raise RuntimeError(f"the model failed to load: {engine.load_error}")
            yield state

    app.router.lifespan_context = until_ready


class Flux2Replica:
    """The body of a replica (Ray's ingress wrapper is added by `replica_deployment`)."""

    def __init__(self, config: ServeConfig):
        from ray import serve

        from .cli import build_app  # the single-process path builds its app the same way

        configure_logging(config.settings.log_level)
        replica_id = serve.get_replica_context().replica_id.to_full_id_str().removeprefix(_ACTOR_PREFIX)
        self.name = replica_name(replica_id)
        self.flux_app = build_app(config, replica=self.name)
        self.engine: Engine = self.flux_app.state.engine
        hold_start_until_ready(self.flux_app)
        log.info("replica %s: output dir %s", self.name, config.settings.output_dir)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.flux_app

    def check_health(self) -> None:
        """Ray calls this every few seconds; raising makes it replace the replica."""
        health = self.engine.health()
        if health.state == "failed":
            raise RuntimeError(f"replica {self.name}: the model failed to load: {health.load_error}")

    def record_autoscaling_stats(self) -> dict[str, float]:
        health = self.engine.health()
        return {IMAGES_METRIC: float(health.queued_images + health.running_images)}


def replica_deployment() -> Any:
    """`Flux2Replica` as a Ray Serve deployment serving its app (`serve.ingress()` late-bound: the app is built in
    the replica, from `__serve_build_asgi_app__`)."""
    _, serve = import_ray()
    return serve.deployment(serve.ingress()(Flux2Replica))


def replica_gpus(config: ServeConfig, cluster_gpus: float | None) -> float:
    """GPUs per replica: none on --device cpu, or with --device auto on a cluster without GPUs (`cluster_gpus`
    0; None: not known here, trust the options)."""
    device = config.models.device
    if device == "cpu":
        return 0.0
    if cluster_gpus == 0:
        if device == "cuda":
            raise ScaleOutError("--device cuda, but the Ray cluster has no GPU")
        log.warning("the Ray cluster has no GPU: replicas run on the CPU (one CPU each)")
        return 0.0
    return config.ray.gpus_per_replica


def bind(config: ServeConfig, gpus: float) -> Any:
    """The Ray Serve application: the replica deployment with its options, bound to the config."""
    options = deployment_options(config.ray, config.settings, config.engine, gpus)
    return replica_deployment().options(**options).bind(config)


def with_absolute_paths(config: ServeConfig) -> ServeConfig:
    """Paths made absolute where the command runs: replicas run in other working directories."""

    def absolute(source: str) -> str:
        name, path = split_name(source)
        if path is None or not Path(path).expanduser().exists():
            return source  # a hub id
        path = str(Path(path).expanduser().resolve())
        return f"{name}={path}" if name else path

    return replace(
        config,
        settings=replace(
            config.settings,
            output_dir=config.settings.output_dir.expanduser().resolve(),
            history_db=config.settings.history_db.expanduser().resolve() if config.settings.history_db else None,
        ),
        models=replace(
            config.models,
            weights_dir=config.models.weights_dir.expanduser().resolve(),
            sources=tuple(absolute(source) for source in config.models.sources),
        ),
    )


# -- deploy/ray-serve.yaml ----------------------------------------------------------------------------------------
def app_builder(args: Mapping[str, Any]) -> Any:
    """The application for `serve run` / `serve deploy` (import path `server.ray_serving:app_builder`): `args` are
    serve options by name (`output_dir`, `model`, `max_queue_images`, `replicas`, `autoscale`, ...) in the command
    line's units; the rest keep their defaults. Paths should be absolute (the builder may run on any node)."""
    names = {option.name: option for option in OPTIONS}
    given = {str(key).replace("-", "_"): value for key, value in dict(args or {}).items()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ScaleOutError(f"unknown serve option(s) in the application's args: {', '.join(unknown)}")
    values = {name: option.default for name, option in names.items()}
    values |= {name: _as_option_type(names[name].value_type, value) for name, value in given.items()}
    config = read_options(values)
    config = with_absolute_paths(replace(config, ray=replace(config.ray, enabled=True)))
    config.ray.check()
    ray, _ = import_ray()
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else None
    return bind(config, replica_gpus(config, cluster_gpus))


def _as_option_type(value_type: Any, value: Any) -> Any:
    """A value from a YAML file as the command line would have parsed it (typer converts its own)."""
    if value is None:
        return None
    if get_origin(value_type) is Union:  # Optional[X]
        value_type = next(arg for arg in get_args(value_type) if arg is not type(None))
    if get_origin(value_type) is list:
        return [str(item) for item in (value if isinstance(value, list) else [value])]
    if value_type is bool and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value_type(value)


# -- flux2-local serve --ray ----------------------------------------------------------------------------------------
def start_ray(ray: Any, address: str | None, attempts: int = 2) -> bool:
    """Join the cluster at `address`, or start one on this machine. A local start is tried twice: Ray's node gives
    its agents a fixed 15 s to come up (ray-project/ray#65983), which a loaded machine can miss."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            return True
        except Exception as exc:
            ray.shutdown()
            if address is not None or attempt == attempts:
                log.error("could not %s Ray: %s", "join" if address else "start", exc)
                return False
            log.warning("Ray's local node did not start (%s); trying once more", exc)
    return False


def serve_on_ray(config: ServeConfig) -> int:
    """Start (or join) a Ray cluster, run the replicas behind Ray's proxy on --host/--port, and serve until SIGTERM
    or Ctrl-C; then delete the application (each replica drains) and stop the cluster if this command started it.
    Returns the exit status."""
    try:
        ray, serve = import_ray()
    except RayMissing as exc:
        log.error("%s", exc)
        return 2
    config = with_absolute_paths(config)
    settings = config.settings
    try:
        # Once here, before any replica: a wrong --model fails with the single-process message, and tiny weights
        # are built once rather than by every replica at the same time.
        resolve_models(config.models)
        if config.engine.enhancer_model:
            check_enhancer_model(config.engine.enhancer_model)
    except (ModelChoiceError, EnhancerError) as exc:
        log.error("%s", exc)
        return 2
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    own_cluster = config.ray.address is None
    if own_cluster:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # read by the proxy this cluster starts
    if not start_ray(ray, config.ray.address):
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
            gpus = replica_gpus(config, cluster_gpus)
            bounds = config.ray.bounds()
            needed = gpus * (bounds[0] if bounds else config.ray.replicas)
            if own_cluster and needed > cluster_gpus:  # a cluster we join may add GPU nodes; this one never will
                log.error("%g replica GPU(s) wanted, this machine has %g: lower --replicas", needed, cluster_gpus)
                return 2
            serve.start(http_options={"host": settings.host, "port": settings.port})
            serve.run(bind(config, gpus), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:
            log.error("Ray Serve could not start the replicas: %s", exc)
            return 1
        log.info(
            "serving on http://%s:%d through Ray Serve: %s, %s GPU(s) each; output dir %s",
            settings.host,
            settings.port,
            f"{bounds[0]} to {bounds[1]} replicas" if bounds else f"{config.ray.replicas} replica(s)",
            f"{gpus:g}",
            settings.output_dir,
        )
        while not stop.wait(1.0):
            pass
        log.info("stopping: each replica finishes its requests (up to %g s)", settings.shutdown_timeout)
        serve.delete(APP_NAME)
        return 0
    finally:
        if own_cluster:
            serve.shutdown()
        ray.shutdown()
