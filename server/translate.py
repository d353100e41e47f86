"""The one mapping between the OpenAI image API and the pipeline: request -> GenerationJob, result -> response."""

from __future__ import annotations

import secrets
import time

from pipeline.jobs import GenerationJob
from pipeline.sizes import SizeError, cap_pixels, model_size, parse_wxh
from pipeline.weights import ModelSpec

from .errors import invalid_param
from .protocol import ImageData, ImageGenerationRequest, ImagesResponse
from .settings import Settings

DEFAULT_SIZE = (1024, 1024)  # 1 MP, the product's default


def generation_job(request: ImageGenerationRequest, spec: ModelSpec, settings: Settings) -> GenerationJob:
    prompt = request.prompt
    if not prompt.strip():
        raise invalid_param("The prompt must not be empty.", "prompt", code="empty_prompt")
    width, height = _output_size(request.size)
    run_width, run_height = model_size(width, height)
    steps = request.num_inference_steps or spec.defaults.steps
    if steps > settings.max_steps:
        raise invalid_param(f"num_inference_steps must be at most {settings.max_steps}, got {steps}.",
                            "num_inference_steps")
    guidance = spec.defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
    n = request.n or 1
    first_seed = secrets.randbelow(2**32) if request.seed is None else request.seed
    return GenerationJob(prompt=prompt, width=width, height=height, run_width=run_width, run_height=run_height,
                         seeds=tuple(first_seed + i for i in range(n)), steps=steps,
                         guidance_scale=guidance)


def _output_size(size: str | None) -> tuple[int, int]:
    if size is None or size.strip().lower() == "auto":
        return DEFAULT_SIZE
    try:
        return cap_pixels(*parse_wxh(size, "size"))
    except SizeError as exc:
        raise invalid_param(str(exc), exc.param) from exc


def images_response(job: GenerationJob, data: list[ImageData], output_format: str) -> ImagesResponse:
    return ImagesResponse(created=int(time.time()), data=data, output_format=output_format,
                          size=f"{job.width}x{job.height}")
