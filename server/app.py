"""Build the FastAPI application around an engine: routers, error handlers, lifespan."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pipeline.engine import Engine

from .errors import install_error_handlers
from .routes import files, health, images, models
from .serving import ImageService
from .settings import Settings
from .storage import ImageStore


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop(timeout=30)

    app = FastAPI(title="flux2-local", summary="OpenAI-compatible image API for FLUX.2", version="0.1.0",
                  lifespan=lifespan)
    store = ImageStore(settings.output_dir, settings.retention_seconds, settings.max_stored_images)
    app.state.settings = settings
    app.state.engine = engine
    app.state.service = ImageService(settings, engine, store)
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    for module in (health, models, images, files):
        app.include_router(module.router)
    return app
