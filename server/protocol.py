"""OpenAI image API shapes (pydantic): what clients send and what we answer. Field validation only; the meaning
of the fields (sizes, steps, seeds) lives in `translate`.

Both endpoints share one set of parameters: the OpenAI image API's, the FLUX.2 [flex] product's (aspect_ratio,
resolution, seed, cfg_scale, ...) and the provider pass-through ones (num_inference_steps, width, height, ...).
Unknown fields are accepted (the product passes them through) and reported back as ignored."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

from pipeline.adapters import MAX_PER_REQUEST, MAX_SCALE, MIN_SCALE
from pipeline.codecs import normalize_output_format

# The spellings of one setting, the winning one first (ImageParameters.first_given).
STEPS = ("num_inference_steps", "steps")
GUIDANCE = ("guidance_scale", "cfg_scale")
CODEC_QUALITY = ("output_compression", "output_quality")

MAX_IMAGES_PER_REQUEST = 10
MAX_REFERENCE_IMAGES = 10
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000  # --max-prompt-chars can only lower it


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _on_off(value: object) -> object:
    """prompt_enhancement arrives as "on"/"off", a JSON boolean, or a form's "true"/"false"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        lowered = value.strip().lower()
        return {"true": "on", "false": "off", "1": "on", "0": "off"}.get(lowered, lowered)
    return value


def _form_bool(value: object) -> object:
    """Booleans from multipart forms arrive as strings ("true"/"false"), as the OpenAI SDKs send them."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "on", "off", "yes", "no"):
        return value.strip().lower() in ("true", "1", "on", "yes")
    return value


FormBool = Annotated[StrictBool, BeforeValidator(_form_bool)]


def _not_a_bool(value: object) -> object:
    """JSON true/false are not numbers (pydantic's lax mode would read them as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


def _json_text(value: object) -> object:
    """A list sent as a multipart form field arrives as its JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError('must be a JSON list such as [{"name": "style", "scale": 0.8}]') from exc
    return value


class LoraChoice(BaseModel):
    """One LoRA adapter a request runs with: its name (from /v1/models) and scale."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="An adapter's name, as /v1/models lists it.")
    scale: Float | None = Field(
        None, ge=MIN_SCALE, le=MAX_SCALE, description="Its strength (default: the scale the server gives it)."
    )

    _finite_scale = field_validator("scale")(_finite)


class ImageParameters(BaseModel):
    """The parameters both image endpoints take."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=r"\S",
        description="Text prompt (not blank). Prompts beyond 512 encoder tokens are truncated (reported).",
    )
    model: str | None = Field(None, description="A model id or alias from /v1/models; omitted: the default model.")
    n: Int | None = Field(None, ge=1, le=MAX_IMAGES_PER_REQUEST, description="Number of images, 1-10 (default 1).")

    size: str | None = Field(
        None,
        description='"WxH" (1-14142 px a side), "W:H" (same as aspect_ratio) or "auto". '
        "Always wins over aspect_ratio, resolution, width and height.",
    )
    aspect_ratio: str | None = Field(
        None,
        description='"W:H", mapped to the nearest of 1:1, 4:3, 3:4, 5:4, 4:5, 3:2, '
        '2:3, 16:9, 9:16, 21:9, 9:21; "custom" uses width and height.',
    )
    resolution: str | None = Field(
        None,
        description='Scale tier: "0.5K", "1K", "2K", "4K", megapixels "0.25", "1", '
        '"4" ("1MP"), or "auto"; mapped to the nearest of 0.25, 1 and 4 MP.',
    )
    width: Int | None = Field(
        None,
        description="Output width in px (rounded to a multiple of 16); with "
        'aspect_ratio "custom" or on its own with height.',
    )
    height: Int | None = Field(None, description="Output height in px (rounded to a multiple of 16).")

    seed: Int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i. Drawn and reported per image when absent.",
    )
    num_inference_steps: Int | None = Field(None, ge=1, description="Denoising steps (default: the model's).")
    steps: Int | None = Field(None, ge=1, description="Same as num_inference_steps.")
    guidance_scale: Float | None = Field(None, ge=0, le=100, description="Guidance scale (default: the model's).")
    cfg_scale: Float | None = Field(None, ge=0, le=100, description="Same as guidance_scale.")
    quality: Literal["low", "medium", "high", "auto", "standard", "hd", "xhigh", "max"] | None = Field(
        None,
        description="Step preset: low = half the model's default steps, medium = 3/4, high/auto/standard = "
        "the default, hd/xhigh = 1.25x, max = 1.5x. num_inference_steps wins.",
    )

    response_format: Literal["url", "b64_json"] | None = Field(None, description='"url" (default) or "b64_json".')
    output_format: str | None = Field(None, description="png (default), jpeg (or jpg), webp, gif or avif.")
    output_compression: Int | None = Field(None, ge=0, le=100, description="Quality 0-100 of lossy formats.")
    output_quality: Int | None = Field(None, ge=0, le=100, description="Same as output_compression.")
    sync_mode: FormBool | None = Field(None, description="true: the url is a data: URI and nothing is stored.")

    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="Accepted; FLUX.2 images are opaque ('transparent' is reported as ignored)."
    )
    style: str | None = Field(None, description="Accepted and ignored (reported in warnings).")
    moderation: str | None = Field(None, description="Accepted and ignored (reported in warnings).")
    user: str | None = Field(None, description="Accepted and ignored (reported in warnings).")
    prompt_enhancement: Annotated[Literal["on", "off"] | None, BeforeValidator(_on_off)] = Field(
        None,
        description='"off" (default) or "on": a language model rewrites the prompt first (the same for a given '
        "seed); revised_prompt returns the rewrite.",
    )
    safety_tolerance: Int | None = Field(
        None,
        ge=1,
        le=5,
        description="1 (strict) to 5 (permissive), default 2: how readily the server's safety checker withholds an "
        "image. Reported as ignored when the server has no checker.",
    )
    enable_safety_checker: FormBool | None = Field(
        None,
        description="false turns the safety checker off where the server allows it (--allow-disable-safety); "
        "true without a checker is reported as ignored.",
    )
    stream: FormBool | None = Field(
        None,
        description="true: Server-Sent Events (partial images, then the completed images), as OpenAI streams images.",
    )
    partial_images: Int | None = Field(None, ge=0, le=3, description="Used with stream.")
    loras: Annotated[list[LoraChoice] | None, BeforeValidator(_json_text)] = Field(
        None,
        max_length=MAX_PER_REQUEST,
        description='LoRA adapters to apply, e.g. [{"name": "style", "scale": 0.8}] (a JSON string in multipart '
        f"forms; names from /v1/models, scales {MIN_SCALE:g} to {MAX_SCALE:g}). Omitted: the base model.",
    )

    _finite_guidance = field_validator("guidance_scale", "cfg_scale")(_finite)

    @property
    def unknown_parameters(self) -> list[str]:
        """Fields this server does not know: accepted and ignored, as the product passes them through."""
        return sorted(self.model_extra or {})

    def first_given(self, spellings: tuple[str, ...]) -> tuple[str, Any] | None:
        """Of one setting's spellings (STEPS, GUIDANCE, CODEC_QUALITY: the one that wins first), the first the request
        set, as (its name, its value); None when it set none."""
        for name in spellings:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def unhonoured_parameters(self) -> dict[str, str]:
        """Known fields that were set but that this server does not act on: {name: why, in words}."""
        reasons = {}
        if self.background == "transparent":
            reasons["background"] = (
                "background 'transparent' is not supported: FLUX.2 makes opaque images, so the image is opaque."
            )
        if self.moderation is not None:
            reasons["moderation"] = "moderation is not applied: this server runs no moderation model."
        if self.user is not None:
            reasons["user"] = "user is not used by this server."
        if self.style is not None:
            reasons["style"] = "style is not used by FLUX.2: describe the style in the prompt."
        if self.partial_images and not self.stream:
            reasons["partial_images"] = "partial_images applies to streamed responses only (stream: true)."
        for used, alias in (STEPS, GUIDANCE, CODEC_QUALITY):
            if getattr(self, alias) is not None and getattr(self, used) not in (None, getattr(self, alias)):
                reasons[alias] = f"{alias} was ignored: {used} was given too, and it wins."
        steps = self.first_given(STEPS)
        if self.quality not in (None, "auto", "high", "standard") and steps is not None:
            reasons["quality"] = f"quality {self.quality!r} was ignored: {steps[0]} sets the steps."
        if isinstance(self.size, str) and "x" in self.size.lower():  # "WxH" is exact: the other size fields lose
            for name in ("aspect_ratio", "resolution", "width", "height"):
                if getattr(self, name, None) is not None:
                    reasons[name] = f"{name} was ignored: size {self.size.strip()!r} sets the size."
        codec_quality = self.first_given(CODEC_QUALITY)
        lossless = _format_of(self.output_format)
        if codec_quality is not None and lossless in ("png", "gif"):
            reasons[codec_quality[0]] = f"{codec_quality[0]} applies to jpeg, webp and avif only, not to {lossless}."
        return reasons  # the safety fields depend on the server's checker: server/safety_policy.py

    @property
    def ignored_parameters(self) -> list[str]:
        """Every parameter sent but not acted on: unknown fields and known ones this server does not honour."""
        return sorted([*self.unknown_parameters, *self.unhonoured_parameters])

    @property
    def ignored_warnings(self) -> list[str]:
        """The ignored parameters, in words, for the response's `warnings`."""
        warnings = list(self.unhonoured_parameters.values())
        if self.unknown_parameters:
            names = ", ".join(repr(name) for name in self.unknown_parameters)
            warnings.append(f"Unknown parameters were ignored: {names[:500]}.")
        return warnings


def _format_of(output_format: str | None) -> str | None:
    """The output format a request gets (png by default), or None if it is not one (a 400 elsewhere)."""
    try:
        return normalize_output_format(output_format or "png")
    except ValueError:
        return None


class ImageGenerationRequest(ImageParameters):
    """`POST /v1/images/generations` (JSON)."""


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    image_url: str = Field(description="A data: URI (data:image/png;base64,...).")


class ImageEditRequest(ImageParameters):
    """`POST /v1/images/edits`. JSON: `images` as [{"image_url": "data:..."}] and `mask` as {"image_url": ...};
    multipart: files in `image` / `image[]` and `mask` (the route turns them into the same model)."""

    images: list[ImageURL | str] | None = Field(None, description="JSON: 1 to 10 images to edit, as data: URIs.")
    mask: ImageURL | str | None = Field(
        None,
        description="PNG with alpha the size of the first image: transparent pixels are repainted, the rest is kept.",
    )


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: Int | None = Field(None, description="The seed this image was generated with (reproduces it alone).")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    """OpenAI's usage (required fields filled with the model's real counts: prompt tokens from its tokenizer, image
    tokens = 16x16-pixel latent patches) plus the product's pricing accounting in megapixels."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int
    output_megapixels: int = Field(description="Per output image, rounded up to whole megapixels; summed.")
    reference_megapixels: int = Field(description="Per reference image (at least 1 each), rounded up; summed.")
    billed_megapixels: int = Field(description="output_megapixels + reference_megapixels.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] | None = None
    output_format: str | None = None
    size: str | None = None
    quality: Literal["low", "medium", "high"] | None = None
    usage: Usage | None = None
    warnings: list[str] | None = Field(None, description="What the server changed about the request, in words.")
    withheld_images: int | None = Field(None, description="Images the safety checker withheld (flagged), if any.")


class LoraCard(BaseModel):
    name: str
    scale: float = Field(description="The scale a request gets when it names the adapter without one.")
    file: str = Field(description="The adapter's file name.")
    fused: bool = Field(description="Fused into the weights at start: always on, at this scale.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    loras: list[LoraCard] = Field(
        default_factory=list, description='The LoRA adapters requests may choose ("loras"); [] for none.'
    )
    safety_checker: str | None = Field(
        None, description="The safety checker screening its images; null: none, unscreened."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
