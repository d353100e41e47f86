"""Streamed image responses, framed as OpenAI frames them: Server-Sent Events `image_generation.partial_image` /
`image_generation.completed` (edits: `image_edit.*`), SSE comments as keepalives and as per-step progress
(`: progress 3/20`, which SDKs skip), and an `error` event carrying the envelope if the job fails once started."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

from pipeline.codecs import encode_image
from pipeline.engine import JobHandle
from pipeline.jobs import Preview, Progress
from pipeline.jobs import GenerationJob

from .errors import APIError, error_body, job_error

KEEPALIVE_SECONDS = 10.0


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream:
    """Turns one job's engine events into SSE bytes. `events` receives the listener's events (from the worker
    thread, through the loop); `finish` builds the completed events from the result."""

    def __init__(self, handle: JobHandle, job: GenerationJob, events: asyncio.Queue, *, kind: str, common: dict,
                 output_format: str, quality: int | None, timeout: float, finish):
        self.handle = handle
        self.job = job
        self.events = events
        self.kind = kind  # "image_generation" | "image_edit"
        self.common = common  # background, output_format, quality, size
        self.output_format = output_format
        self.quality = quality
        self.timeout = timeout
        self.finish = finish  # async (result) -> list[dict], the completed events' data

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        future = asyncio.wrap_future(self.handle.future)
        try:
            while not future.done():
                getter = asyncio.ensure_future(self.events.get())
                done, _ = await asyncio.wait({getter, future}, timeout=KEEPALIVE_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    async for chunk in self._render(getter.result()):
                        yield chunk
                else:
                    getter.cancel()
                if not done:
                    yield b": keepalive\n\n"
                if loop.time() > deadline:
                    self.handle.cancel("request timeout")
                    yield sse("error", error_body(f"The request took longer than the server's limit of "
                                                  f"{self.timeout:g} s and was cancelled.", "server_error",
                                                  None, "timeout"))
                    return
            while not self.events.empty():  # previews that arrived with the result
                async for chunk in self._render(self.events.get_nowait()):
                    yield chunk
            try:
                completed = await self.finish(future.result())
            except APIError as exc:
                yield sse("error", error_body(exc.message, exc.type, exc.param, exc.code))
                return
            except Exception as exc:  # the job failed after the stream began: say so in the stream
                error = job_error(exc)
                yield sse("error", error_body(error.message, error.type, error.param, error.code))
                return
            for data in completed:
                yield sse(f"{self.kind}.completed", data)
        finally:
            if not future.done():
                self.handle.cancel("the client disconnected")

    async def _render(self, event) -> AsyncIterator[bytes]:
        if isinstance(event, Progress):
            yield f": progress {event.done}/{event.total}\n\n".encode()
        elif isinstance(event, Preview):
            for image in event.images:
                encoded = await asyncio.to_thread(encode_image, image, self.output_format, quality=self.quality)
                yield sse(f"{self.kind}.partial_image", {
                    "type": f"{self.kind}.partial_image", "b64_json": base64.b64encode(encoded).decode("ascii"),
                    "created_at": int(time.time()), "partial_image_index": event.index, **self.common})

