"""Every answer names the process that served it in `x-flux2-replica`: `REPLICA@HOST:PID`, REPLICA being Ray
Serve's replica id (`APP#DEPLOYMENT#ID`; its actor is `SERVE_REPLICA::` + that id, in namespace `serve`) behind
`serve --ray`, `local` in single-process mode. A client can see which replica answered, and a log line or a
stored file can be traced to it."""

from __future__ import annotations

import os
import socket

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-flux2-replica"


def replica_name(replica: str = "local") -> str:
    return f"{replica}@{socket.gethostname()}:{os.getpid()}"


class ReplicaHeaderMiddleware:
    def __init__(self, app: ASGIApp, name: str):
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = self.name
            await send(message)

        await self.app(scope, receive, send_named)
