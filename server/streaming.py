"""Streamed image responses, framed as OpenAI frames them: Server-Sent Events `image_generation.partial_image` /
`image_generation.completed` (edits: `image_edit.*`), SSE comments as keepalives and as per-step progress
(`: progress 3/20`, which SDKs skip), and an `error` event carrying the envelope if the job fails once started.
The job is awaited by the same `JobWatch` as a JSON answer; a client that closes the stream cancels the job."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from pipeline.codecs import encode_image
from pipeline.jobs import GenerationResult, Preview, Progress

from .errors import APIError, engine_error, error_body
from .jobwatch import JobWatch

KEEPALIVE_SECONDS = 10.0


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream:
    """One job's events as SSE bytes; `finish` renders the completed events' data from the result."""

    def __init__(
        self,
        watch: JobWatch,
        *,
        kind: str,
        common: dict,
        output_format: str,
        codec_quality: int | None,
        finish: Callable[[GenerationResult], Awaitable[list[dict]]],
        on_end: Callable[[APIError | None], Awaitable[None]] | None = None,
        on_gone: Callable[[], None] | None = None,
    ):
        self.watch = watch
        self.kind = kind  # "image_generation" | "image_edit"
        self.common = common  # background, output_format, quality, size
        self.output_format = output_format
        self.codec_quality = codec_quality
        self.finish = finish
        self.on_end = on_end  # hears the outcome (None: ok) before the completed events are sent (the history)
        self.on_gone = on_gone  # hears that the client left before the end
        self.on_status: Callable[[int], None] | None = None  # hears a failed outcome's status (the metrics)

    async def chunks(self) -> AsyncIterator[bytes]:
        ended = False
        try:
            async for event in self.watch.events(KEEPALIVE_SECONDS):
                async for chunk in self._render(event):
                    yield chunk
            completed = await self.finish(await self.watch.result())
            ended = True
            if self.on_end is not None:
                await self.on_end(None)
        except Exception as exc:  # the job failed (or timed out) after the stream began: say so in the stream
            error = engine_error(exc)
            ended = True
            if self.on_status is not None:
                self.on_status(error.status)
            if self.on_end is not None:
                await self.on_end(error)
            yield sse("error", error_body(error.message, error.type, error.param, error.code))
            return
        finally:
            self.watch.cancel("the client disconnected")  # no-op once the job is done
            if not ended and self.on_status is not None:
                self.on_status(499)  # the client left: as a JSON request's (errors.ClientGone)
            if not ended and self.on_gone is not None:
                self.on_gone()
        for data in completed:
            yield sse(f"{self.kind}.completed", data)

    async def _render(self, event: Progress | Preview | None) -> AsyncIterator[bytes]:
        if event is None:
            yield b": keepalive\n\n"
        elif isinstance(event, Progress):
            yield f": progress {event.done}/{event.total}\n\n".encode()
        else:
            for image_index, image in enumerate(event.images):  # with n > 1, one preview of each image
                encoded = await asyncio.to_thread(encode_image, image, self.output_format, quality=self.codec_quality)
                yield sse(
                    f"{self.kind}.partial_image",
                    {
                        "type": f"{self.kind}.partial_image",
                        "b64_json": base64.b64encode(encoded).decode("ascii"),
                        "created_at": int(time.time()),
                        "partial_image_index": event.index,
                        "image_index": image_index,  # which of the request's images (not in OpenAI's events)
                        **self.common,
                    },
                )
