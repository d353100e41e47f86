"""The parameters an image was made with, carried inside the file in its format's standard metadata, and read back.

One record (a JSON object) is written under the key `flux2-local`, so that it round-trips exactly, next to
human-readable fields that image viewers show:

- PNG: iTXt chunks `flux2-local` (the JSON), `parameters` (one readable summary), `Description` (the prompt),
  a tEXt `Software`, and an XMP packet (iTXt `XML:com.adobe.xmp`).
- JPEG, WebP, AVIF: EXIF (`UserComment` = the JSON, `ImageDescription` = the prompt in ASCII, `Software`) and an
  XMP packet (`dc:description` = the prompt, `xmp:CreatorTool`, `flux2:parameters` = the JSON).
- GIF: its comment extension holds the JSON.

The JSON is ASCII (non-ASCII characters escaped), so it survives EXIF's ASCII fields and any prompt. JPEG caps
each metadata segment at 64 KB: a prompt too long for it is left out of a JPEG's metadata (`prompt_omitted`
says so; its SHA-256 stays). Metadata is passed to the one `save` call that encodes the image: no second pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape, unescape

from PIL import Image, PngImagePlugin

METADATA_KEY = "flux2-local"  # the PNG text key of the JSON record, and its name in the docs
SCHEMA = "flux2-local/1"  # the record's "schema" field: what a reader checks before trusting the rest
XMP_NAMESPACE = "urn:flux2-local:xmp:1/"
XMP_KEY = "XML:com.adobe.xmp"  # the PNG iTXt keyword XMP readers look for
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_IMAGE_DESCRIPTION = 0x010E
_SOFTWARE = 0x0131
_ASCII_CHARSET = b"ASCII\x00\x00\x00"  # EXIF UserComment's 8-byte character-code prefix
_JPEG_SEGMENT_LIMIT = 65_000  # bytes: a JPEG APP1 segment holds at most 65,533 (Pillow refuses more)
_DESCRIPTION_CHARS = 2_000  # EXIF ImageDescription is a convenience copy: the JSON holds the whole prompt
_XMP_PARAMETERS = re.compile(rb"<flux2:parameters>(.*?)</flux2:parameters>", re.S)
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Control characters but tab and line breaks: PNG's text chunks may not hold NUL (and should hold no other control
# character), and a NUL ends EXIF's ASCII fields early for C readers. The readable copies leave them out; the JSON
# record keeps the prompt exactly (escaped).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class MissingMetadata(ValueError):
    """The file carries no flux2-local record (or not one this version reads); the message says why."""


def metadata_save_options(output_format: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments for `Image.save` that embed `record` in an `output_format` file ("png", "jpeg",
    "webp", "avif" or "gif")."""
    full = {"schema": SCHEMA, **record}
    if output_format == "png":
        return {"pnginfo": _png_info(full)}
    if output_format == "gif":
        return {"comment": canonical_json(full).encode("ascii")}
    options = {"exif": _exif(full), "xmp": _xmp(full)}
    if output_format == "jpeg" and max(len(options["exif"]), len(options["xmp"])) > _JPEG_SEGMENT_LIMIT:
        short = _without_prompt(full)
        options = {"exif": _exif(short), "xmp": _xmp(short)}
    return options


def canonical_json(record: Mapping[str, Any]) -> str:
    """The record as compact ASCII JSON with sorted keys: the same parameters always give the same bytes."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def summary(record: Mapping[str, Any]) -> str:
    """A readable one-paragraph account of the record: the prompt, then `Name: value` pairs."""
    names = {
        "steps": "Steps",
        "guidance_scale": "Guidance",
        "seed": "Seed",
        "size": "Size",
        "model": "Model",
        "mode": "Mode",
        "output_format": "Format",
        "version": "flux2-local",
    }
    pairs = ", ".join(f"{label}: {record[key]}" for key, label in names.items() if record.get(key) is not None)
    return f"{_text(str(record.get('prompt', '')))}\n{pairs}"


def read_metadata(data: bytes) -> dict[str, Any]:
    """The record embedded in an image file's bytes; MissingMetadata when there is none."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for what is not an image
        raise MissingMetadata("not an image file (PNG, JPEG, WebP, GIF or AVIF)") from exc
    with image:
        blob = _embedded_json(image)
    if blob is None:
        raise MissingMetadata(f"this {image.format} file carries no flux2-local metadata")
    try:
        record = json.loads(blob)
    except ValueError as exc:
        raise MissingMetadata("the flux2-local metadata in this file is not valid JSON") from exc
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else None
        raise MissingMetadata(f"the file's metadata is not a {SCHEMA} record (schema {found!r})")
    return record


def _embedded_json(image: Image.Image) -> str | bytes | None:
    """The JSON record from wherever `image`'s format keeps it: PNG text, GIF comment, EXIF UserComment, XMP."""
    for key in (METADATA_KEY, "comment"):
        value = image.info.get(key)
        if isinstance(value, (str, bytes)) and value.lstrip()[:1] in ("{", b"{"):
            return value
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(_ASCII_CHARSET):
        return comment[len(_ASCII_CHARSET) :]
    xmp = image.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    found = _XMP_PARAMETERS.search(xmp) if isinstance(xmp, bytes) else None
    return unescape(found.group(1).decode("ascii", "replace")) if found else None


def _png_info(record: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, canonical_json(record))
    info.add_itxt("parameters", summary(record))
    info.add_itxt("Description", _text(str(record.get("prompt", ""))))
    info.add_text("Software", _software(record))
    info.add_itxt(XMP_KEY, _xmp(record).decode("utf-8"))
    return info


def _exif(record: Mapping[str, Any]) -> bytes:
    exif = Image.Exif()
    exif[_SOFTWARE] = _software(record)
    exif[_IMAGE_DESCRIPTION] = _ascii(str(record.get("prompt", "")))[:_DESCRIPTION_CHARS]
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII_CHARSET + canonical_json(record).encode("ascii")
    return exif.tobytes()


def _xmp(record: Mapping[str, Any]) -> bytes:
    """An XMP packet (RDF/XML): the prompt as dc:description, the tool, and the JSON record."""
    prompt = escape(_XML_INVALID.sub("", _text(str(record.get("prompt", "")))))
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:flux2="{XMP_NAMESPACE}">'
        f"<xmp:CreatorTool>{escape(_software(record))}</xmp:CreatorTool>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{prompt}</rdf:li></rdf:Alt></dc:description>'
        f"<flux2:parameters>{escape(canonical_json(record))}</flux2:parameters>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    )
    return packet.encode("utf-8")


def _without_prompt(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its prompts (too long for the format), saying so and keeping the prompt's hash."""
    prompt = str(record.get("prompt", ""))
    short = {key: value for key, value in record.items() if key not in ("prompt", "revised_prompt")}
    short["prompt_omitted"] = "too long for this format's metadata"
    short["prompt_sha256"] = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
    return short


def _software(record: Mapping[str, Any]) -> str:
    return _ascii(f"flux2-local {record.get('version', '')}".strip())


def _text(value: str) -> str:
    """`value` for a readable field: encodable as UTF-8 (a lone surrogate from a JSON request becomes '?'), without
    control characters but tab and line breaks."""
    return _CONTROL.sub("", value).encode("utf-8", "replace").decode("utf-8")


def _ascii(value: str) -> str:
    return _CONTROL.sub("", value).encode("ascii", "replace").decode("ascii")
