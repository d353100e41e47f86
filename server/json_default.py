"""A POST with a body but no Content-Type is read as JSON (`requests.post(url, data=json.dumps(body))`, a bare
`curl --data-binary`): FastAPI reads an unlabelled body as bytes, and the request was refused as "not JSON". Only
a missing label is filled in; a body labelled as something else keeps its label (and gets a clear error)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class JSONByDefaultMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = scope["headers"]
            if not any(name == b"content-type" for name, _ in headers):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
