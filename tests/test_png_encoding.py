"""The parallel PNG encoder: valid files (chunk CRCs, one zlib stream), exact pixels for every mode it takes,
metadata chunks readable, strips joined correctly, compression no worse than Pillow's on smooth images, and each
strip's deflate strategy (run-length for busy data, string matching for graphics) never costing bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline import png_encoding
from pipeline.codecs import encode_image
from pipeline.file_metadata import read_metadata
from pipeline.png_encoding import can_encode, encode_png


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Walk the file's chunks, checking every CRC; (type, data) pairs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, found = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        position += 12 + length
    assert found[0][0] == b"IHDR" and found[-1] == (b"IEND", b"")
    return found


def _smooth(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    """Photo-like pixels: an upscaled random colour field with a little grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(field).astype(np.int16) + rng.integers(-3, 4, (height, width, 3))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if channels == 1:
        return pixels[..., 0]
    if channels == 2:
        return np.stack([pixels[..., 0], pixels[..., 1]], -1)
    if channels == 4:
        return np.concatenate([pixels, pixels[..., :1]], -1)
    return pixels


@pytest.mark.parametrize("mode,channels", [("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4)])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (333, 211), (1024, 768)])
def test_pixels_round_trip_exactly(mode, channels, size):
    pixels = _smooth(*size, channels)
    image = Image.fromarray(pixels, mode)
    data = encode_png(image)
    _chunks(data)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.mode == mode and decoded.size == size
    assert np.array_equal(np.asarray(decoded), pixels)


def test_noise_and_wrapping_differences_round_trip():
    """Random bytes make every Up difference wrap around 256 somewhere."""
    pixels = np.random.default_rng(3).integers(0, 256, (517, 389, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(Image.fromarray(pixels))))
    assert np.array_equal(np.asarray(decoded), pixels)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_strips_join_into_one_zlib_stream(threads, monkeypatch):
    """However many strips, the IDAT pieces concatenate to one zlib stream whose content is the Up-filtered rows,
    and the file is byte-identical whatever the pool does with the strips."""
    monkeypatch.setattr(png_encoding, "STRIP_BYTES", 4096)
    pixels = _smooth(300, 200, 3)
    data = encode_png(Image.fromarray(pixels), threads=threads)
    idats = [body for kind, body in _chunks(data) if kind == b"IDAT"]
    assert len(idats) == threads  # 180 kB of rows: one strip per thread
    raw = zlib.decompress(b"".join(idats))  # checks the header, the stream and the Adler-32
    rows = np.frombuffer(raw, np.uint8).reshape(200, 300 * 3 + 1)
    assert (rows[:, 0] == 2).all()  # every row filtered "Up"
    unfiltered = np.cumsum(rows[:, 1:].astype(np.int64), axis=0) % 256
    assert np.array_equal(unfiltered.reshape(200, 300, 3), pixels)
    again = encode_png(Image.fromarray(pixels), threads=threads)
    assert again == data


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_levels_give_valid_headers(level):
    data = encode_png(Image.fromarray(_smooth(64, 64, 3)), level=level)
    stream = b"".join(body for kind, body in _chunks(data) if kind == b"IDAT")
    assert (stream[0] * 256 + stream[1]) % 31 == 0 and stream[0] == 0x78
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), _smooth(64, 64, 3))


def test_ancillary_chunks_come_before_the_image_data_and_read_back():
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "flux2-local test")
    info.add_itxt("Description", "un phare sur une falaise, au crépuscule")
    data = encode_png(Image.fromarray(_smooth(40, 30, 3)), chunks=[(c[0], c[1]) for c in info.chunks])
    kinds = [kind for kind, _ in _chunks(data)]
    assert kinds.index(b"tEXt") < kinds.index(b"IDAT") and kinds.index(b"iTXt") < kinds.index(b"IDAT")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.text == {"Software": "flux2-local test", "Description": "un phare sur une falaise, au crépuscule"}


def test_served_png_carries_its_metadata_through_the_fast_encoder():
    record = {"prompt": "a red fox", "seed": 7, "steps": 4, "size": "64x48", "output_format": "png"}
    pixels = _smooth(64, 48, 3)
    data = encode_image(Image.fromarray(pixels), "png", metadata=record)
    assert [kind for kind, _ in _chunks(data)].count(b"IDAT") >= 1
    read = read_metadata(data)
    assert read["prompt"] == "a red fox" and read["seed"] == 7
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)


def test_compresses_smooth_images_no_worse_than_pillow():
    """The Up filter against Pillow's adaptive filtering, both at zlib level 1, on a photo-like 1 MP image."""
    image = Image.fromarray(_smooth(1024, 1024, 3))
    ours = encode_png(image, level=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    assert len(ours) <= 1.05 * len(buffer.getvalue())
    assert len(ours) < 0.6 * 1024 * 1024 * 3  # and it does compress


def test_other_images_go_to_pillow():
    palette = Image.new("P", (8, 8))
    with_profile = Image.new("RGB", (8, 8))
    with_profile.info["icc_profile"] = b"profile"
    grey16 = Image.new("I;16", (8, 8))
    keyed = Image.new("RGB", (8, 8))
    keyed.info["transparency"] = (0, 0, 0)
    for image in (palette, with_profile, grey16, keyed):
        assert not can_encode(image)
        with pytest.raises(ValueError):
            encode_png(image)
    # encode_image still writes them, through Pillow
    for image in (palette, grey16, keyed):
        decoded = Image.open(io.BytesIO(encode_image(image, "png")))
        assert decoded.size == (8, 8)


def _text_image() -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(image)
    for line in range(30):
        draw.text((8, line * 17), "The quick brown fox jumps over the lazy dog 0123456789 " * 2, fill="black")
    return image


def _strategies(image: Image.Image, level: int = 1) -> list[int]:
    """The strategy each strip of `image` was deflated with (strips of 64 KiB: several per image)."""
    chosen: list[int] = []
    choose = png_encoding._strategy

    def spy(strip, level):
        chosen.append(choose(strip, level))
        return chosen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(png_encoding, "_strategy", spy)
        patch.setattr(png_encoding, "STRIP_BYTES", 65536)
        encode_png(image, level=level, threads=4)
    assert len(chosen) > 1
    return chosen


def test_busy_images_are_run_length_deflated_and_graphics_keep_string_matching():
    """At level 1, photographs, generated-looking images and noise are deflated with Z_RLE, flat graphics and text
    with zlib's default; other levels keep the default everywhere."""
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    grainy = Image.fromarray(_smooth(256, 256, 3))
    gradient = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (512, 2)))
    assert set(_strategies(noise)) == set(_strategies(grainy)) == {zlib.Z_RLE}
    assert set(_strategies(_text_image())) == set(_strategies(gradient)) == {zlib.Z_DEFAULT_STRATEGY}
    assert set(_strategies(noise, level=6)) == {zlib.Z_DEFAULT_STRATEGY}


@pytest.mark.parametrize("kind", ["grainy", "text"])
def test_the_chosen_strategy_is_never_larger_than_the_default(kind, monkeypatch):
    """Byte counts of the same 1 MP image with the strategy chosen per strip and with zlib's default everywhere:
    Z_RLE makes the grainy one smaller; the text keeps the default, so the same file."""
    image = Image.fromarray(_smooth(1024, 1024, 3)) if kind == "grainy" else _text_image().resize((1024, 1024))
    chosen = encode_png(image, level=1)
    monkeypatch.setattr(png_encoding, "_strategy", lambda strip, level: zlib.Z_DEFAULT_STRATEGY)
    default = encode_png(image, level=1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(chosen))), np.asarray(image))
    if kind == "grainy":
        assert len(chosen) < len(default)
    else:
        assert chosen == default
