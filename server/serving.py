"""Image serving between the routes and the engine: resolve the model (once), build and submit the job, await it
(`JobWatch`), render the images (one step for JSON and streams), answer. Knows no FastAPI request objects: routes
pass what it needs, and a client that leaves is noticed by the route (its awaiting task is cancelled)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping

from PIL import Image

from pipeline.accounting import account
from pipeline.codecs import FILE_EXTENSIONS, encode_image
from pipeline.engine import Engine
from pipeline.jobs import GenerationJob, GenerationResult
from pipeline.masking import repaints_nothing
from pipeline.prompts import MAX_SEQUENCE_LENGTH
from pipeline.weights import ModelSpec

from .arrivals import submitted
from .errors import APIError, engine_error
from .history_records import CLIENT_GONE, HistoryRecorder, Recording
from .ignored import note_ignored
from .inputs import EditInputs, decode_edit_images
from .jobwatch import JobWatch
from .media import data_uri
from .protocol import GUIDANCE, ImageData, ImageParameters, ImagesResponse
from .provenance import GENERATION, Provenance, Sources, provenance
from .request_ids import current_request_id
from .safety_policy import WITHHELD_HEADER, check_withheld, decide_safety
from .settings import Settings
from .storage import ImageStore
from .streaming import EventStream
from .timing import HEADER as SERVER_TIMING
from .timing import RequestTiming
from .translate import OutputOptions, answer_fields, build_job, images_response, output_options
from .translate import usage as images_usage

log = logging.getLogger("flux2.serving")

FILES_ROUTE = "/v1/images/files"
HISTORY_HEADER = "x-flux2-history-id"  # the answer's row in GET /v1/images/history/{id}
Served = ImagesResponse | EventStream


class ImageService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: ImageStore,
        on_timing: Callable[[RequestTiming], None] | None = None,
        history: HistoryRecorder | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.store = store
        self.history = history or HistoryRecorder(None, settings.retention_seconds)  # None: --no-history
        self.on_timing = on_timing  # hears each finished request's stage timing (metrics)

    def resolve_model(self, requested: str | None) -> str:
        """The served model's name for a requested id or alias (None: the default model)."""
        if requested is None:
            return self.settings.default_model
        if requested in self.settings.model_ids:
            return self.settings.model_ids[requested]
        served = ", ".join(self.settings.model_ids)
        raise APIError(
            404,
            f"The model '{requested}' does not exist. This server serves: {served}.",
            param="model",
            code="model_not_found",
        )

    async def generate(
        self,
        params: ImageParameters,
        base_url: str,
        headers: MutableMapping[str, str] | None = None,
        key_id: str | None = None,
    ) -> Served:
        record = self.history.begin("generations", params, key_id, current_request_id.get())

        async def serve() -> Served:
            timing = RequestTiming()
            model = self.resolve_model(params.model)
            return await self._serve(params, model, (), None, base_url, timing, headers, record)

        return await _recorded(record, serve(), headers)

    async def edit(
        self,
        inputs: EditInputs,
        base_url: str,
        headers: MutableMapping[str, str] | None = None,
        mode: str = "edit",
        key_id: str | None = None,
    ) -> Served:
        """An edit; a variation (`mode="variation"`) is an edit of one image with a neutral prompt."""
        kind = "variations" if mode == "variation" else "edits"
        record = self.history.begin(kind, inputs.params, key_id, current_request_id.get())

        async def serve() -> Served:
            timing = RequestTiming()
            model = self.resolve_model(inputs.params.model)  # before the costly decoding
            sources = Sources(mode)
            if record.active or self.settings.embed_metadata:  # the inputs' SHA-256, once and off the event loop
                sources = await asyncio.to_thread(Sources.uploaded, mode, inputs.images, inputs.mask)
            if record.active:
                record.inputs(sources)
            references, mask = await decode_edit_images(inputs, self.settings.max_input_pixels)
            timing.inputs = time.perf_counter() - timing.started
            return await self._serve(inputs.params, model, references, mask, base_url, timing, headers, record, sources)

        return await _recorded(record, serve(), headers)

    async def _serve(
        self,
        params: ImageParameters,
        model: str,
        references: tuple[Image.Image, ...],
        mask: Image.Image | None,
        base_url: str,
        timing: RequestTiming,
        headers: MutableMapping[str, str] | None,
        record: Recording,
        sources: Sources = GENERATION,
    ) -> Served:
        """Submit the job (a full queue or an unready model is a plain JSON error, streams included), then the JSON
        answer, or the event stream."""
        safety = decide_safety(params, self.engine.health().safety_checker, self.settings)
        spec = self.engine.model_specs()[model]
        unused = unused_by_model(params, spec)
        ignored_warnings = [*safety.unhonoured.values(), *unused.values(), *params.ignored_warnings]
        if headers is not None:
            note_ignored(headers, [*params.ignored_parameters, *safety.unhonoured, *unused])
        options = output_options(params)
        job = build_job(
            params,
            spec,
            self.settings,
            references,
            mask,
            model=model,
            request_id=current_request_id.get(),
            adapters=self.engine.model_adapters()[model],
            safety_tolerance=safety.tolerance,
        )
        if references:  # the references' digests (and the batch key) here, off the event loop, not in the engine
            started = time.perf_counter()
            await asyncio.to_thread(lambda: (job.reference_digests, job.batch_key))
            timing.inputs += time.perf_counter() - started
        stamp: Provenance | None = None  # the files' metadata (--no-metadata: none)
        if self.settings.embed_metadata:
            stamp = provenance(job, options.output_format, options.codec_quality, sources)
        record.job(job, options.output_format, options.codec_quality, options.response_format)
        watch = JobWatch(self.engine, job, self.settings.request_timeout, events=bool(params.stream))
        submitted()  # a batch about to start need not wait for this request any more
        if params.stream:
            kind = "image_edit" if references else "image_generation"
            common = answer_fields(job, params, options, spec.defaults.steps)

            async def finish(result: GenerationResult) -> list[dict]:
                return await self._completed_events(job, result, options, kind, common, timing, watch, record, stamp)

            return EventStream(
                watch,
                kind=kind,
                common=common,
                output_format=options.output_format,
                codec_quality=options.codec_quality,
                finish=finish,
                on_end=record.ended,
                on_gone=lambda: record.end(CLIENT_GONE),
            )
        result = await watch.result()
        withheld = check_withheld(result, job.safety_tolerance)  # all withheld: moderation_blocked
        data = await self._render(job, result, options, base_url, timing, watch, record, stamp)
        if headers is not None:
            headers[SERVER_TIMING] = timing.header()
            if result.withheld:
                headers[WITHHELD_HEADER] = str(result.withheld)
        return images_response(
            job,
            data,
            params,
            options,
            account(job, result.prompt.text_tokens),
            ignored_warnings + _warnings(result) + _mask_warnings(job) + withheld,
            spec.defaults.steps,
            withheld=result.withheld,
        )

    async def _render(
        self,
        job: GenerationJob,
        result: GenerationResult,
        options: OutputOptions,
        base_url: str,
        timing: RequestTiming,
        watch: JobWatch,
        record: Recording,
        stamp: Provenance | None,
    ) -> list[ImageData]:
        """The one rendering step: encode (with each file's metadata unless `stamp` is None), then inline or store
        each image; the request's timing is recorded."""
        timing.queue, timing.stages = watch.handle.queue_seconds, result.stages
        encode_started = time.perf_counter()
        data = await asyncio.to_thread(self._deliver, result, options, base_url, record, stamp)
        timing.encode = time.perf_counter() - encode_started
        timing.finish()
        record.rendered(result, timing)
        log.info(
            "done: %d image%s %dx%d, %s", job.n, "s" if job.n > 1 else "", job.width, job.height, timing.log_text()
        )
        if self.on_timing is not None:
            self.on_timing(timing)
        return data

    async def _completed_events(
        self,
        job: GenerationJob,
        result: GenerationResult,
        options: OutputOptions,
        kind: str,
        common: dict,
        timing: RequestTiming,
        watch: JobWatch,
        record: Recording,
        stamp: Provenance | None,
    ) -> list[dict]:
        """A stream's completed events: the same rendering as JSON, always inline (OpenAI streams b64_json)."""
        check_withheld(result, job.safety_tolerance)  # all withheld: the stream's error event says moderation_blocked
        inline = OutputOptions(
            response_format="b64_json",
            output_format=options.output_format,
            codec_quality=options.codec_quality,
            sync_mode=False,
        )
        data = await self._render(job, result, inline, "", timing, watch, record, stamp)
        # Each event's usage is its image's: summed over the events, the request's (a client that adds them up bills
        # the request once; each event once carried the whole request's).
        parts = account(job, result.prompt.text_tokens).per_image(job.n, len(data))
        return [
            {
                "type": f"{kind}.completed",
                "b64_json": item.b64_json,
                "created_at": int(time.time()),
                "usage": images_usage(part).model_dump(),
                "seed": item.seed,
                "image_index": index,
                "revised_prompt": item.revised_prompt,
                **common,
                **({"withheld_images": result.withheld} if result.withheld else {}),
            }
            for index, (item, part) in enumerate(zip(data, parts, strict=True))
        ]

    def _deliver(
        self,
        result: GenerationResult,
        options: OutputOptions,
        base_url: str,
        record: Recording,
        stamp: Provenance | None,
    ) -> list[ImageData]:
        data = []
        for index, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            metadata = stamp.record(index, seed, result.prompt.used_prompt) if stamp is not None else None
            encoded = encode_image(image, options.output_format, quality=options.codec_quality, metadata=metadata)
            item = ImageData(revised_prompt=result.prompt.used_prompt, seed=seed)
            if options.response_format == "b64_json":
                item.b64_json = base64.b64encode(encoded).decode("ascii")
                if record.active:  # the history keeps every image it lists (best effort: the answer is inline)
                    try:
                        record.stored(self.store.save(encoded, FILE_EXTENSIONS[options.output_format]))
                    except OSError as exc:
                        log.warning("could not keep an image for the history in %s: %s", self.store.directory, exc)
            elif options.sync_mode:
                item.url = data_uri(encoded, options.output_format)
            else:
                try:
                    name = self.store.save(encoded, FILE_EXTENSIONS[options.output_format])
                except OSError as exc:
                    log.error("could not store a generated image in %s: %s", self.store.directory, exc)
                    raise APIError(
                        507,
                        "The server could not store the generated image (its output directory is "
                        "full or not writable). Ask for response_format 'b64_json' or sync_mode, or "
                        "tell the server's operator.",
                        code="storage_error",
                    ) from exc
                record.stored(name)
                item.url = f"{base_url}{FILES_ROUTE}/{name}"
            data.append(item)
        return data


async def _recorded(record: Recording, work: Awaitable[Served], headers: MutableMapping[str, str] | None) -> Served:
    """`work`, its outcome recorded: a JSON answer (or its error) once its row is written, a stream when it ends,
    a client that left without waiting."""
    if record.active and headers is not None:
        headers[HISTORY_HEADER] = record.id
    try:
        served = await work
    except asyncio.CancelledError:
        record.end(CLIENT_GONE)
        raise
    except Exception as exc:
        await record.ended(engine_error(exc))
        raise
    if not isinstance(served, EventStream):
        await record.ended(None)
    return served


def unused_by_model(params: ImageParameters, spec: ModelSpec) -> dict[str, str]:
    """The settings the served model has no use for, {name: why}: a distilled klein runs without guidance (diffusers
    drops it with a log line only)."""
    guidance = params.first_given(GUIDANCE)
    if guidance is None or spec.family != "klein" or not spec.is_distilled:
        return {}
    return {guidance[0]: f"{guidance[0]} is not used: this distilled klein model runs without guidance."}


def _mask_warnings(job: GenerationJob) -> list[str]:
    if job.mask is None or not repaints_nothing(job.mask):
        return []
    return [
        "The mask repaints nothing (no transparent pixels; without alpha, no white ones): the image is returned "
        "as it was sent."
    ]


def _warnings(result: GenerationResult) -> list[str]:
    if not result.prompt.truncated:
        return list(result.warnings)
    return [
        *result.warnings,
        f"The prompt was cut to its first {result.prompt.text_tokens} tokens: the text encoder reads "
        f"{MAX_SEQUENCE_LENGTH} tokens at most. revised_prompt holds the part used.",
    ]
