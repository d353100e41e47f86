"""The base URL clients reach us at, for the absolute URLs we hand out."""

from __future__ import annotations

from starlette.requests import Request

from .settings import Settings


def public_base_url(request: Request, settings: Settings) -> str:
    """`--public-url` when set; else the scheme and host the client called, as a reverse proxy reports them in
    `X-Forwarded-Proto` / `X-Forwarded-Host`, or as the `Host` header gives them."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    headers = request.headers
    scheme = headers.get("x-forwarded-proto", "").split(",")[0].strip() or request.url.scheme
    host = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host") or request.url.netloc
    prefix = headers.get("x-forwarded-prefix", "").split(",")[0].strip().rstrip("/")
    return f"{scheme}://{host}{prefix}"
