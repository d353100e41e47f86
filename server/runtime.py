"""Running the app under uvicorn with a graceful SIGTERM: new requests get 503 at once, in-flight ones finish
(up to the shutdown timeout, then they are cancelled), and the process exits 0."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.flux_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.flux_app.state.engine.begin_stop()  # new requests get 503 at once; in-flight ones finish
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises captured signals after its shutdown so the exit status shows them; a SIGTERM that
            # ended in a clean drain is a normal exit for a supervisor (systemd, Kubernetes): exit 0 instead.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def serve_app(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=shutdown_timeout,
    )
    GracefulServer(config, app).run()
