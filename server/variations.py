"""`POST /v1/images/variations`, OpenAI's variations endpoint: a multipart form with one `image` file and `n`,
`size`, `response_format`, `model`, `user` (and any parameter the edit endpoint takes, `seed` included). A
variation is an edit of that image with a neutral prompt (`VARIATION_PROMPT`) and a new random seed per image
(image i uses seed + i when `seed` is given): the same inputs, service and job as `/v1/images/edits`."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import Request

from .errors import APIError, invalid_param, validation_error
from .inputs import EditInputs, read_form_parts
from .protocol import ImageEditRequest

VARIATION_PROMPT = "A variation of this image: the same subject, composition and style."
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_variation_request(request: Request, max_image_bytes: int) -> EditInputs:
    """The form as the edit inputs of one image under the neutral prompt; errors name the parameter."""
    if not request.headers.get("content-type", "").lower().startswith(_FORM_TYPES):
        raise APIError(
            400,
            "Send multipart/form-data with the image as a file in 'image' (as the OpenAI SDKs do).",
            param="image",
            code="invalid_content_type",
        )
    fields, images, mask = await read_form_parts(request, max_image_bytes)
    if "prompt" in fields:
        raise invalid_param(
            "Variations take no prompt (they use a neutral one); to change an image by a prompt, use /v1/images/edits.",
            "prompt",
            code="unsupported_parameter",
        )
    if mask is not None:
        raise invalid_param("Variations take no mask; use /v1/images/edits.", "mask", code="unsupported_parameter")
    if not images:
        raise APIError(
            400,
            "Missing required parameter: 'image' (the image to make variations of).",
            param="image",
            code="missing_required_parameter",
        )
    if len(images) > 1:
        raise invalid_param(
            f"Variations are made of one image, got {len(images)}; to combine images, use /v1/images/edits.",
            "image",
            code="too_many_images",
        )
    try:
        params = ImageEditRequest.model_validate({**fields, "prompt": VARIATION_PROMPT})
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    return EditInputs(params, images, None, "image")
