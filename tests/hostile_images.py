"""Image files a hostile or careless client sends, made in memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width=64, height=48, mode="RGB", seed=0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = np.random.RandomState(seed).randint(0, 255, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze() if channels == 1 else array, mode)


def png(width=64, height=48) -> bytes:
    return encode(noise(width, height), "PNG")


def bomb_png(width=40000, height=40000) -> bytes:
    """A tiny valid PNG whose header claims `width` x `height` pixels."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), then width and height
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [noise(64, 64, seed=s).convert("P") for s in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(noise(64, 64).convert("CMYK"), "JPEG")


def palette_png_with_transparency() -> bytes:
    image = noise(64, 64).convert("P")
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    array = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def rgba_png() -> bytes:
    return encode(noise(64, 64, "RGBA"), "PNG")


def exif_rotated_jpeg() -> bytes:
    image = noise(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return encode(image, "JPEG", exif=exif.tobytes())


def webp() -> bytes:
    return encode(noise(64, 64), "WEBP")
