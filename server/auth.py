"""API keys: plain ASGI middleware. When keys are configured, every /v1/* route (generated files too, unless
they are made public) and /metrics (unless made open) need `Authorization: Bearer KEY`; keys are compared in
constant time. /health and the OpenAPI docs stay open."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, error_response


def load_keys(keys: list[str], key_file: Path | None) -> tuple[str, ...]:
    """Keys from the command line / environment (comma or space separated) and a file (one per line, # comments)."""
    found = [part for value in keys for part in value.replace(",", " ").split()]
    if key_file is not None:
        for line in key_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                found.append(line)
    return tuple(dict.fromkeys(found))


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """True when `given` equals one of `keys`. Every key is compared, each with `hmac.compare_digest`, so the time
    taken does not depend on which key matched or how much of it did."""
    return matching_key(given, keys) is not None


def matching_key(given: str, keys: tuple[str, ...]) -> str | None:
    """The key `given` equals, compared as `key_matches` says; None when none."""
    given_bytes = given.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given_bytes, key.encode()):
            found = key
    return found


def key_id(key: str) -> str:
    """How the history names the key a request used, never the key: `key-` and the first 8 hex digits of its SHA-256
    (`printf %s KEY | sha256sum` tells an operator which key it is)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


API_KEY_ID = "api_key_id"  # where the middleware leaves the key's id in the request's state


def _from_own_playground(headers: dict[bytes, bytes]) -> bool:
    """A request the Playground page made from this server's own origin (--playground-open). Browsers send the
    custom header only after a CORS preflight, so other sites' pages cannot; other programs can forge it, which is
    what --playground-open accepts: anyone who can open the page can use the API."""
    if b"x-flux2-playground" not in headers:
        return False
    origin = headers.get(b"origin")
    if origin is None:
        return True
    host = headers.get(b"host", b"")
    return origin.split(b"://", 1)[-1] == host


class APIKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: tuple[str, ...],
        public_files_prefix: str | None = None,
        open_metrics: bool = False,
        playground_open: bool = False,
    ):
        self.app = app
        self.keys = keys
        self.public_files_prefix = public_files_prefix
        self.open_metrics = open_metrics
        self.playground_open = playground_open

    def _protected(self, path: str) -> bool:
        if path == "/metrics":
            return not self.open_metrics
        if self.public_files_prefix and path.startswith(self.public_files_prefix + "/"):
            return False
        return path.startswith("/v1/") or path == "/v1"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        request_headers = dict(scope["headers"])
        header = request_headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        matched = matching_key(token.strip(), self.keys) if scheme.lower() == "bearer" and token.strip() else None
        if matched is not None:
            scope.setdefault("state", {})[API_KEY_ID] = key_id(matched)
            await self.app(scope, receive, send)
            return
        if self.playground_open and _from_own_playground(request_headers):
            scope.setdefault("state", {})[API_KEY_ID] = "playground"
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if header
            else "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
        response = error_response(
            APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        )
        await response(scope, receive, send)
