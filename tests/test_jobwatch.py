"""Awaiting a job (server/jobwatch.py) when its client goes away: the job is cancelled, and nothing is left for
asyncio to complain about when the watch is collected ("Future exception was never retrieved", "Task was destroyed
but it is pending!": ERROR lines in the server's log seconds after a disconnect, tagged with whichever request the
collection happened in)."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from engine_helpers import job

from pipeline.handles import JobHandle
from pipeline.jobs import JobCancelled
from server.jobwatch import JobWatch


class _Engine:
    """Takes a job and does nothing until the test finishes it, as a busy engine would."""

    def __init__(self) -> None:
        self.handles: list[JobHandle] = []

    def submit(self, job, listener=None) -> JobHandle:
        handle = JobHandle(job, listener=listener)
        self.handles.append(handle)
        return handle


def _asyncio_errors(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "asyncio"]


async def _settle() -> None:
    for _ in range(3):  # the engine's result reaches the loop through call_soon_threadsafe
        await asyncio.sleep(0.01)


async def _awaiting_the_result(watch: JobWatch) -> None:
    await watch.result()


async def _reading_the_events(watch: JobWatch) -> None:
    async for _ in watch.events(tick=30):
        pass


@pytest.mark.parametrize("waiting", [_awaiting_the_result, _reading_the_events], ids=["result", "stream"])
def test_a_client_that_goes_away_leaves_nothing_for_asyncio_to_complain_about(caplog, waiting):
    """The request's task is cancelled (the client went away) while it awaits the result, or while a stream waits
    for its next event: the job is cancelled, the engine ends it with JobCancelled, and collecting the watch logs
    nothing: the result's end was retrieved, and the stream's event reader went with its wait."""
    engine = _Engine()

    async def main() -> None:
        watch = JobWatch(engine, job(), timeout=60, events=waiting is _reading_the_events)  # type: ignore[arg-type]
        task = asyncio.ensure_future(waiting(watch))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watch.cancel("the client disconnected")  # as EventStream's end does; a no-op after result()'s own
        handle = engine.handles[0]
        assert handle.cancel_reason == "the client disconnected"
        handle.future.set_exception(JobCancelled(handle.cancel_reason))  # as the engine ends a cancelled job
        await _settle()
        engine.handles.clear()  # the engine is done with the job
        del watch, task, handle
        gc.collect()  # while the loop runs: asyncio.run would cancel a pending reader itself at its end
        await _settle()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    assert _asyncio_errors(caplog) == []


def test_a_stream_still_hears_its_events_and_then_its_result():
    """What the stream reads is unchanged: events as they come, a tick after silence, then the result."""
    from pipeline.jobs import Progress

    engine = _Engine()

    async def main() -> list:
        watch = JobWatch(engine, job(), timeout=60, events=True)  # type: ignore[arg-type]
        handle = engine.handles[0]
        seen: list = []
        async for event in watch.events(tick=0.05):
            seen.append(event)
            if len(seen) == 1:
                handle.listener(Progress(1, 2))
            elif len(seen) == 2:
                handle.future.set_result("done")  # type: ignore[arg-type]
        seen.append(await watch.result())
        return seen

    seen = asyncio.run(main())
    assert seen[0] is None and seen[1] == Progress(1, 2) and seen[-1] == "done"
