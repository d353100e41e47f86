"""While the server shuts down (the engine is stopping: the one place that state lives), new requests get a 503 in
OpenAI's envelope; in-flight ones finish."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, error_response


class DrainingMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        if scope["type"] == "http" and app is not None and app.state.engine.state == "stopping":
            response = error_response(
                APIError(
                    503,
                    "The server is shutting down; retry on another instance.",
                    code="shutting_down",
                    headers={"Retry-After": "5"},
                )
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
