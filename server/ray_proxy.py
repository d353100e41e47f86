"""The Ray Serve HTTP proxy's own answers in OpenAI's envelope. Our replicas answer every error in the envelope
themselves; the proxy, in front of them, answers a few on its own in plain text: a 500 when the replica holding a
request died (killed, out of host memory, its node lost), a 503 when no replica can take it or its
`max_queued_requests` is full, a 408 past its own request timeout. Clients (the OpenAI SDKs) retry 5xx, but they
read the envelope for the message: this middleware rewrites those answers, and turns a dead replica's 500 into a
503 with Retry-After (the request can be retried as is: another replica takes it).

Ray loads it in its proxy from the import path in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read when the proxy
starts: `serve --ray` sets it before starting a cluster; a cluster started by hand needs it in its environment
(`server.ray_proxy:middlewares`)."""

from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_body

log = logging.getLogger("flux2.ray_proxy")

_RETRY_SECONDS = "1"
_ANSWERS = {
    408: ("The request timed out in the Ray Serve proxy", "timeout"),
    429: ("Too many requests for the Ray Serve proxy", "rate_limit_exceeded"),
    500: (
        "The replica holding this request stopped before answering; retry it (another replica takes it)",
        "replica_unavailable",
    ),
    503: (
        "No replica can take this request now (all busy, starting or stopping); retry shortly",
        "service_unavailable",
    ),
}


def middlewares() -> list[Middleware]:
    """The Ray proxy callback: the middlewares it wraps its ASGI app with."""
    return [Middleware(ProxyErrorEnvelopeMiddleware)]


def envelope_answer(status: int, detail: str, retry_after: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) for one of the proxy's own errors. A dead replica's 500 becomes a 503: nothing in
    the request was wrong, and any replica can run it again."""
    message, code = _ANSWERS.get(status, ("The Ray Serve proxy could not serve this request", "proxy_error"))
    if status == 500:
        status = 503
    detail = detail.strip()
    text = f"{message}." if not detail or detail == "Internal Server Error" else f"{message}: {detail}"
    error = APIError(status, text, code=code)
    body = json.dumps(error_body(error.message, error.type, error.param, error.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (429, 503):
        headers.append((b"retry-after", (retry_after or _RETRY_SECONDS).encode()))
    return status, headers, body


class ProxyErrorEnvelopeMiddleware:
    """Passes every answer of the app through, except the proxy's plain-text errors (status >= 400, text/plain),
    which it rewrites, and no answer at all (the app returned or raised before starting one), which becomes a 503
    in the envelope."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None  # a plain-text error's start, held while its body is read
        body = b""

        async def answer(status: int, detail: str, retry_after: str | None) -> None:
            nonlocal started
            started = True
            status, headers, content = envelope_answer(status, detail, retry_after)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        async def send_wrapper(message: Message) -> None:
            nonlocal started, held, body
            if message["type"] == "http.response.start" and not started:
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"text/plain"):
                    held = message
                    return
                started = True
            elif message["type"] == "http.response.body" and held is not None:
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    status = held["status"]
                    retry = dict(held.get("headers", [])).get(b"retry-after")
                    held = None
                    await answer(status, body.decode(errors="replace"), retry.decode() if retry else None)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                raise
            log.warning("the Ray proxy failed before answering %s: %s", scope.get("path"), exc)
            await answer(500, "", None)
            return
        if not started:
            await answer(500, "", None)
