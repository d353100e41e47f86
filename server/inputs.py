"""An edit request's inputs, however they came: multipart/form-data as the OpenAI SDKs send it (files in `image`
or `image[]`, an optional `mask`, every other parameter a text field) or JSON (`images` and `mask` as data URIs,
or http(s) URLs when the operator allows them), turned into one validated `EditInputs`: the parameters, 1 to 10
images and the mask, each within its byte cap; then decoded into pipeline images."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from pipeline.codecs import ImageDecodeError, decode_image, decode_mask

from .errors import APIError, invalid_param, validation_error
from .media import parse_data_uri
from .protocol import MAX_REFERENCE_IMAGES, ImageEditRequest
from .remote_images import RemoteImageError, RemoteImageFetcher

IMAGE_FIELDS = ("image", "image[]", "images", "images[]")
MASK_FIELDS = ("mask", "mask[]")
_MAX_FILES = 64  # well above 10 images + 1 mask, so that 11 images get our own clear error
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class EditInputs:
    params: ImageEditRequest
    images: list[bytes]  # 1 to 10 encoded images, each within the byte cap
    mask: bytes | None
    image_param: str  # how the client named the images ("image" in forms, "images" in JSON), for errors
    json_params: tuple[str, ...] = ()  # a JSON edit's images as errors name each (`images[1].image_url`), and mask
    mask_param: str = "mask"

    def param_of(self, index: int) -> str:
        """How an error names image `index`: as its JSON path, or as the form field all of them came in."""
        return self.json_params[index] if self.json_params else self.image_param


async def read_edit_request(request: Request, max_image_bytes: int, fetcher: RemoteImageFetcher | None) -> EditInputs:
    if request.headers.get("content-type", "").lower().startswith(_FORM_TYPES):
        params, images, mask = await _read_form(request, max_image_bytes)
        image_param, json_params, mask_param = "image", (), "mask"
    else:
        params = await _read_json(request)
        listed = params.images or []
        json_params = tuple(_json_param("images", item, index) for index, item in enumerate(listed))
        images = [
            await _image_bytes(item, param, max_image_bytes, fetcher, _which(index, len(listed)))
            for index, (item, param) in enumerate(zip(listed, json_params, strict=True))
        ]
        mask_param = _json_param("mask", params.mask)
        mask = (
            await _image_bytes(params.mask, mask_param, max_image_bytes, fetcher) if params.mask is not None else None
        )
        image_param = "images"
    if not images:
        how = "" if image_param == "image" else ', in JSON as "images": [{"image_url": "data:image/png;base64,..."}]'
        raise APIError(
            400,
            f"Missing required parameter: '{image_param}' (1 to 10 images to edit{how}).",
            param=image_param,
            code="missing_required_parameter",
        )
    if len(images) > MAX_REFERENCE_IMAGES:
        raise invalid_param(
            f"At most {MAX_REFERENCE_IMAGES} images can be edited at once, got {len(images)}.",
            image_param,
            code="too_many_images",
        )
    return EditInputs(params, images, mask, image_param, json_params, mask_param)


async def decode_edit_images(
    inputs: EditInputs, max_input_pixels: int
) -> tuple[tuple[Image.Image, ...], Image.Image | None]:
    """The references (RGB, EXIF applied, <= 4 MP) and the mask (255 = repaint, as uploaded: the first image's
    upright size), decoded off the event loop."""
    return await asyncio.to_thread(_decode, inputs, max_input_pixels)


def _decode(inputs: EditInputs, max_input_pixels: int) -> tuple[tuple[Image.Image, ...], Image.Image | None]:
    """Several references decode on as many threads (Pillow releases the GIL while it decodes; the inputs stage of
    a 4-reference edit was 108 ms on the H100 machine; four 1024² PNGs here, on 2 cores, 37 ms -> 33 ms); an
    error names the first bad image in the upload's order."""

    def one(data: bytes) -> Image.Image | ImageDecodeError:
        try:
            return decode_image(data, max_input_pixels=max_input_pixels)
        except ImageDecodeError as exc:
            return exc

    count = len(inputs.images)
    if count > 1:
        with ThreadPoolExecutor(max_workers=min(count, 8), thread_name_prefix="decode") as pool:
            decoded = list(pool.map(one, inputs.images))
    else:
        decoded = [one(data) for data in inputs.images]
    references = []
    for index, image in enumerate(decoded):
        if isinstance(image, ImageDecodeError):
            which = _which(index, count) or "The image: "
            raise invalid_param(f"{which}{image}", inputs.param_of(index), code="invalid_image") from image
        references.append(image)
    if inputs.mask is None:
        return tuple(references), None
    first = references[0]
    try:
        mask = decode_mask(inputs.mask, first.info.get("source_size", first.size), max_input_pixels=max_input_pixels)
    except ImageDecodeError as exc:
        raise invalid_param(f"The mask: {exc}", inputs.mask_param, code="invalid_mask") from exc
    return tuple(references), mask


def file_too_large(max_bytes: int, param: str, what: str = "An uploaded file") -> APIError:
    return APIError(413, f"{what} is larger than {max_bytes // (1024 * 1024)} MB.", param=param, code="file_too_large")


async def _read_form(request: Request, max_image_bytes: int) -> tuple[ImageEditRequest, list[bytes], bytes | None]:
    fields, images, mask = await read_form_parts(request, max_image_bytes)
    try:
        params = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    return params, images, mask


async def read_form_parts(request: Request, max_image_bytes: int) -> tuple[dict[str, str], list[bytes], bytes | None]:
    """A multipart (or url-encoded) form's text fields, image files and mask file, each file within its cap."""
    try:
        form = await request.form(max_files=_MAX_FILES)
    except Exception as exc:  # starlette raises its own errors (and ours: bad boundaries, too many parts)
        reason = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)  # not starlette's "400: " prefix
        raise APIError(400, f"The multipart form could not be read: {reason}", code="invalid_multipart") from exc
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    try:
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise invalid_param(
                        f"'{key}' must be an uploaded image file.", key.removesuffix("[]"), code="invalid_image"
                    )
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
    return fields, images, mask


async def _read_capped(upload: UploadFile, max_bytes: int, param: str) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise file_too_large(max_bytes, param)
    return data


async def _read_json(request: Request) -> ImageEditRequest:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, or nested past Python's recursion limit
        raise APIError(
            400, "The request body is not valid JSON (or send multipart/form-data).", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return ImageEditRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def _json_param(field: str, item: object, index: int | None = None) -> str:
    """A JSON edit's image or mask as OpenAI names it in errors: `images[1].image_url`, `mask.image_url` (`images[1]`,
    `mask` for a bare string)."""
    path = field if index is None else f"{field}[{index}]"
    return path if isinstance(item, str) else f"{path}.image_url"


def _which(index: int, count: int) -> str:
    """How an error names image `index` among `count`: "Image 2 of 3: ", or nothing when it is the only one."""
    return f"Image {index + 1} of {count}: " if count > 1 else ""


async def _image_bytes(
    item: object, param: str, max_bytes: int, fetcher: RemoteImageFetcher | None, which: str = ""
) -> bytes:
    """One JSON edit image's bytes (a data: URI, or an http(s) URL the operator allows); errors name `param` and,
    among several images, `which` one."""
    url = item if isinstance(item, str) else item.image_url  # type: ignore[attr-defined]
    if url.lower().startswith(("http://", "https://")):
        if fetcher is None:
            raise invalid_param(
                f"{which}Remote image URLs are not fetched: this server works offline (an operator can "
                "allow it with --allow-remote-images). Send the image inline as a data: URI "
                "(data:image/png;base64,...) or upload it as multipart/form-data.",
                param,
                code="remote_images_disabled",
            )
        try:
            return await fetcher.fetch(url)
        except RemoteImageError as exc:
            raise invalid_param(
                f"{which}The image URL was not fetched: {exc}.", param, code="remote_image_refused"
            ) from exc
    if len(url) * 3 // 4 > max_bytes + 4:
        raise file_too_large(max_bytes, param, f"{which}An inline image")
    try:
        return parse_data_uri(url)
    except ImageDecodeError as exc:
        raise invalid_param(f"{which}{exc}", param, code="invalid_image") from exc
