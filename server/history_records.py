"""What the image service tells the history about one request, and the writes that follow, off the event loop.

`HistoryRecorder.begin` opens a `Recording` for a request (a no-op one for `sync_mode` or with --no-history); the
service fills it in as the request goes (the job's normalized parameters, the reference hashes, the timings, the
stored files) and ends it once with the outcome: ok, or the OpenAI error it was answered with. The row is then
written by the recorder's one writer thread; a JSON answer waits for it (a few milliseconds; at most
`WRITE_WAIT_SECONDS`, then the write finishes behind the answer), a client that left does not."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeline.jobs import GenerationJob, GenerationResult

from .errors import APIError
from .history import HistoryDB
from .protocol import ImageParameters
from .provenance import Sources
from .timing import RequestTiming

log = logging.getLogger("flux2.history")

WRITE_WAIT_SECONDS = 2.0
CLIENT_GONE = APIError(499, "The client disconnected before the images were delivered.", code="client_disconnected")
_NOT_RECORDED = {"prompt", "images", "mask", "stream", "partial_images"}


class Recording:
    """One request's row, filled in as the request goes. `end` is called once (later calls are ignored)."""

    def __init__(
        self, recorder: HistoryRecorder | None, endpoint: str, params: ImageParameters, key_id: str | None, rid: str
    ):
        self.recorder = recorder
        self.id = f"hist_{uuid.uuid4().hex}"
        self.request_id = rid
        self.created = time.time()
        self.endpoint = endpoint
        self.prompt = params.prompt
        self.model: str | None = params.model
        self.revised_prompt: str | None = None
        self.key_id = key_id
        self.request = {k: v for k, v in params.model_dump(exclude_none=True).items() if k not in _NOT_RECORDED}
        for name in params.unknown_parameters:  # their names only: values can be anything a client sent
            self.request.pop(name, None)
        self.ignored = params.ignored_parameters
        self.stream = bool(params.stream)
        self.quality = params.quality
        self.parameters: dict[str, Any] | None = None
        self.seeds: list[int] = []
        self.references: list[str] = []
        self.mask: str | None = None
        self.timings: dict[str, float] = {}
        self.prompt_cached: bool | None = None
        self.files: list[str] = []
        self._written: Future[None] | None = None

    @property
    def active(self) -> bool:
        """Whether this request is recorded (its images are then also kept as files, b64 and streams too)."""
        return self.recorder is not None

    def inputs(self, sources: Sources) -> None:
        """The SHA-256 of each uploaded image and of the mask (computed once, for the files' metadata too)."""
        self.references = list(sources.references)
        self.mask = sources.mask

    def job(self, job: GenerationJob, output_format: str, codec_quality: int | None, response_format: str) -> None:
        """The normalized parameters: sent back as they are, they make the same images."""
        self.model = job.model
        self.seeds = list(job.seeds)
        self.parameters = {
            "model": job.model,
            "size": f"{job.width}x{job.height}",
            "n": job.n,
            "seed": job.seeds[0],
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "quality": self.quality or "auto",
            "background": "opaque",
            "output_format": output_format,
            "output_compression": codec_quality,
            "response_format": response_format,
        }
        if job.loras:  # what else makes the images: the adapters, the rewrite, the screening
            self.parameters["loras"] = [{"name": name, "scale": scale} for name, scale in job.loras]
        if job.enhance_prompt:
            self.parameters["prompt_enhancement"] = "on"
        if job.safety_tolerance is not None:
            self.parameters["safety_tolerance"] = job.safety_tolerance

    def rendered(self, result: GenerationResult, timing: RequestTiming) -> None:
        self.seeds = list(result.seeds)
        self.revised_prompt = result.prompt.used_prompt
        self.timings = {name: round(seconds * 1000, 1) for name, seconds in timing.seconds().items()}
        self.prompt_cached = timing.stages.prompt_cached

    def stored(self, name: str) -> None:
        self.files.append(name)

    def row(self, error: APIError | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "created": self.created,
            "endpoint": self.endpoint,
            "model": self.model,
            "prompt": self.prompt,
            "revised_prompt": self.revised_prompt,
            "status": "ok" if error is None else "error",
            "http_status": 200 if error is None else error.status,
            "error_code": None if error is None else error.code,
            "error_message": None if error is None else error.message,
            "api_key_id": self.key_id,
            "data": {
                "parameters": self.parameters,
                "request": self.request,
                "ignored_parameters": self.ignored,
                "stream": self.stream,
                "seeds": self.seeds,
                "references": self.references,
                "mask": self.mask,
                "timings_ms": self.timings,
                "prompt_cached": self.prompt_cached,
                "files": self.files,
            },
        }

    def end(self, error: APIError | None) -> None:
        """Schedule the row's write (once)."""
        if self.recorder is None or self._written is not None:
            return
        self._written = self.recorder.submit(self.row(error), self.files)

    async def written(self) -> None:
        """Wait for the row's write, a short while at most (it then finishes behind the answer)."""
        if self._written is None:
            return
        await asyncio.wait({asyncio.wrap_future(self._written)}, timeout=WRITE_WAIT_SECONDS)

    async def ended(self, error: APIError | None) -> None:
        self.end(error)
        await self.written()


class HistoryRecorder:
    """The service's side of the history: begins recordings and writes rows on one thread of its own."""

    def __init__(self, db: HistoryDB | None, retention_seconds: float):
        self.db = db
        self.retention_seconds = retention_seconds
        self._writer: ThreadPoolExecutor | None = None
        if db is not None:
            self._submit(self._expire, [])  # what expired while the server was down

    def _submit(self, work: Callable[..., None], *args: Any) -> Future[None]:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux2-history")
        return self._writer.submit(work, *args)

    def begin(self, endpoint: str, params: ImageParameters, key_id: str | None, request_id: str) -> Recording:
        recorded = self.db is not None and not params.sync_mode
        return Recording(self if recorded else None, endpoint, params, key_id, request_id)

    def submit(self, row: dict[str, Any], files: list[str]) -> Future[None]:
        return self._submit(self._insert, row, list(files))

    def _insert(self, row: dict[str, Any], files: list[str]) -> None:
        assert self.db is not None
        try:
            self.db.insert(row, files)
            self.db.expire(time.time() - self.retention_seconds)
        except Exception:  # the answer was given; the row is what is lost, and the log says which
            log.exception("could not record request %s in the history %s", row["request_id"], self.db.path)

    def files_removed(self, names: list[str]) -> None:
        """The image store pruned these files: their rows go with them (on the writer thread)."""
        if self.db is not None and names:
            self._submit(self._expire, names)

    def _expire(self, names: list[str]) -> None:
        assert self.db is not None
        try:
            self.db.expire(time.time() - self.retention_seconds, names)
        except Exception:
            log.exception("could not expire history rows in %s", self.db.path)

    def close(self) -> None:
        """Finish the pending writes, then close the file."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self.db is not None:
            self.db.close()
