"""The one mapping between the OpenAI image API and the pipeline: request -> GenerationJob, result -> response."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from PIL import Image

from pipeline.accounting import Accounting
from pipeline.adapters import AdapterError, Adapters, Selection, UnknownAdapter, select
from pipeline.codecs import normalize_output_format
from pipeline.jobs import GenerationJob
from pipeline.masking import fit_mask
from pipeline.sizes import SizeError, model_size, resolve_output_size
from pipeline.weights import ModelSpec

from .errors import invalid_param
from .protocol import (
    CODEC_QUALITY,
    GUIDANCE,
    MAX_SEED,
    STEPS,
    ImageData,
    ImageParameters,
    ImagesResponse,
    InputTokensDetails,
    Usage,
)
from .settings import Settings

# `quality` (the API's step preset) as shares of the model's default step count, and the tier each reports as.
_QUALITY_STEPS = {
    "low": 0.5,
    "medium": 0.75,
    "high": 1.0,
    "auto": 1.0,
    "standard": 1.0,
    "hd": 1.25,
    "xhigh": 1.25,
    "max": 1.5,
}
_QUALITY_LABEL = {"low": "low", "medium": "medium"}


@dataclass(frozen=True)
class OutputOptions:
    """How the images of one request are delivered."""

    response_format: str  # "url" | "b64_json"
    output_format: str  # "png" | "jpeg" | "webp" | "gif" | "avif"
    codec_quality: int | None  # a lossy format's quality 0-100 (output_compression), None = the codec's default
    sync_mode: bool  # url is a data: URI, nothing stored


def build_job(
    params: ImageParameters,
    spec: ModelSpec,
    settings: Settings,
    references: tuple[Image.Image, ...] = (),
    mask: Image.Image | None = None,
    *,
    model: str = "",
    request_id: str = "",
    adapters: Adapters = Adapters(),
    safety_tolerance: int | None = None,
) -> GenerationJob:
    if len(params.prompt) > settings.max_prompt_chars:
        raise invalid_param(
            f"The prompt has {len(params.prompt)} characters; this server accepts at most {settings.max_prompt_chars}.",
            "prompt",
            code="prompt_too_long",
        )
    width, height = _output_size(params, references, settings.max_output_pixels)
    run_width, run_height = model_size(width, height)
    n = params.n or 1
    first_seed = secrets.randbelow(2**32) if params.seed is None else params.seed
    if first_seed + n - 1 > MAX_SEED:  # image i's seed is seed + i, and each must be one the API takes back
        raise invalid_param(
            f"With n={n}, seed must be at most {MAX_SEED - n + 1} (image i uses seed + i, at most {MAX_SEED}).",
            "seed",
        )
    return GenerationJob(
        prompt=params.prompt,
        width=width,
        height=height,
        run_width=run_width,
        run_height=run_height,
        seeds=tuple(first_seed + i for i in range(n)),
        steps=_steps(params, spec, settings),
        guidance_scale=_guidance(params, spec),
        references=references,
        mask=fit_mask(mask, width, height) if mask is not None else None,
        model=model,
        request_id=request_id,
        partial_images=(params.partial_images or 0) if params.stream else 0,
        loras=_loras(params, adapters),
        enhance_prompt=params.prompt_enhancement == "on",
        safety_tolerance=safety_tolerance,
    )


def _loras(params: ImageParameters, adapters: Adapters) -> Selection:
    """The adapters the request names, checked against the model's: an unknown one is a 400 naming it."""
    try:
        return select(adapters, [(choice.name, choice.scale) for choice in params.loras or []])
    except AdapterError as exc:
        code = "lora_not_found" if isinstance(exc, UnknownAdapter) else "invalid_value"
        raise invalid_param(str(exc), "loras", code=code) from exc


def _output_size(params: ImageParameters, references: tuple[Image.Image, ...], max_pixels: int) -> tuple[int, int]:
    try:
        return resolve_output_size(
            size=params.size,
            aspect_ratio=params.aspect_ratio,
            resolution=params.resolution,
            width=params.width,
            height=params.height,
            reference_size=references[0].size if references else None,
            max_pixels=max_pixels,
        )
    except SizeError as exc:
        raise invalid_param(str(exc), exc.param) from exc


def _steps(params: ImageParameters, spec: ModelSpec, settings: Settings) -> int:
    """num_inference_steps (or its alias steps) wins; else the quality preset scales the model's default."""
    given = params.first_given(STEPS)
    if given is None:
        share = _QUALITY_STEPS[params.quality or "auto"]
        return max(1, min(settings.max_steps, round(spec.defaults.steps * share)))
    param, asked = given
    if asked > settings.max_steps:
        raise invalid_param(f"{param} must be at most {settings.max_steps} on this server, got {asked}.", param)
    return asked


def _guidance(params: ImageParameters, spec: ModelSpec) -> float:
    given = params.first_given(GUIDANCE)
    return spec.defaults.guidance_scale if given is None else given[1]


def output_options(params: ImageParameters) -> OutputOptions:
    try:
        output_format = normalize_output_format(params.output_format or "png")
    except ValueError as exc:
        raise invalid_param(str(exc), "output_format") from exc
    quality = params.first_given(CODEC_QUALITY)
    return OutputOptions(
        response_format=params.response_format or "url",
        output_format=output_format,
        codec_quality=None if quality is None else quality[1],
        sync_mode=bool(params.sync_mode),
    )


def quality_tier(params: ImageParameters, steps: int, default_steps: int) -> str:
    """The quality the response reports (OpenAI's low / medium / high): the step preset asked for, or, where
    explicit steps overrode it (the preset is then reported as ignored), the lowest tier they do not exceed: low
    up to half the model's default steps, medium up to three quarters, else high."""
    if params.first_given(STEPS) is None:
        return _QUALITY_LABEL.get(params.quality or "auto", "high")
    share = steps / max(1, default_steps)
    return "low" if share <= _QUALITY_STEPS["low"] else "medium" if share <= _QUALITY_STEPS["medium"] else "high"


def usage(accounting: Accounting) -> Usage:
    return Usage(
        input_tokens=accounting.input_tokens,
        input_tokens_details=InputTokensDetails(
            text_tokens=accounting.text_tokens, image_tokens=accounting.reference_tokens
        ),
        output_tokens=accounting.output_tokens,
        total_tokens=accounting.total_tokens,
        output_megapixels=accounting.output_megapixels,
        reference_megapixels=accounting.reference_megapixels,
        billed_megapixels=accounting.billed_megapixels,
    )


def answer_fields(
    job: GenerationJob, params: ImageParameters, options: OutputOptions, default_steps: int
) -> dict[str, str]:
    """What every answer says about its images, in a JSON response and in each stream event alike."""
    return {
        "background": "opaque",
        "output_format": options.output_format,
        "size": f"{job.width}x{job.height}",
        "quality": quality_tier(params, job.steps, default_steps),
    }


def images_response(
    job: GenerationJob,
    data: list[ImageData],
    params: ImageParameters,
    options: OutputOptions,
    accounting: Accounting,
    warnings: list[str],
    default_steps: int,
    withheld: int = 0,
) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        usage=usage(accounting),
        warnings=warnings or None,
        withheld_images=withheld or None,
        **answer_fields(job, params, options, default_steps),
    )
