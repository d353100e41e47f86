"""The response schemas of OpenAI's published OpenAPI spec (repository openai/openai-openapi, `openapi.yaml`,
components.schemas, read at commit f85dbe2 of 2026-08-21), transcribed as JSON Schema with descriptions left out.

Where flux2-local deliberately serves more than OpenAI's enums allow, the widening is marked `# extended`:
`size` (any WxH, not three sizes) and `output_format` (gif and avif besides png, webp, jpeg)."""

IMAGE = {
    "type": "object",
    "properties": {
        "b64_json": {"type": "string"},
        "url": {"type": "string", "format": "uri"},
        "revised_prompt": {"type": "string"},
    },
}

IMAGE_GEN_USAGE = {
    "type": "object",
    "required": ["input_tokens", "total_tokens", "output_tokens", "input_tokens_details"],
    "properties": {
        "input_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "output_tokens": {"type": "integer"},
        "output_tokens_details": {
            "type": "object",
            "required": ["image_tokens", "text_tokens"],
            "properties": {"image_tokens": {"type": "integer"}, "text_tokens": {"type": "integer"}},
        },
        "input_tokens_details": {
            "type": "object",
            "required": ["text_tokens", "image_tokens"],
            "properties": {"text_tokens": {"type": "integer"}, "image_tokens": {"type": "integer"}},
        },
    },
}

IMAGES_RESPONSE = {
    "type": "object",
    "required": ["created"],
    "properties": {
        "created": {"type": "integer"},
        "data": {"type": "array", "items": IMAGE},
        "background": {"type": "string", "enum": ["transparent", "opaque"]},
        "output_format": {"type": "string", "enum": ["png", "webp", "jpeg", "gif", "avif"]},  # extended
        "size": {"type": "string", "pattern": r"^[0-9]+x[0-9]+$"},  # extended
        "quality": {"type": "string", "enum": ["low", "medium", "high"]},
        "usage": IMAGE_GEN_USAGE,
    },
}

ERROR_RESPONSE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message", "param", "code"],
            "properties": {
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "message": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "type": {"type": "string"},
            },
        },
    },
}

MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "created": {"type": "integer"},
        "object": {"type": "string", "enum": ["model"]},
        "owned_by": {"type": "string"},
        "shutdown_date": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
    },
}

LIST_MODELS_RESPONSE = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": MODEL}},
}
