"""Image serving logic between the routes and the engine: resolve the model, build the job, await the engine off
the event loop, encode, store or inline, answer. Knows no FastAPI request objects: routes pass what it needs."""

from __future__ import annotations

import asyncio
import base64
import logging

from pipeline.codecs import MEDIA_TYPES, encode_image
from pipeline.engine import Engine, EngineUnavailable
from pipeline.jobs import GenerationJob, GenerationResult

from .errors import APIError
from .protocol import ImageData, ImageGenerationRequest, ImagesResponse
from .settings import Settings
from .storage import ImageStore
from .translate import generation_job, images_response

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

    async def generate(self, request: ImageGenerationRequest, base_url: str) -> ImagesResponse:
        self.check_model(request.model)
        model = self.engine.model
        spec = model.spec if model is not None else None
        if spec is None:
            raise APIError(503, f"The model is not ready ({self.engine.state}); retry shortly.",
                           code="model_not_ready")
        job = generation_job(request, spec, self.settings)
        result = await self._run(job)
        output_format = request.output_format or "png"
        as_url = (request.response_format or "url") == "url"
        data = await asyncio.to_thread(self._deliver, job, result, output_format, as_url, base_url)
        return images_response(job, data, output_format)

    async def _run(self, job: GenerationJob) -> GenerationResult:
        try:
            future = self.engine.submit(job)
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        return await asyncio.wrap_future(future)

    def _deliver(self, job: GenerationJob, result: GenerationResult, output_format: str, as_url: bool,
                 base_url: str) -> list[ImageData]:
        data = []
        for image, seed in zip(result.images, result.seeds, strict=True):
            encoded = encode_image(image, output_format)
            if as_url:
                name = self.store.save(encoded, output_format)
                data.append(ImageData(url=f"{base_url}{FILES_ROUTE}/{name}", revised_prompt=job.prompt, seed=seed))
            else:
                data.append(ImageData(b64_json=base64.b64encode(encoded).decode("ascii"), revised_prompt=job.prompt,
                                      seed=seed))
        return data


def media_type_of(name: str) -> str:
    return MEDIA_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")
