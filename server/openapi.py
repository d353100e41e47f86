"""What the published OpenAPI document says beyond what FastAPI derives: the errors each image endpoint answers,
the event stream's frames, the edit endpoint's two bodies (multipart and JSON), the variations form, and no
FastAPI 422s."""

from __future__ import annotations

from fastapi import FastAPI

from .protocol import ErrorResponse, ImageEditRequest, ImageParameters

IMAGE_RESPONSES: dict = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid parameter (named in error.param)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Request body or image file too large",
        429: "Queue full (see Retry-After)",
        500: "Server error",
        503: "Model not ready, out of memory, or shutting down",
        504: "Request timeout",
        507: "The generated image could not be stored",
    }.items()
}
_STREAM_EVENT = {  # one Server-Sent Event, as OpenAI frames them; `data` holds the event's JSON
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": [
                "image_generation.partial_image",
                "image_generation.completed",
                "image_edit.partial_image",
                "image_edit.completed",
                "error",
            ],
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"type": "string"},
                    "b64_json": {"type": "string"},
                    "created_at": {"type": "integer"},
                    "partial_image_index": {"type": "integer"},
                    "size": {"type": "string"},
                    "output_format": {"type": "string"},
                    "quality": {"type": "string"},
                    "background": {"type": "string"},
                    "usage": {"type": "object"},
                },
            },
        },
    },
}
IMAGE_RESPONSES[200] = {
    "description": "The images (JSON), or with stream=true Server-Sent Events: "
    "image_generation.partial_image / image_generation.completed (edits: image_edit.*), "
    "`: progress N/M` comments, and an `error` event if the job fails once started",
    "content": {"text/event-stream": {"schema": _STREAM_EVENT}},
}


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


EDIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["prompt", "image"],
                    "properties": {
                        "image": {
                            "oneOf": [
                                {"type": "string", "format": "binary"},
                                {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": 10},
                            ],
                            "description": "One file as `image`, several as `image[]` (up to 10): PNG, JPEG, "
                            "WebP, GIF or AVIF.",
                        },
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG with alpha, the first image's size: transparent = repaint.",
                        },
                        **{name: {"type": "string"} for name in ImageParameters.model_fields if name != "prompt"},
                        "prompt": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": inline_schema(ImageEditRequest)},
        },
    },
}


VARIATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image to vary: PNG, JPEG, WebP, GIF or AVIF.",
                        },
                        **{name: {"type": "string"} for name in ImageParameters.model_fields if name != "prompt"},
                    },
                }
            },
        },
    },
}


def document_errors_as_served(app: FastAPI) -> None:
    """FastAPI documents a 422 with its own error shape for every validated body; this server answers 400 with
    OpenAI's envelope instead (and lists it), so the published schema drops the 422s."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
