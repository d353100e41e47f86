"""pipeline.codecs: output encoders, upload decoding (formats, modes, EXIF, bombs, downscale), masks, data URIs."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.codecs import (
    DEFAULT_QUALITY,
    FILE_EXTENSIONS,
    OUTPUT_FORMATS,
    ImageDecodeError,
    decode_image,
    decode_mask,
    encode_image,
    normalize_output_format,
    to_rgb,
)
from pipeline.sizes import cap_pixels
from server.media import MEDIA_TYPES, data_uri, media_type_for_extension, parse_data_uri


def fit_size(size, limit):
    """The pixel cap applied to an input image's size (one rule for inputs and outputs: sizes.cap_pixels)."""
    return cap_pixels(*size, limit)


PILLOW_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
LOSSY = ["jpeg", "webp", "avif"]
ODD_SIZES = [(37, 23), (23, 37), (1, 1), (64, 48)]
RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# --- helpers --------------------------------------------------------------------------------------------------


def noisy(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: hard to compress, so quality shows in the byte count."""
    bands = len(mode) if mode in ("RGB", "RGBA", "LA") else 1
    shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(array, mode if mode != "1" else "L").convert(mode)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def open_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgb_at(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)[xy[1], xy[0]]


def close(actual, expected, tolerance: int) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, dtype=np.int16) - np.asarray(expected, dtype=np.int16)) <= tolerance))


def png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (and CRC) is patched to claim `width` x `height`: a cheap decompression bomb."""
    data = bytearray(save(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def with_exif_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return save(image, fmt, exif=exif, **options)


def two_frames(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 12), RED), Image.new("RGB", (16, 12), BLUE)]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def half_transparent_rgba(size: tuple[int, int] = (20, 10)) -> Image.Image:
    """Left half fully transparent (black underneath), right half opaque red."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((*RED, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def test_codecs_import_without_the_http_stack_or_torch():
    code = (
        "import sys\n"
        "for name in ('fastapi', 'starlette', 'uvicorn', 'torch', 'numpy'): sys.modules[name] = None\n"
        "import pipeline.codecs\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- output formats -------------------------------------------------------------------------------------------


def test_media_types_and_extensions_cover_every_output_format():
    assert MEDIA_TYPES == {
        "png": "image/png",
        "jpeg": "image/jpeg",
        "webp": "image/webp",
        "gif": "image/gif",
        "avif": "image/avif",
    }
    assert OUTPUT_FORMATS == ("png", "jpeg", "webp", "gif", "avif")
    assert FILE_EXTENSIONS == {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "avif": "avif"}
    assert set(DEFAULT_QUALITY) == set(LOSSY)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_stored_extension_gives_back_the_media_type(fmt):
    assert media_type_for_extension(FILE_EXTENSIONS[fmt]) == MEDIA_TYPES[fmt]


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        ("jpg", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        (".JPG", "image/jpeg"),
        ("PNG", "image/png"),
        ("webp", "image/webp"),
        ("gif", "image/gif"),
        ("avif", "image/avif"),
        ("bmp", None),
        ("", None),
        ("txt", None),
        ("partial", None),
    ],
)
def test_media_type_for_extension(extension, expected):
    assert media_type_for_extension(extension) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("png", "png"),
        ("PNG", "png"),
        (" png ", "png"),
        ("jpeg", "jpeg"),
        ("JPG", "jpeg"),
        ("jpg", "jpeg"),
        (" Jpeg\n", "jpeg"),
        ("WEBP", "webp"),
        ("gif", "gif"),
        ("Avif", "avif"),
    ],
)
def test_normalize_output_format(value, expected):
    assert normalize_output_format(value) == expected


@pytest.mark.parametrize("value", ["", "bmp", "tiff", "jpe g", "image/png", "png8", "heic", "svg"])
def test_normalize_output_format_refuses_and_lists_accepted(value):
    with pytest.raises(ValueError) as info:
        normalize_output_format(value)
    for name in OUTPUT_FORMATS:
        assert name in str(info.value)


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encode_round_trip_keeps_exact_size_and_format(fmt, mode, size):
    data = encode_image(noisy(size, mode), fmt)
    decoded = open_bytes(data)
    assert decoded.format == PILLOW_NAMES[fmt]
    assert decoded.size == size


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "avif", "gif"])
def test_encode_keeps_colours_roughly(fmt):
    image = Image.new("RGB", (32, 16), (200, 60, 30))
    assert close(rgb_at(open_bytes(encode_image(image, fmt)), (8, 8)), (200, 60, 30), 12)


def test_encode_default_is_png_and_accepts_the_jpg_alias():
    image = noisy((37, 23))
    assert open_bytes(encode_image(image)).format == "PNG"
    assert open_bytes(encode_image(image, "JPG")).format == "JPEG"


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif", "gif"])
def test_formats_without_alpha_get_transparency_over_white(fmt):
    decoded = open_bytes(encode_image(half_transparent_rgba(), fmt))
    assert close(rgb_at(decoded, (2, 5)), WHITE, 12)
    assert close(rgb_at(decoded, (17, 5)), RED, 40)


def test_png_keeps_alpha():
    decoded = open_bytes(encode_image(half_transparent_rgba(), "png"))
    assert decoded.mode == "RGBA"
    assert decoded.getpixel((2, 5))[3] == 0


def test_gif_is_written_as_a_palette_image():
    assert open_bytes(encode_image(noisy((37, 23)), "gif")).mode == "P"


@pytest.mark.parametrize("fmt", LOSSY)
def test_lower_quality_gives_fewer_bytes(fmt):
    image = noisy((96, 64))
    low, default, high = (len(encode_image(image, fmt, quality=q)) for q in (10, None, 95))
    assert low < default < high


@pytest.mark.parametrize("fmt", LOSSY)
@pytest.mark.parametrize("quality", [0, 1, 50, 100])
def test_quality_bounds_are_accepted(fmt, quality):
    assert open_bytes(encode_image(noisy((37, 23)), fmt, quality=quality)).size == (37, 23)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_lossless_formats_ignore_quality(fmt):
    image = noisy((37, 23))
    assert encode_image(image, fmt, quality=5) == encode_image(image, fmt)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("quality", [-1, 101, 1000, 50.0, True, "90"])
def test_quality_out_of_range_is_refused(fmt, quality):
    with pytest.raises(ValueError, match="quality"):
        encode_image(noisy((8, 8)), fmt, quality=quality)


@pytest.mark.parametrize("fmt", ["bmp", "tiff", ""])
def test_encode_refuses_unknown_formats(fmt):
    with pytest.raises(ValueError, match="output_format"):
        encode_image(noisy((8, 8)), fmt)


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "LA", "P", "1"])
def test_encode_png_from_other_modes(mode):
    image = noisy((37, 23)).convert(mode) if mode != "I;16" else Image.new("I;16", (37, 23), 1000)
    assert open_bytes(encode_image(image, "png")).size == (37, 23)


# --- decoding: formats ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "AVIF"])
def test_decode_each_accepted_format(fmt, size):
    colour = (200, 60, 30)
    image = decode_image(save(Image.new("RGB", size, colour), fmt))
    assert image.mode == "RGB"
    assert image.size == size
    assert close(rgb_at(image, (0, 0)), colour, 12)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "AVIF", "PNG"])
def test_decode_takes_the_first_frame_of_an_animation(fmt):
    data = two_frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = decode_image(data)
    assert image.size == (16, 12)
    assert close(rgb_at(image, (8, 6)), RED, 20)


def test_decode_ignores_the_declared_name_and_reads_the_bytes():
    """Only bytes reach decode_image; a JPEG is a JPEG whatever the upload claimed."""
    image = decode_image(save(Image.new("RGB", (10, 10), BLUE), "JPEG"))
    assert close(rgb_at(image, (5, 5)), BLUE, 12)


# --- decoding: modes ------------------------------------------------------------------------------------------


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    decoded = decode_image(save(image, "PNG"))
    assert decoded.mode == "RGB"
    assert tuple(rgb_at(decoded, (0, 0))) == WHITE
    assert tuple(rgb_at(decoded, (1, 0))) == RED
    assert close(rgb_at(decoded, (2, 0)), (127, 127, 127), 2)


def test_la_is_composited_over_white():
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (50, 255))
    decoded = decode_image(save(image, "PNG"))
    assert tuple(rgb_at(decoded, (0, 0))) == WHITE
    assert tuple(rgb_at(decoded, (1, 0))) == (50, 50, 50)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.paste(1, (2, 0, 4, 2))
    decoded = decode_image(save(image, fmt, transparency=0))
    assert tuple(rgb_at(decoded, (0, 0))) == WHITE
    assert tuple(rgb_at(decoded, (3, 1))) == RED


def test_palette_with_per_index_alpha():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    image.putpixel((1, 0), 1)
    image.info["transparency"] = bytes([0, 255])
    decoded = decode_image(save(image, "PNG", transparency=bytes([0, 255])))
    assert tuple(rgb_at(decoded, (0, 0))) == WHITE
    assert tuple(rgb_at(decoded, (1, 0))) == BLUE


def test_palette_without_transparency():
    image = noisy((37, 23)).convert("P", palette=Image.Palette.ADAPTIVE)
    decoded = decode_image(save(image, "PNG"))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_and_bilevel(mode):
    image = Image.new("L", (4, 4), 0)
    image.paste(255, (2, 0, 4, 4))
    image = image.convert(mode)
    decoded = decode_image(save(image, "PNG"))
    assert decoded.mode == "RGB"
    assert tuple(rgb_at(decoded, (0, 0))) == BLACK
    assert tuple(rgb_at(decoded, (3, 3))) == WHITE


def test_mid_grey_l_stays_mid_grey():
    assert tuple(rgb_at(decode_image(save(Image.new("L", (5, 5), 128), "PNG")), (2, 2))) == (128, 128, 128)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32768, 127), (65535, 255), (257 * 200, 200)])
def test_sixteen_bit_greyscale_keeps_its_brightness(value, expected):
    image = Image.fromarray(np.full((6, 7), value, dtype=np.uint16))
    data = save(image, "PNG")
    assert open_bytes(data).mode == "I;16"
    decoded = decode_image(data)
    assert decoded.size == (7, 6)
    assert close(rgb_at(decoded, (3, 3)), (expected,) * 3, 1)


def test_sixteen_bit_greyscale_transparency_goes_white():
    image = Image.fromarray(np.array([[1000, 32768]], dtype=np.uint16))
    decoded = decode_image(save(image, "PNG", transparency=1000))
    assert tuple(rgb_at(decoded, (0, 0))) == WHITE
    assert close(rgb_at(decoded, (1, 0)), (127, 127, 127), 1)


def test_sixteen_bit_gradient_is_monotonic_and_not_clipped():
    image = Image.fromarray(np.linspace(0, 65535, 256, dtype=np.uint16).reshape(1, 256))
    row = np.asarray(decode_image(save(image, "PNG")))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert 120 <= row[128] <= 135


def test_cmyk_jpeg():
    cmyk = Image.new("RGB", (16, 16), RED).convert("CMYK")
    data = save(cmyk, "JPEG", quality=95)
    assert open_bytes(data).mode == "CMYK"
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert close(rgb_at(decoded, (8, 8)), RED, 12)


def test_ycbcr_converts_to_rgb():
    image = Image.new("RGB", (4, 4), (10, 200, 30)).convert("YCbCr")
    assert close(rgb_at(to_rgb(image), (1, 1)), (10, 200, 30), 3)


# --- decoding: EXIF orientation -------------------------------------------------------------------------------


def marked_40x20() -> Image.Image:
    """40x20 blue with a red 8x8 block in the top-left corner."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 8, 8))
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    ("orientation", "size", "red_corner"),
    [
        (1, (40, 20), (3, 3)),  # as stored
        (3, (40, 20), (36, 16)),  # rotated 180: top-left -> bottom-right
        (6, (20, 40), (16, 3)),  # rotate 90 clockwise to view: top-left -> top-right
        (8, (20, 40), (3, 36)),  # rotate 90 counter-clockwise to view: top-left -> bottom-left
        (2, (40, 20), (36, 3)),  # mirrored: top-left -> top-right
    ],
)
def test_exif_orientation_is_applied(fmt, orientation, size, red_corner):
    decoded = decode_image(with_exif_orientation(marked_40x20(), orientation, fmt))
    assert decoded.size == size
    assert close(rgb_at(decoded, red_corner), RED, 40)
    assert close(rgb_at(decoded, (size[0] // 2, size[1] // 2)), BLUE, 40)


def test_orientation_6_jpeg_top_left_goes_top_right():
    decoded = decode_image(with_exif_orientation(marked_40x20(), 6))
    assert decoded.size == (20, 40)
    assert close(rgb_at(decoded, (19, 0)), RED, 40)
    assert not close(rgb_at(decoded, (0, 0)), RED, 40)


# --- decoding: refusals ---------------------------------------------------------------------------------------


def bmp() -> bytes:
    return save(Image.new("RGB", (8, 8), RED), "BMP")


def tiff() -> bytes:
    return save(Image.new("RGB", (8, 8), RED), "TIFF")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "not a PNG, JPEG, WebP, GIF or AVIF"),
        (b"hello, this is a text file\nnot an image\n", "not a PNG, JPEG, WebP, GIF or AVIF"),
        (b'{"image": "cat.png"}', "not a PNG, JPEG, WebP, GIF or AVIF"),
        (b"\x00", "not a PNG, JPEG, WebP, GIF or AVIF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a PNG, JPEG, WebP, GIF or AVIF"),
        (b"%PDF-1.4\n", "PDF is not supported"),
    ],
)
def test_unusable_bytes_are_refused_with_a_clear_message(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


@pytest.mark.parametrize(("make", "name"), [(bmp, "BMP"), (tiff, "TIFF")])
def test_bmp_and_tiff_are_refused_by_name(make, name):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(make())
    assert "not a PNG, JPEG, WebP, GIF or AVIF image" in str(info.value)
    assert f"{name} is not supported" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "AVIF"])
@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_truncated_images_are_refused(fmt, keep):
    data = save(noisy((64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated image"):
        decode_image(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "prefix",
    [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"\x00\x00\x00\x1cftypavif"],
)
def test_right_signature_followed_by_garbage_is_corrupt(prefix):
    with pytest.raises(ImageDecodeError, match="corrupt or truncated image"):
        decode_image(prefix + b"\x13\x37" * 40)


def test_corrupted_png_crc_is_refused():
    data = bytearray(save(noisy((32, 32)), "PNG"))
    data[40] ^= 0xFF
    with pytest.raises(ImageDecodeError, match="corrupt or truncated image"):
        decode_image(bytes(data))


def test_decode_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)


# --- decoding: decompression bombs ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8000, 8000), (10000, 10000), (20000, 20000), (65535, 65535), (1, 60_000_000)])
def test_decompression_bomb_is_refused_quickly(size):
    data = png_with_declared_size(*size)
    assert struct.unpack(">II", data[16:24]) == size and zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters_before


def test_max_input_pixels_is_a_local_limit():
    data = save(noisy((100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="100x100"):
        decode_image(data, max_input_pixels=9_999)
    assert decode_image(data, max_input_pixels=10_000).size == (100, 100)


def test_bomb_in_a_mask_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_mask(png_with_declared_size(20000, 20000), (20000, 20000))
    assert time.perf_counter() - start < 1.0


# --- decoding: downscale --------------------------------------------------------------------------------------


def test_large_image_is_downscaled_to_4_megapixels_keeping_aspect():
    data = save(Image.new("RGB", (3000, 2000), (10, 120, 240)), "JPEG")
    decoded = decode_image(data)
    width, height = decoded.size
    assert width * height <= 4 * 1024 * 1024
    assert width * height > 0.99 * 4 * 1024 * 1024
    assert abs((width / height) / 1.5 - 1) < 0.01
    assert decoded.info["source_size"] == (3000, 2000)
    assert close(rgb_at(decoded, (width // 2, height // 2)), (10, 120, 240), 12)


def test_small_image_is_not_resized():
    decoded = decode_image(save(noisy((37, 23)), "PNG"))
    assert decoded.size == (37, 23)
    assert decoded.info["source_size"] == (37, 23)


def test_downscale_happens_after_exif_rotation():
    image = Image.new("RGB", (400, 100), BLUE)
    decoded = decode_image(with_exif_orientation(image, 6), max_output_pixels=10_000)
    assert decoded.size == (50, 200)
    assert decoded.info["source_size"] == (100, 400)


@pytest.mark.parametrize(
    ("size", "limit", "expected"),
    [
        ((3000, 2000), 4 * 1024 * 1024, (2508, 1672)),
        ((100, 100), 10_000, (100, 100)),
        ((101, 100), 10_000, (100, 99)),
        ((1, 5000), 1000, (1, 1000)),
        ((5000, 1), 1000, (1000, 1)),
        ((2, 5000), 1000, (1, 1000)),
        ((7, 3), 1, (1, 1)),
    ],
)
def test_fit_size(size, limit, expected):
    result = fit_size(size, limit)
    assert result == expected
    assert result[0] * result[1] <= limit and min(result) >= 1


@pytest.mark.parametrize("size", [(3000, 2000), (4097, 1025), (1234, 5678), (9999, 3)])
def test_fit_size_stays_under_the_limit(size):
    width, height = fit_size(size, 4 * 1024 * 1024)
    assert width * height <= 4 * 1024 * 1024
    assert width <= size[0] and height <= size[1]


# --- masks ----------------------------------------------------------------------------------------------------


def test_mask_transparent_region_is_repainted():
    mask = decode_mask(save(half_transparent_rgba((20, 10)), "PNG"), (20, 10))
    assert mask.mode == "L" and mask.size == (20, 10)
    values = np.asarray(mask)
    assert np.all(values[:, :10] == 255)
    assert np.all(values[:, 10:] == 0)


@pytest.mark.parametrize(("alpha", "expected"), [(0, 255), (1, 255), (127, 255), (128, 0), (254, 0), (255, 0)])
def test_mask_alpha_threshold(alpha, expected):
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 255))
    image.putpixel((0, 0), (255, 255, 255, alpha))
    image.putpixel((1, 0), (0, 0, 0, 0))  # keeps the mask "transparent somewhere"
    assert decode_mask(save(image, "PNG"), (2, 1)).getpixel((0, 0)) == expected


@pytest.mark.parametrize("mode", ["RGB", "L", "1"])
def test_mask_without_alpha_is_black_and_white(mode):
    image = Image.new("RGB", (8, 4), BLACK)
    image.paste(WHITE, (0, 0, 4, 4))
    mask = decode_mask(save(image.convert(mode), "PNG"), (8, 4))
    assert np.all(np.asarray(mask)[:, :4] == 255)
    assert np.all(np.asarray(mask)[:, 4:] == 0)


@pytest.mark.parametrize(("grey", "expected"), [(127, 0), (128, 255), (200, 255), (30, 0)])
def test_mask_luminance_threshold(grey, expected):
    assert decode_mask(save(Image.new("L", (3, 3), grey), "PNG"), (3, 3)).getpixel((1, 1)) == expected


def test_fully_opaque_rgba_mask_is_read_as_black_and_white():
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 255))
    image.paste((255, 255, 255, 255), (4, 0, 8, 4))
    mask = np.asarray(decode_mask(save(image, "PNG"), (8, 4)))
    assert np.all(mask[:, :4] == 0) and np.all(mask[:, 4:] == 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_palette_or_webp_mask_with_transparency(fmt):
    mask = decode_mask(save(half_transparent_rgba((20, 10)), fmt), (20, 10))
    assert mask.getpixel((2, 5)) == 255
    assert mask.getpixel((17, 5)) == 0


def test_jpeg_mask_is_accepted_as_black_and_white():
    image = Image.new("RGB", (16, 16), BLACK)
    image.paste(WHITE, (8, 0, 16, 16))
    mask = decode_mask(save(image, "JPEG", quality=95), (16, 16))
    assert mask.getpixel((2, 8)) == 0 and mask.getpixel((13, 8)) == 255


@pytest.mark.parametrize(("mask_size", "image_size"), [((20, 10), (10, 20)), ((20, 10), (21, 10)), ((1, 1), (64, 64))])
def test_mask_size_mismatch(mask_size, image_size):
    with pytest.raises(ImageDecodeError) as info:
        decode_mask(save(Image.new("RGBA", mask_size), "PNG"), image_size)
    message = str(info.value)
    assert "same size as the first image" in message
    assert f"{mask_size[0]}x{mask_size[1]}" in message and f"{image_size[0]}x{image_size[1]}" in message


def test_mask_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), BLACK)
    image.paste(WHITE, (0, 0, 8, 8))
    mask = decode_mask(with_exif_orientation(image, 6, "PNG"), (20, 40))
    assert mask.size == (20, 40)
    assert mask.getpixel((16, 3)) == 255 and mask.getpixel((3, 3)) == 0


def test_mask_resize_to_the_decoded_image():
    from pipeline.masking import fit_mask  # the mask's one resize, when the job is built

    mask = fit_mask(decode_mask(save(half_transparent_rgba((20, 10)), "PNG"), (20, 10)), 10, 5)
    assert mask.size == (10, 5)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert mask.getpixel((1, 2)) == 255 and mask.getpixel((8, 2)) == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"not an image", "not a PNG"),
        (save(Image.new("RGBA", (8, 8)), "PNG")[:40], "corrupt"),
    ],
)
def test_mask_bad_bytes(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_mask(data, (8, 8))


# --- data URIs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_data_uri_round_trip(fmt):
    data = encode_image(noisy((37, 23)), fmt)
    uri = data_uri(data, fmt)
    assert uri.startswith(f"data:{MEDIA_TYPES[fmt]};base64,")
    assert parse_data_uri(uri) == data
    assert decode_image(parse_data_uri(uri)).size == (37, 23)


def test_data_uri_accepts_the_jpg_alias():
    assert data_uri(b"x", "JPG").startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    "header",
    [
        "data:image/png;base64",
        "data:;base64",
        "data:base64",
        "DATA:IMAGE/PNG;BASE64",
        "data:image/jpeg;name=cat.jpg;base64",
        "data:application/octet-stream;base64",
        "data:image/webp;charset=binary;base64",
    ],
)
def test_parse_data_uri_headers(header):
    payload = b"\x89PNG\x00\x01\x02 arbitrary bytes"
    assert parse_data_uri(f"{header},{base64.b64encode(payload).decode()}") == payload


def test_parse_data_uri_tolerates_whitespace_and_missing_padding():
    payload = bytes(range(256)) * 3 + b"ab"
    encoded = base64.b64encode(payload).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert parse_data_uri(f"data:image/png;base64,\n {wrapped}\r\n") == payload
    assert parse_data_uri(f"data:image/png;base64,{encoded.rstrip('=')}") == payload


@pytest.mark.parametrize(
    "uri",
    [
        "https://example.com/cat.png",
        "cat.png",
        "",
        "iVBORw0KGgo=",
        "data:image/png,rawbytes",
        "data:image/png;base64",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png;base64,!!!!",
        "data:image/png;base64,aGVs*G8=",
        "data:image/png;base64,a",
        None,
        b"data:image/png;base64,aGVsbG8=",
    ],
)
def test_parse_data_uri_refusals(uri):
    with pytest.raises(ImageDecodeError):
        parse_data_uri(uri)


def test_empty_data_uri_payload_decodes_to_an_empty_file_error():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(parse_data_uri("data:image/png;base64,"))
