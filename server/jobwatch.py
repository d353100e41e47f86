"""Awaiting a submitted job: the one step both the JSON answer and the event stream use. The result is awaited
against the request's deadline (past it: the job is cancelled, RequestTimeout); the task awaiting it being
cancelled (the client went away, the server is stopping) cancels the job; a stream reads the job's events as they
come, with a `None` tick for keepalives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pipeline.engine import Engine
from pipeline.handles import JobHandle
from pipeline.jobs import GenerationJob, GenerationResult, Preview, Progress

from .errors import RequestTimeout


class JobWatch:
    def __init__(self, engine: Engine, job: GenerationJob, timeout: float, *, events: bool = False):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Progress | Preview] = asyncio.Queue()
        listener = (lambda event: loop.call_soon_threadsafe(self._events.put_nowait, event)) if events else None
        self.handle: JobHandle = engine.submit(job, listener)  # QueueFull / EngineUnavailable: errors.py answers
        self.timeout = timeout
        self.deadline = loop.time() + timeout
        self._future = asyncio.wrap_future(self.handle.future)
        # Its end is always retrieved, even when no one awaits it any more (the client went away, the request timed
        # out): else asyncio logs "Future exception was never retrieved" whenever the watch is collected.
        self._future.add_done_callback(_retrieve)

    def _remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def _timed_out(self) -> RequestTimeout:
        self.handle.cancel("request timeout")
        return RequestTimeout(self.timeout)

    async def result(self) -> GenerationResult:
        """The job's result; engine failures (out of memory, cancelled) are raised as they are."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), max(0.0, self._remaining()))
        except TimeoutError:
            raise self._timed_out() from None
        except asyncio.CancelledError:  # the client disconnected, or the server is stopping
            self.handle.cancel("the client disconnected")
            raise

    async def events(self, tick: float) -> AsyncIterator[Progress | Preview | None]:
        """The job's events until it ends (its result is then ready), `None` after `tick` seconds of silence."""
        while not self._future.done():
            remaining = self._remaining()
            if remaining <= 0:
                raise self._timed_out()
            getter = asyncio.ensure_future(self._events.get())
            try:
                done, _ = await asyncio.wait(
                    {getter, self._future}, timeout=min(tick, remaining), return_when=asyncio.FIRST_COMPLETED
                )
            finally:  # the reader goes with the wait, however it ends (a stream's client going away cancels it)
                if not getter.done():
                    getter.cancel()
            if getter in done:
                yield getter.result()
                continue
            if not done:
                yield None
        while not self._events.empty():  # events that arrived with the result
            yield self._events.get_nowait()

    def cancel(self, reason: str) -> None:
        if not self._future.done():
            self.handle.cancel(reason)


def _retrieve(future: asyncio.Future[GenerationResult]) -> None:
    if not future.cancelled():
        future.exception()
