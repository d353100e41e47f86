"""The engine: one worker thread owns the device, loads the model, then runs queued jobs in order.

It knows nothing of HTTP. Callers `submit` a job and get a `concurrent.futures.Future` (an asyncio server awaits
it with `asyncio.wrap_future`), so the event loop never blocks on the model."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from .jobs import GenerationJob, GenerationResult
from .loader import LoadedModel
from .runner import run_job

log = logging.getLogger("flux2.engine")


class EngineUnavailable(Exception):
    """The engine cannot take or run jobs: still loading failed, or it was stopped."""


class Engine:
    def __init__(self, load: Callable[[], LoadedModel]):
        self._load = load
        self._queue: queue.Queue[tuple[GenerationJob, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="flux2-engine", daemon=True)
        self._ready = threading.Event()
        self._stopping = False
        self.model: LoadedModel | None = None
        self.load_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking jobs, let the worker finish the queue, and wait for it up to `timeout` seconds."""
        self._stopping = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.model is not None

    @property
    def state(self) -> str:
        if self._stopping:
            return "stopped"
        if self.load_error is not None:
            return "failed"
        return "ready" if self.model is not None else "loading"

    # -- work ----------------------------------------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        if self._stopping:
            raise EngineUnavailable("the server is shutting down")
        if self.load_error is not None:
            raise EngineUnavailable(f"the model failed to load: {self.load_error}")
        future: Future[GenerationResult] = Future()
        self._queue.put((job, future))
        return future

    def _work(self) -> None:
        try:
            self.model = self._load()
        except Exception as exc:  # any load failure is reported, never raised into a dead thread
            log.exception("model failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
        while (item := self._queue.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            if self.model is None:
                future.set_exception(EngineUnavailable(f"the model failed to load: {self.load_error}"))
                continue
            try:
                future.set_result(run_job(self.model, job))
            except BaseException as exc:  # the worker outlives any failing job
                future.set_exception(exc)
