"""Image codecs: encode delivered images, decode uploaded reference images and masks, and data URIs.

Only Pillow and the standard library are used, so the pipeline package stays free of the HTTP stack.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageMath, ImageOps, PngImagePlugin

from .file_metadata import metadata_save_options
from .png_encoding import can_encode, encode_png
from .sizes import MAX_OUTPUT_PIXELS, cap_pixels

OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp", "gif", "avif")
FILE_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "avif": "avif"}

LOSSY_FORMATS = frozenset({"jpeg", "webp", "avif"})
DEFAULT_QUALITY: dict[str, int] = {"jpeg": 90, "webp": 90, "avif": 80}
PNG_COMPRESS_LEVEL = 1  # zlib level 1: 4x faster than 6 on a 1 MP image (53 vs 217 ms here) for ~18 % more bytes
# (PNG goes through png_encoding: Up-filtered rows deflated in strips on several cores)
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
_FORMAT_ALIASES = {"jpg": "jpeg"}

DEFAULT_MAX_INPUT_PIXELS = 50_000_000
ACCEPTED_INPUTS = "PNG, JPEG, WebP, GIF or AVIF"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_AVIF_BRANDS = (b"avif", b"avis")
_PNG_SAVE_MODES = frozenset({"1", "L", "LA", "I;16", "P", "RGB", "RGBA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)
_BOMB_MESSAGE = "image is too large: its declared size is beyond the safe decoding limit"


class ImageDecodeError(ValueError):
    """An uploaded image could not be used; the message is meant for the API client."""


# --- output formats -------------------------------------------------------------------------------------------


def normalize_output_format(value: str) -> str:
    """Return the canonical output format for `value` ("JPG " -> "jpeg"); ValueError if it is not one we encode."""
    name = str(value).strip().lower()
    name = _FORMAT_ALIASES.get(name, name)
    if name not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)} (or jpg), got {value!r}")
    return name


def resolve_quality(output_format: str, quality: int | None) -> int | None:
    """The encoder quality for `output_format`: None for lossless formats, the default when `quality` is None."""
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100):
        raise ValueError(f"quality must be an integer from 0 to 100, got {quality!r}")
    if output_format not in LOSSY_FORMATS:
        return None
    return DEFAULT_QUALITY[output_format] if quality is None else quality


def encode_image(
    image: Image.Image,
    output_format: str = "png",
    quality: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode `image` as `output_format`; `quality` (0-100) applies to jpeg, webp and avif, PNG and GIF ignore it.
    `metadata`, when given, is embedded in the same save (`file_metadata`: PNG text, EXIF and XMP, GIF comment)."""
    fmt = normalize_output_format(output_format)
    level = resolve_quality(fmt, quality)
    prepared = _prepare_for_encoding(image, fmt)
    if fmt == "png" and can_encode(prepared):  # every image the pipeline makes: deflated on several cores
        info = metadata_save_options(fmt, metadata)["pnginfo"] if metadata is not None else None
        return encode_png(prepared, PNG_COMPRESS_LEVEL, _png_chunks(info))
    options: dict[str, object] = {"quality": level} if level is not None else {}
    if fmt == "png":
        options["compress_level"] = PNG_COMPRESS_LEVEL
    if metadata is not None:
        options.update(metadata_save_options(fmt, metadata))
    buffer = io.BytesIO()
    prepared.save(buffer, format=_PILLOW_FORMATS[fmt], **options)
    return buffer.getvalue()


def _png_chunks(info: PngImagePlugin.PngInfo | None) -> list[tuple[bytes, bytes]]:
    """The (type, data) pairs of a Pillow PngInfo (its `chunks` hold (type, data, after_idat) triples)."""
    return [(entry[0], entry[1]) for entry in info.chunks] if info is not None else []


def _prepare_for_encoding(image: Image.Image, fmt: str) -> Image.Image:
    """Convert `image` to a mode the encoder for `fmt` writes: RGB for lossy formats, adaptive palette for GIF."""
    if fmt == "png":
        if image.mode in _PNG_SAVE_MODES:
            return image
        return image.convert("RGBA") if _has_alpha(image) else to_rgb(image)
    rgb = to_rgb(image)
    if fmt == "gif":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return rgb


# --- decoding -------------------------------------------------------------------------------------------------


def decode_image(
    data: bytes, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS, max_output_pixels: int = MAX_OUTPUT_PIXELS
) -> Image.Image:
    """Decode an uploaded reference image to RGB: EXIF orientation applied, alpha composited over white, and
    downscaled (LANCZOS, aspect kept) to at most `max_output_pixels`. `info["source_size"]` keeps the upright size
    before downscaling. Raises ImageDecodeError for anything that is not a usable PNG, JPEG, WebP, GIF or AVIF."""
    image = _open_upright(data, max_input_pixels)
    source_size = image.size
    rgb = fit_pixels(to_rgb(image), max_output_pixels)
    rgb.info["source_size"] = source_size
    return rgb


def decode_mask(data: bytes, size: tuple[int, int], *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Decode an edit mask to an "L" image where 255 = repaint and 0 = keep (OpenAI semantics: alpha < 128 marks
    the region to repaint). A mask without transparency is read as black/white: luminance >= 128 = repaint. The
    upright mask must measure exactly `size` (the first image's, as uploaded); it is resized once, to the output
    size, when the job is built (`masking.fit_mask`)."""
    image = _open_upright(data, max_input_pixels)
    if image.size != tuple(size):
        raise ImageDecodeError(
            f"mask must have the same size as the first image: the mask is "
            f"{image.size[0]}x{image.size[1]}, the image is {size[0]}x{size[1]}"
        )
    return _repaint_mask(image)


def _repaint_mask(image: Image.Image) -> Image.Image:
    """255 where `image` says repaint: transparent pixels, or white ones when nothing is transparent."""
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        lowest, _ = alpha.getextrema()
        if isinstance(lowest, (int, float)) and lowest < 255:
            return alpha.point(lambda a: 255 if a < 128 else 0)
    return to_rgb(image).convert("L").point(lambda v: 255 if v >= 128 else 0)


def _open_upright(data: bytes, max_input_pixels: int) -> Image.Image:
    """Sniff, size-check, fully load and EXIF-orient `data`; every failure becomes an ImageDecodeError."""
    fmt = sniff_format(data)
    with warnings.catch_warnings():
        # Local only: Pillow's own bomb warning becomes an error here; Image.MAX_IMAGE_PIXELS is left untouched.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open_checked(data, fmt, max_input_pixels)
        _load(image)
    return _exif_upright(image)


def sniff_format(data: bytes) -> str:
    """The Pillow format name of `data` judged by its leading bytes alone; ImageDecodeError if not accepted."""
    if not data:
        raise ImageDecodeError("empty file: the image has no data")
    head = bytes(data[:64])
    fmt = _accepted_format(head)
    if fmt is None:
        other = _refused_format(head)
        suffix = f" ({other} is not supported)" if other else ""
        raise ImageDecodeError(f"not a {ACCEPTED_INPUTS} image{suffix}")
    return fmt


def _accepted_format(head: bytes) -> str | None:
    """PNG, JPEG, WEBP, GIF or AVIF from magic bytes, else None."""
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and _is_avif_ftyp(head):
        return "AVIF"
    return None


def _is_avif_ftyp(head: bytes) -> bool:
    """Whether an ISO-BMFF 'ftyp' box names an AVIF brand (major or compatible)."""
    box_size = int.from_bytes(head[:4], "big")
    brands = head[8 : min(max(box_size, 16), len(head))]
    return any(brands[i : i + 4] in _AVIF_BRANDS for i in range(0, len(brands) - 3, 4))


def _refused_format(head: bytes) -> str | None:
    """A readable name for a few common formats we refuse, for clearer errors."""
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return "HEIC/HEIF"
    if head.startswith(b"%PDF"):
        return "PDF"
    return None


def _open_checked(data: bytes, fmt: str, max_input_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images whose declared size exceeds `max_input_pixels`."""
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(_BOMB_MESSAGE) from exc
    except Exception as exc:  # Pillow raises many types for a broken header
        raise ImageDecodeError("corrupt or truncated image") from exc
    width, height = image.size
    if width * height > max_input_pixels:
        raise ImageDecodeError(
            f"image is too large: {width}x{height} pixels is more than the limit of {max_input_pixels} pixels"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt or truncated image")
    return image


def _load(image: Image.Image) -> None:
    """Decode the pixels of the first frame now, so broken data fails here."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(_BOMB_MESSAGE) from exc
    except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise ImageDecodeError("corrupt or truncated image") from exc


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block is ignored rather than refusing the image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: keep the pixels as stored
        return image


# --- modes and sizes ------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16-bit scaled to 8-bit, transparency composited over white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (0..65535) to "L" (0..255), keeping brightness instead of clipping to white; "LA" when a
    transparent grey value (PNG tRNS) is set."""
    wide = image.convert("I")
    grey = wide.point(lambda v: v * (1 / 257)).convert("L")
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        grey.info.pop("transparency", None)
        return grey
    alpha = ImageMath.lambda_eval(lambda args: (args["v"] != transparent) * 255, v=wide).convert("L")
    grey.info.pop("transparency", None)
    grey.putalpha(alpha)
    return grey


def _has_alpha(image: Image.Image) -> bool:
    """Whether `image` carries transparency: an alpha band or a tRNS/transparency entry."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` downscaled with LANCZOS to at most `max_pixels` pixels, or unchanged if it already fits."""
    target = cap_pixels(*image.size, max_pixels)
    return image if target == image.size else image.resize(target, Image.Resampling.LANCZOS)
