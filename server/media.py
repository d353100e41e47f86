"""HTTP's names for our image files: media types, and base64 data URIs (inline images in JSON edits, `sync_mode`
answers)."""

from __future__ import annotations

import base64
import binascii

from pipeline.codecs import FILE_EXTENSIONS, ImageDecodeError, normalize_output_format

MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}
_EXTENSION_MEDIA_TYPES = {**{ext: MEDIA_TYPES[fmt] for fmt, ext in FILE_EXTENSIONS.items()}, **MEDIA_TYPES}


def media_type_for_extension(extension: str) -> str | None:
    """The media type of a stored file's extension ("jpg", ".PNG", ...), or None if it is not one of ours."""
    return _EXTENSION_MEDIA_TYPES.get(extension.strip().lower().lstrip("."))


def data_uri(data: bytes, output_format: str) -> str:
    """A base64 data URI for encoded image bytes, e.g. "data:image/png;base64,iVBOR..."."""
    media_type = MEDIA_TYPES[normalize_output_format(output_format)]
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def parse_data_uri(uri: str) -> bytes:
    """The bytes of a "data:[image/*];base64,<payload>" URI; whitespace in the payload and missing padding are fine."""
    if not isinstance(uri, str) or not uri[:5].lower() == "data:" or "," not in uri:
        raise ImageDecodeError("image must be a base64 data URI (data:image/png;base64,...)")
    header, payload = uri[5:].split(",", 1)
    params = [part.strip().lower() for part in header.split(";")]
    if params[-1] != "base64":
        raise ImageDecodeError("image data URI must be base64-encoded (data:image/png;base64,...)")
    media_type = params[0] if len(params) > 1 else ""
    if media_type and not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise ImageDecodeError(f"image data URI has media type {media_type!r}, expected an image type")
    return _b64decode(payload)


def _b64decode(payload: str) -> bytes:
    """Decode standard base64, ignoring whitespace and tolerating missing '=' padding."""
    compact = "".join(payload.split())
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError("image data URI has invalid base64 data") from exc
