"""Image serving logic between the routes and the engine: resolve the model, decode inputs, build the job, await
the engine off the event loop, encode, store or inline, answer. Knows no FastAPI request objects: routes pass
what it needs."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping

from PIL import Image

from pipeline.accounting import account
from pipeline.codecs import FILE_EXTENSIONS, ImageDecodeError, data_uri, decode_image, decode_mask, encode_image
from pipeline.engine import Engine, JobHandle
from pipeline.jobs import EngineUnavailable, GenerationJob, GenerationResult, JobCancelled, OutOfDeviceMemory, QueueFull
from pipeline.prompts import MAX_SEQUENCE_LENGTH

from .arrivals import submitted
from .errors import APIError, ClientGone, invalid_param, job_error
from .protocol import MAX_REFERENCE_IMAGES, ImageData, ImageParameters, ImagesResponse
from .request_ids import current_request_id
from .settings import Settings
from .storage import ImageStore
from .streaming import EventStream
from .timing import HEADER as SERVER_TIMING
from .timing import RequestTiming
from .translate import (OutputOptions, build_job, check_supported, images_response, output_options, quality_label,
                        usage as images_usage)

log = logging.getLogger("flux2.serving")

FILES_ROUTE = "/v1/images/files"
_POLL_SECONDS = 0.2  # how often a waiting request checks for its client's disconnect

Disconnected = Callable[[], Awaitable[bool]]


async def _never() -> bool:
    return False


class ImageService:
    def __init__(self, settings: Settings, engine: Engine, store: ImageStore,
                 on_timing: Callable[[RequestTiming], None] | None = None):
        self.settings = settings
        self.engine = engine
        self.store = store
        self.on_timing = on_timing  # hears each finished request's stage timing (metrics)

    def resolve_model(self, requested: str | None) -> str:
        """The served model's name for a requested id or alias (None: the default model)."""
        if requested is None:
            return self.settings.default_model
        if requested in self.settings.model_ids:
            return self.settings.model_ids[requested]
        served = ", ".join(self.settings.model_ids)
        raise APIError(404, f"The model '{requested}' does not exist. This server serves: {served}.",
                       param="model", code="model_not_found")

    async def generate(self, params: ImageParameters, base_url: str, disconnected: Disconnected = _never,
                       headers: MutableMapping[str, str] | None = None) -> ImagesResponse | EventStream:
        timing = RequestTiming()
        started = self._start(params, (), None)
        return await self._answer(started, params, base_url, disconnected, timing, headers)

    async def edit(self, params: ImageParameters, images: list[bytes], mask: bytes | None, base_url: str,
                   image_param: str = "image", disconnected: Disconnected = _never,
                   headers: MutableMapping[str, str] | None = None) -> ImagesResponse | EventStream:
        timing = RequestTiming()
        if not images:
            raise APIError(400, "Missing required parameter: 'image' (1 to 10 images to edit).", param=image_param,
                           code="missing_required_parameter")
        if len(images) > MAX_REFERENCE_IMAGES:
            raise invalid_param(f"At most {MAX_REFERENCE_IMAGES} images can be edited at once, got {len(images)}.",
                                image_param, code="too_many_images")
        self.resolve_model(params.model)  # before the costly decoding
        references, mask_image = await asyncio.to_thread(_decode_inputs, images, mask, image_param,
                                                         self.settings.max_input_pixels)
        timing.inputs = time.perf_counter() - timing.started
        started = self._start(params, references, mask_image)
        return await self._answer(started, params, base_url, disconnected, timing, headers)

    def _start(self, params: ImageParameters, references: tuple[Image.Image, ...],
               mask: Image.Image | None) -> tuple[GenerationJob, OutputOptions, JobHandle | EventStream]:
        """Build and submit the job (a stream submits it too), so that a full queue or an unready model is a plain
        JSON error."""
        job, options = self._prepare(params, references, mask)
        if params.stream:
            stream = self._stream(job, params, options, "image_edit" if references else "image_generation")
            submitted()
            return job, options, stream
        handle = self._submit(job)
        submitted()  # a batch about to start need not wait for this request any more
        return job, options, handle

    async def _answer(self, started: tuple[GenerationJob, OutputOptions, JobHandle | EventStream],
                      params: ImageParameters, base_url: str, disconnected: Disconnected, timing: RequestTiming,
                      headers: MutableMapping[str, str] | None) -> ImagesResponse | EventStream:
        """The JSON answer, or (stream=true) the event stream. A JSON answer's stage timing goes into `headers`
        (Server-Timing), the log and the metrics."""
        job, options, handle = started
        if isinstance(handle, EventStream):
            return handle
        result = await self._wait(handle, disconnected)
        timing.queue, timing.stages = handle.queue_seconds, result.stages
        encode_started = time.perf_counter()
        data = await asyncio.to_thread(self._deliver, job, result, options, base_url)
        timing.encode = time.perf_counter() - encode_started
        timing.finish()
        if headers is not None:
            headers[SERVER_TIMING] = timing.header()
        log.info("done: %d image%s %dx%d, %s", job.n, "s" if job.n > 1 else "", job.width, job.height,
                 timing.log_text())
        if self.on_timing is not None:
            self.on_timing(timing)
        return images_response(job, data, params, options, account(job, result.prompt.text_tokens),
                               params.ignored_warnings + _warnings(result))

    def _prepare(self, params: ImageParameters, references: tuple[Image.Image, ...],
                 mask: Image.Image | None) -> tuple[GenerationJob, OutputOptions]:
        name = self.resolve_model(params.model)
        check_supported(params)
        options = output_options(params)
        if self.engine.state != "ready":
            raise APIError(503, f"The model is not ready ({self.engine.state}); retry shortly.",
                           code="model_not_ready")
        spec = self.engine.model_specs()[name]
        job = build_job(params, spec, self.settings, references, mask, model=name,
                        request_id=current_request_id.get())
        return job, options

    def _submit(self, job: GenerationJob, listener=None) -> JobHandle:
        try:
            return self.engine.submit(job, listener)
        except QueueFull as exc:
            raise APIError(429, f"The server is busy: {exc}. Retry in about {math.ceil(exc.retry_after)} s.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(math.ceil(exc.retry_after))}) from exc
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc

    async def _wait(self, handle: JobHandle, disconnected: Disconnected) -> GenerationResult:
        """Wait for the result while watching the client and the clock: a client that leaves or a request past
        --request-timeout cancels the job at its next denoising step."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        future = asyncio.wrap_future(handle.future)
        try:
            while not future.done():
                await asyncio.wait([future], timeout=_POLL_SECONDS)
                if future.done():
                    break
                if await disconnected():
                    handle.cancel("the client disconnected")
                    raise ClientGone()
                if loop.time() > deadline:
                    handle.cancel("request timeout")
                    raise APIError(504, f"The request took longer than the server's limit of "
                                   f"{self.settings.request_timeout:g} s and was cancelled.", code="timeout",
                                   headers={"x-should-retry": "false"})
        except asyncio.CancelledError:  # the server is stopping, or the connection task was cancelled
            handle.cancel("the request was cancelled")
            raise
        try:
            return future.result()
        except (JobCancelled, OutOfDeviceMemory) as exc:
            raise job_error(exc) from exc

    def _stream(self, job: GenerationJob, params: ImageParameters, options: OutputOptions,
                kind: str) -> EventStream:
        """Submit now (so a full queue is still a plain 429), then stream the job's events as they come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = self._submit(job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        common = {"background": "opaque", "output_format": options.output_format, "quality": quality_label(params),
                  "size": f"{job.width}x{job.height}"}

        async def finish(result: GenerationResult) -> list[dict]:
            usage = images_usage(account(job, result.prompt.text_tokens)).model_dump()
            encoded = await asyncio.to_thread(
                lambda: [encode_image(image, options.output_format, quality=options.quality)
                         for image in result.images])
            return [{"type": f"{kind}.completed", "b64_json": base64.b64encode(data).decode("ascii"),
                     "created_at": int(time.time()), "usage": usage, "seed": seed,
                     "revised_prompt": result.prompt.used_prompt, **common}
                    for data, seed in zip(encoded, result.seeds, strict=True)]

        return EventStream(handle, job, events, kind=kind, common=common, output_format=options.output_format,
                           quality=options.quality, timeout=self.settings.request_timeout, finish=finish)

    def _deliver(self, job: GenerationJob, result: GenerationResult, options: OutputOptions,
                 base_url: str) -> list[ImageData]:
        data = []
        for image, seed in zip(result.images, result.seeds, strict=True):
            encoded = encode_image(image, options.output_format, quality=options.quality)
            item = ImageData(revised_prompt=result.prompt.used_prompt, seed=seed)
            if options.response_format == "b64_json":
                item.b64_json = base64.b64encode(encoded).decode("ascii")
            elif options.sync_mode:
                item.url = data_uri(encoded, options.output_format)
            else:
                try:
                    name = self.store.save(encoded, FILE_EXTENSIONS[options.output_format])
                except OSError as exc:
                    log.error("could not store a generated image in %s: %s", self.store.directory, exc)
                    raise APIError(507, "The server could not store the generated image (its output directory is "
                                   "full or not writable). Ask for response_format 'b64_json' or sync_mode, or "
                                   "tell the server's operator.", code="storage_error") from exc
                item.url = f"{base_url}{FILES_ROUTE}/{name}"
            data.append(item)
        return data


def _decode_inputs(images: list[bytes], mask: bytes | None, image_param: str,
                   max_input_pixels: int) -> tuple[tuple[Image.Image, ...], Image.Image | None]:
    """Decode the references (RGB, EXIF applied, <= 4 MP) and the mask (255 = repaint, the first image's size)."""
    references = []
    for index, data in enumerate(images):
        try:
            references.append(decode_image(data, max_input_pixels=max_input_pixels))
        except ImageDecodeError as exc:
            which = f"Image {index + 1} of {len(images)}" if len(images) > 1 else "The image"
            raise invalid_param(f"{which}: {exc}", image_param, code="invalid_image") from exc
    if mask is None:
        return tuple(references), None
    first = references[0]
    try:
        # The mask matches the first image as uploaded; it is scaled with it when that was over 4 MP.
        mask_image = decode_mask(mask, first.info.get("source_size", first.size), resize_to=first.size,
                                 max_input_pixels=max_input_pixels)
    except ImageDecodeError as exc:
        raise invalid_param(f"The mask: {exc}", "mask", code="invalid_mask") from exc
    return tuple(references), mask_image


def _warnings(result: GenerationResult) -> list[str]:
    if not result.prompt.truncated:
        return []
    return [f"The prompt was cut to its first {result.prompt.text_tokens} tokens: the text encoder reads "
            f"{MAX_SEQUENCE_LENGTH} tokens at most. revised_prompt holds the part used."]
