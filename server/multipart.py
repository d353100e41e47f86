"""Edit requests as the OpenAI SDKs send them: multipart/form-data with files in `image` (one) or `image[]`
(several), an optional `mask` file, and every other parameter as a text field ("true", "2", "1.5"), turned into
the same `ImageEditRequest` a JSON body gives."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .errors import APIError, invalid_param, validation_error
from .protocol import ImageEditRequest

IMAGE_FIELDS = ("image", "image[]", "images", "images[]")
MASK_FIELDS = ("mask", "mask[]")
_MAX_FILES = 64  # well above 10 images + 1 mask, so that 11 images get our own clear error


async def read_edit_form(request: Request, max_image_bytes: int) -> tuple[ImageEditRequest, list[bytes],
                                                                         bytes | None]:
    try:
        form = await request.form(max_files=_MAX_FILES)
    except Exception as exc:  # starlette raises its own errors (and ours: bad boundaries, too many parts)
        raise APIError(400, f"The multipart form could not be read: {exc}", code="invalid_multipart") from exc
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    try:
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise invalid_param(f"'{key}' must be an uploaded image file.", "image", code="invalid_image")
                images.append(await _read_capped(value, max_image_bytes, "image"))
            elif key in MASK_FIELDS:
                if not isinstance(value, UploadFile):
                    raise invalid_param("'mask' must be an uploaded PNG file.", "mask", code="invalid_mask")
                if mask is not None:
                    raise invalid_param("'mask' was sent more than once.", "mask", code="duplicate_parameter")
                mask = await _read_capped(value, max_image_bytes, "mask")
            elif isinstance(value, UploadFile):
                raise invalid_param(f"'{key}' must be a text field, not a file.", key)
            elif key in fields:
                raise invalid_param(f"'{key}' was sent more than once.", key, code="duplicate_parameter")
            else:
                fields[key] = value
    finally:
        await form.close()
    try:
        params = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    return params, images, mask


async def _read_capped(upload: UploadFile, max_bytes: int, param: str) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, f"An uploaded file is larger than {max_bytes // (1024 * 1024)} MB.", param=param,
                       code="file_too_large")
    return data
