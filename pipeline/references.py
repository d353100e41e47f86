"""Reference images as FLUX.2's pipelines accept them.

diffusers refuses references under 64 px a side or beyond 8:1 (`Flux2ImageProcessor.check_image_input`); the API
accepts any image. Extreme ones are padded with white to 8:1 and small ones scaled up (aspect kept), so every
decodable image conditions the model. The pipeline then resizes each to <= 1 MP, sides floored to 16."""

from __future__ import annotations

import math

from PIL import Image, ImageOps

from .sizes import MODEL_MULTIPLE

MIN_SIDE = 64
MAX_ASPECT = 8
PIPELINE_MAX_PIXELS = 1024 * 1024
PATCH = MODEL_MULTIPLE  # one packed latent token covers 16 x 16 pixels


def padded_size(width: int, height: int) -> tuple[int, int]:
    """The canvas an image beyond 8:1 is padded to (unchanged when within 8:1)."""
    if width > MAX_ASPECT * height:
        return width, math.ceil(width / MAX_ASPECT)
    if height > MAX_ASPECT * width:
        return math.ceil(height / MAX_ASPECT), height
    return width, height


def scaled_up_size(width: int, height: int) -> tuple[int, int]:
    """The size an image with a side under 64 px is scaled up to (unchanged otherwise)."""
    if min(width, height) >= MIN_SIDE:
        return width, height
    scale = MIN_SIDE / min(width, height)
    return max(MIN_SIDE, math.ceil(width * scale)), max(MIN_SIDE, math.ceil(height * scale))


def prepare_reference(image: Image.Image) -> Image.Image:
    canvas = padded_size(*image.size)
    if canvas != image.size:
        image = ImageOps.pad(image, canvas, color="white")
    target = scaled_up_size(*image.size)
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS)
    return image


def encoded_size(width: int, height: int) -> tuple[int, int]:
    """The size a reference of `width` x `height` is encoded at: prepared as above, then <= 1 MP keeping aspect
    and sides floored to multiples of 16, as diffusers' FLUX.2 pipelines do."""
    width, height = scaled_up_size(*padded_size(width, height))
    if width * height > PIPELINE_MAX_PIXELS:
        scale = math.sqrt(PIPELINE_MAX_PIXELS / (width * height))
        width, height = int(width * scale), int(height * scale)
    return (width // PATCH) * PATCH, (height // PATCH) * PATCH
