"""Build the FastAPI application around an engine: routers, middleware, error handlers, lifespan."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pipeline.engine import Engine

from .arrivals import ArrivalsMiddleware
from .auth import APIKeyMiddleware
from .draining import DrainingMiddleware
from .errors import UnexpectedErrorMiddleware, install_error_handlers
from .history import HistoryDB, open_history
from .history_records import HistoryRecorder
from .json_default import JSONByDefaultMiddleware
from .limits import BodySizeLimitMiddleware
from .metrics import Metrics, RequestMetricsMiddleware
from .openapi import document_errors_as_served
from .remote_images import RemoteImageFetcher
from .replica_header import ReplicaHeaderMiddleware, replica_name
from .request_ids import RequestIdMiddleware
from .routes import files, health, history, images, models, playground
from .routes import metrics as metrics_routes
from .serving import FILES_ROUTE, ImageService
from .settings import Settings
from .storage import ImageStore


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    remote_fetcher: RemoteImageFetcher | None = None,
    metrics: Metrics | None = None,
    replica: str | None = None,
    history_db: HistoryDB | None = None,
) -> FastAPI:
    """`metrics`, when given, was made before the engine so that its `observe_batch` is the engine's `on_batch`.
    `replica` names this process in every answer's x-flux2-replica header (default: `local@HOST:PID`).
    `history_db`, when given, was opened (and checked) before the models loaded; else it is opened here
    (HistoryUnavailable when it cannot be used), unless --no-history."""
    if settings.history and history_db is None:
        history_db = open_history(settings.history_path)
    recorder = HistoryRecorder(history_db if settings.history else None, settings.retention_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop(timeout=settings.shutdown_timeout)
            recorder.close()

    app = FastAPI(
        title="flux2-local", summary="OpenAI-compatible image API for FLUX.2", version="0.1.0", lifespan=lifespan
    )
    store = ImageStore(settings.output_dir, settings.retention_seconds, settings.max_stored_images)
    app.state.settings = settings
    app.state.engine = engine
    store.on_removed = recorder.files_removed
    app.state.service = ImageService(settings, engine, store, history=recorder)
    app.state.started_at = int(time.time())
    if settings.allow_remote_images and remote_fetcher is None:
        remote_fetcher = RemoteImageFetcher(max_bytes=settings.max_image_bytes, timeout=settings.remote_image_timeout)
    app.state.remote_fetcher = remote_fetcher if settings.allow_remote_images else None
    app.state.metrics = metrics or Metrics()
    app.state.metrics.watch(engine.stats)
    app.state.service.on_timing = app.state.metrics.observe_timing
    install_error_handlers(app)
    for module in (health, models, images, files, history, metrics_routes):
        app.include_router(module.router)
    if settings.playground:
        app.include_router(playground.router)
    document_errors_as_served(app)
    # Added innermost first: request ids wrap everything (every log line and response carries one), CORS answers
    # preflights before auth, auth runs before any body is read.
    app.add_middleware(JSONByDefaultMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(DrainingMiddleware)
    app.add_middleware(
        APIKeyMiddleware,
        keys=settings.api_keys,
        public_files_prefix=FILES_ROUTE if settings.public_files else None,
        open_metrics=settings.open_metrics,
        playground_open=settings.playground_open,
    )
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            # Any request header: the origins are the boundary, and the SDKs send their own (openai-node: every
            # x-stainless-*, idempotency-key; a preflight refusing one made the SDK fail in a browser).
            allow_headers=["*"],
            expose_headers=[
                "x-request-id",
                "x-flux2-ignored-params",
                "retry-after",
                "server-timing",
                "x-flux2-replica",
                "x-flux2-history-id",
                "x-flux2-withheld",
            ],
        )
    app.add_middleware(ArrivalsMiddleware, engine=engine)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(UnexpectedErrorMiddleware)  # inside the request ids: a 500 carries and logs its id
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(ReplicaHeaderMiddleware, name=replica or replica_name())
    return app
