"""Image serving logic between the routes and the engine: resolve the model, decode inputs, build the job, await
the engine off the event loop, encode, store or inline, answer. Knows no FastAPI request objects: routes pass
what it needs."""

from __future__ import annotations

import asyncio
import base64
import logging

from PIL import Image

from pipeline.accounting import account
from pipeline.codecs import FILE_EXTENSIONS, ImageDecodeError, data_uri, decode_image, decode_mask, encode_image
from pipeline.engine import Engine, EngineUnavailable
from pipeline.jobs import GenerationJob, GenerationResult
from pipeline.prompts import MAX_SEQUENCE_LENGTH

from .errors import APIError, invalid_param
from .protocol import MAX_REFERENCE_IMAGES, ImageData, ImageParameters, ImagesResponse
from .settings import Settings
from .storage import ImageStore
from .translate import OutputOptions, build_job, check_supported, images_response, output_options

log = logging.getLogger("flux2.serving")

FILES_ROUTE = "/v1/images/files"


class ImageService:
    def __init__(self, settings: Settings, engine: Engine, store: ImageStore):
        self.settings = settings
        self.engine = engine
        self.store = store

    def check_model(self, requested: str | None) -> None:
        if requested is None or requested in self.settings.model_ids:
            return
        served = ", ".join(self.settings.model_ids)
        raise APIError(404, f"The model '{requested}' does not exist. This server serves: {served}.",
                       param="model", code="model_not_found")

    async def generate(self, params: ImageParameters, base_url: str) -> ImagesResponse:
        return await self._produce(params, (), None, base_url)

    async def edit(self, params: ImageParameters, images: list[bytes], mask: bytes | None, base_url: str,
                   image_param: str = "image") -> ImagesResponse:
        if not images:
            raise APIError(400, "Missing required parameter: 'image' (1 to 10 images to edit).", param=image_param,
                           code="missing_required_parameter")
        if len(images) > MAX_REFERENCE_IMAGES:
            raise invalid_param(f"At most {MAX_REFERENCE_IMAGES} images can be edited at once, got {len(images)}.",
                                image_param, code="too_many_images")
        self.check_model(params.model)  # before the costly decoding
        references, mask_image = await asyncio.to_thread(_decode_inputs, images, mask, image_param)
        return await self._produce(params, references, mask_image, base_url)

    async def _produce(self, params: ImageParameters, references: tuple[Image.Image, ...],
                       mask: Image.Image | None, base_url: str) -> ImagesResponse:
        self.check_model(params.model)
        check_supported(params)
        options = output_options(params)
        model = self.engine.model
        if model is None:
            raise APIError(503, f"The model is not ready ({self.engine.state}); retry shortly.",
                           code="model_not_ready")
        job = build_job(params, model.spec, self.settings, references, mask)
        result = await self._run(job)
        data = await asyncio.to_thread(self._deliver, job, result, options, base_url)
        warnings = []
        if result.prompt.truncated:
            warnings.append(f"The prompt was cut to its first {result.prompt.text_tokens} tokens: the text encoder "
                            f"reads {MAX_SEQUENCE_LENGTH} tokens at most. revised_prompt holds the part used.")
        return images_response(job, data, params, options, account(job, result.prompt.text_tokens), warnings)

    async def _run(self, job: GenerationJob) -> GenerationResult:
        try:
            future = self.engine.submit(job)
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        return await asyncio.wrap_future(future)

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
                name = self.store.save(encoded, FILE_EXTENSIONS[options.output_format])
                item.url = f"{base_url}{FILES_ROUTE}/{name}"
            data.append(item)
        return data


def _decode_inputs(images: list[bytes], mask: bytes | None,
                   image_param: str) -> tuple[tuple[Image.Image, ...], Image.Image | None]:
    """Decode the references (RGB, EXIF applied, <= 4 MP) and the mask (255 = repaint, the first image's size)."""
    references = []
    for index, data in enumerate(images):
        try:
            references.append(decode_image(data))
        except ImageDecodeError as exc:
            which = f"Image {index + 1} of {len(images)}" if len(images) > 1 else "The image"
            raise invalid_param(f"{which}: {exc}", image_param, code="invalid_image") from exc
    if mask is None:
        return tuple(references), None
    first = references[0]
    try:
        # The mask matches the first image as uploaded; it is scaled with it when that was over 4 MP.
        mask_image = decode_mask(mask, first.info.get("source_size", first.size), resize_to=first.size)
    except ImageDecodeError as exc:
        raise invalid_param(f"The mask: {exc}", "mask", code="invalid_mask") from exc
    return tuple(references), mask_image
