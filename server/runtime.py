"""Running the app under uvicorn with a graceful SIGTERM: new requests get 503 at once, in-flight ones finish (up to
the shutdown timeout, then their jobs are cancelled and each answers with its own error), and the process exits 0.

uvicorn alone stops listening as soon as it is told to exit (new clients met a refused connection, not the 503 the
load balancer should see), waits its graceful timeout, then cancels the requests' tasks: a plain request got a
bare `500 Internal Server Error`, a stream was cut mid-body, each logged a traceback, and the lifespan's engine
stop waited the same timeout again. Here the drain comes first, with the listener still open."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

# After the drain: for the requests whose jobs were cancelled (each stops at its next denoising step) to write
# their answers, and for finished ones to send their images, before uvicorn cancels what is left.
ANSWER_GRACE_S = 10.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self.flux_app = app
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.flux_app.state.engine.begin_stop()  # new requests get 503 at once; in-flight ones finish
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises captured signals after its shutdown so the exit status shows them; a SIGTERM that
            # ended in a clean drain is a normal exit for a supervisor (systemd, Kubernetes): exit 0 instead.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.drain()
        await super().shutdown(sockets=sockets)

    async def drain(self) -> None:
        """Still listening (DrainingMiddleware answers every new request 503, /health included), wait for the engine's
        queued and running jobs for up to the shutdown timeout (a second Ctrl-C ends the wait); then cancel those
        left, so that each in-flight request ends with its own answer (a 503 `cancelled` in OpenAI's envelope, a
        stream's `error` event) instead of being cut."""
        engine = self.flux_app.state.engine
        deadline = time.monotonic() + self.drain_timeout
        counter = 0
        while not engine.idle and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.1)
            counter += 1
            await self.on_tick(counter)  # keeps the Date header current, as uvicorn's main loop does
        if not engine.idle:
            engine.cancel_all("the server is shutting down")


def serve_app(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=ANSWER_GRACE_S,
    )
    GracefulServer(config, app, drain_timeout=shutdown_timeout).run()
