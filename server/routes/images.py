import json
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from pipeline.codecs import ImageDecodeError, parse_data_uri

from ..errors import APIError, invalid_param, validation_error
from ..multipart import read_edit_form
from ..protocol import ErrorResponse, ImageEditRequest, ImageGenerationRequest, ImageParameters, ImagesResponse
from ..remote_images import RemoteImageError, RemoteImageFetcher
from ..streaming import EventStream
from ..urls import public_base_url

router = APIRouter(prefix="/v1/images")

IGNORED_HEADER = "x-flux2-ignored-params"
_ERRORS: dict = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "Invalid parameter (named in error.param)", 401: "Missing or wrong API key", 404: "Unknown model",
    413: "Request body or image file too large", 429: "Queue full (see Retry-After)", 500: "Server error",
    503: "Model not ready, out of memory, or shutting down", 504: "Request timeout",
    507: "The generated image could not be stored"}.items()}
_STREAM_EVENT = {  # one Server-Sent Event, as OpenAI frames them; `data` holds the event's JSON
    "type": "object", "required": ["data"],
    "properties": {
        "event": {"type": "string", "enum": ["image_generation.partial_image", "image_generation.completed",
                                             "image_edit.partial_image", "image_edit.completed", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"type": "string"}, "b64_json": {"type": "string"},
                           "created_at": {"type": "integer"}, "partial_image_index": {"type": "integer"},
                           "size": {"type": "string"}, "output_format": {"type": "string"},
                           "quality": {"type": "string"}, "background": {"type": "string"},
                           "usage": {"type": "object"}}}},
    },
}
_ERRORS[200] = {"description": "The images (JSON), or with stream=true Server-Sent Events: "
                               "image_generation.partial_image / image_generation.completed (edits: image_edit.*), "
                               "`: progress N/M` comments, and an `error` event if the job fails once started",
                "content": {"text/event-stream": {"schema": _STREAM_EVENT}}}
def inline_schema(model) -> dict:
    """A pydantic model's JSON schema with its `$defs` substituted in place, to embed in the OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


_EDIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["prompt", "image"],
                "properties": {
                    "image": {"oneOf": [{"type": "string", "format": "binary"},
                                        {"type": "array", "items": {"type": "string", "format": "binary"},
                                         "maxItems": 10}],
                              "description": "One file as `image`, several as `image[]` (up to 10): PNG, JPEG, "
                                             "WebP, GIF or AVIF."},
                    "mask": {"type": "string", "format": "binary",
                             "description": "PNG with alpha, the first image's size: transparent = repaint."},
                    **{name: {"type": "string"} for name in ImageParameters.model_fields if name != "prompt"},
                    "prompt": {"type": "string"},
                },
            }},
            "application/json": {"schema": inline_schema(ImageEditRequest)},
        },
    },
}


def _note_ignored(response: Response, params: ImageParameters) -> None:
    """Name the ignored parameters in a header: percent-encoded (header values are latin-1; names are anything a
    client sent), at most 1,000 characters."""
    if params.ignored_parameters:
        names = ", ".join(quote(name, safe="") for name in params.ignored_parameters)
        response.headers[IGNORED_HEADER] = names if len(names) <= 1000 else names[:997] + "..."


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True, responses=_ERRORS,
             summary="Create images from a prompt")
async def create_images(body: ImageGenerationRequest, request: Request, response: Response):
    service = request.app.state.service
    _note_ignored(response, body)
    result = await service.generate(body, public_base_url(request, service.settings), request.is_disconnected,
                                    headers=response.headers)
    return _answer(result, response)


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True, responses=_ERRORS,
             openapi_extra=_EDIT_BODY, summary="Edit or combine up to 10 images from a prompt (optional mask)")
async def edit_images(request: Request, response: Response):
    service = request.app.state.service
    if request.headers.get("content-type", "").lower().startswith(("multipart/form-data",
                                                                     "application/x-www-form-urlencoded")):
        params, images, mask = await read_edit_form(request, service.settings.max_image_bytes)
        image_param = "image"
    else:
        params = await _json_edit(request)
        cap = service.settings.max_image_bytes
        fetcher = request.app.state.remote_fetcher
        images = [await _image_bytes(item, "images", cap, fetcher) for item in params.images or []]
        mask = await _image_bytes(params.mask, "mask", cap, fetcher) if params.mask is not None else None
        image_param = "images"
    _note_ignored(response, params)
    result = await service.edit(params, images, mask, public_base_url(request, service.settings), image_param,
                                request.is_disconnected, headers=response.headers)
    return _answer(result, response)


def _answer(result: ImagesResponse | EventStream, response: Response):
    """A JSON ImagesResponse, or (stream=true) Server-Sent Events, carrying the headers set on `response`."""
    if isinstance(result, EventStream):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **dict(response.headers)}
        headers.pop("content-length", None)
        return StreamingResponse(result.chunks(), media_type="text/event-stream", headers=headers)
    return result


async def _json_edit(request: Request) -> ImageEditRequest:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, or nested past Python's recursion limit
        raise APIError(400, "The request body is not valid JSON (or send multipart/form-data).",
                       code="invalid_json") from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return ImageEditRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


async def _image_bytes(item, param: str, max_bytes: int, fetcher: RemoteImageFetcher | None) -> bytes:
    url = item if isinstance(item, str) else item.image_url
    if url.lower().startswith(("http://", "https://")):
        if fetcher is None:
            raise invalid_param("Remote image URLs are not fetched: this server works offline (an operator can "
                                "allow it with --allow-remote-images). Send the image inline as a data: URI "
                                "(data:image/png;base64,...) or upload it as multipart/form-data.", param,
                                code="remote_images_disabled")
        try:
            return await fetcher.fetch(url)
        except RemoteImageError as exc:
            raise invalid_param(f"The image URL was not fetched: {exc}.", param, code="remote_image_refused") from exc
    if len(url) * 3 // 4 > max_bytes + 4:
        raise APIError(413, f"An inline image is larger than {max_bytes // (1024 * 1024)} MB.", param=param,
                       code="file_too_large")
    try:
        return parse_data_uri(url)
    except ImageDecodeError as exc:
        raise invalid_param(f"{exc}", param, code="invalid_image") from exc
