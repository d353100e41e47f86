"""Image codecs: encode delivered images to bytes in the requested format."""

from __future__ import annotations

import io

from PIL import Image

MEDIA_TYPES = {"png": "image/png"}
OUTPUT_FORMATS = tuple(MEDIA_TYPES)


def encode_image(image: Image.Image, output_format: str = "png") -> bytes:
    if output_format not in MEDIA_TYPES:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
