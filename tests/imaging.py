"""Test helpers for decoding what the server returns."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def decode_b64(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def decode_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def generate(client, **params):
    """`client.images.generate` with our non-OpenAI parameters (seed, num_inference_steps, ...) sent through
    `extra_body`, as a user of the SDK sends them."""
    import inspect

    accepted = inspect.signature(type(client.images).generate).parameters
    direct = {k: v for k, v in params.items() if k in accepted}
    extra = {k: v for k, v in params.items() if k not in accepted}
    if extra:
        direct["extra_body"] = {**direct.get("extra_body", {}), **extra}
    return client.images.generate(**direct)
