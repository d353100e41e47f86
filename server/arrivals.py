"""Tell the engine about image requests from the moment they reach the app, before their bodies are read: a batch
about to start then waits (up to the batch window) for requests that are still being received, while a lone
request starts at once. The arrival is released when the service submits the job, or when the request ends."""

from __future__ import annotations

import contextvars

from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.engine import Arrival, Engine

_IMAGE_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations")
_current: contextvars.ContextVar[Arrival | None] = contextvars.ContextVar("flux2_arrival", default=None)


def submitted() -> None:
    """Called by the service right after it submits (or streams) this request's job."""
    arrival = _current.get()
    if arrival is not None:
        arrival.release()


class ArrivalsMiddleware:
    def __init__(self, app: ASGIApp, engine: Engine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _IMAGE_ROUTES:
            await self.app(scope, receive, send)
            return
        with self.engine.arriving() as arrival:
            token = _current.set(arrival)
            try:
                await self.app(scope, receive, send)
            finally:
                _current.reset(token)
