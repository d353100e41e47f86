"""OpenAI image API shapes (pydantic): what clients send and what we answer. No logic beyond field validation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_IMAGES_PER_REQUEST = 10
MAX_SEED = 2**63 - 1


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`. Unknown fields are accepted and ignored (the seed passes them through)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(description="Text prompt for image generation.")
    model: str | None = Field(None, description="A model id or alias from /v1/models; omitted: the default model.")
    n: int | None = Field(None, ge=1, le=MAX_IMAGES_PER_REQUEST, description="Number of images, 1-10.")
    size: str | None = Field(None, description='"WxH" in pixels (1-14142 per side) or "auto".')
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; image i uses seed+i.")
    response_format: Literal["url", "b64_json"] | None = Field(None, description='"url" (default) or "b64_json".')
    output_format: Literal["png"] | None = Field(None, description="Encoded image format.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (default: the model's).")
    guidance_scale: float | None = Field(None, ge=0, description="Guidance scale (default: the model's).")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(None, description="The seed this image was generated with (reproduces it alone).")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


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
