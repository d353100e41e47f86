"""Size rules: how a requested output size becomes the size the model computes. Pure functions."""

from __future__ import annotations

import math
import re

MEGAPIXEL = 1024 * 1024
MAX_OUTPUT_PIXELS = 4 * MEGAPIXEL  # 4 MP = 2048 x 2048
MAX_SIDE = 14142
# The VAE downsamples by 8 and the transformer packs 2x2 latent patches: the model works in steps of 16 pixels.
MODEL_MULTIPLE = 16

_WXH = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


class SizeError(ValueError):
    """A size parameter is malformed or out of range; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parse_wxh(value: str, param: str = "size") -> tuple[int, int]:
    """Parse "WxH" (1 to 14142 px per side)."""
    match = _WXH.match(value)
    if not match:
        raise SizeError(f"Invalid {param} {value!r}: expected 'WIDTHxHEIGHT' such as '1024x1024'.", param)
    width, height = int(match[1]), int(match[2])
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise SizeError(f"Invalid {param} {value!r}: each side must be between 1 and {MAX_SIDE} pixels.", param)
    return width, height


def cap_pixels(width: int, height: int, max_pixels: int = MAX_OUTPUT_PIXELS) -> tuple[int, int]:
    """Scale (width, height) down, keeping the aspect ratio, until it has at most `max_pixels` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return new_w, new_h


def model_size(width: int, height: int) -> tuple[int, int]:
    """The size the model computes for a delivered (width, height): each side rounded to the nearest multiple of
    16 (at least 16), which keeps aspect and area close; kept within 4 MP by stepping the longer side down."""
    run_w = max(MODEL_MULTIPLE, round(width / MODEL_MULTIPLE) * MODEL_MULTIPLE)
    run_h = max(MODEL_MULTIPLE, round(height / MODEL_MULTIPLE) * MODEL_MULTIPLE)
    while run_w * run_h > MAX_OUTPUT_PIXELS:
        if run_w >= run_h:
            run_w -= MODEL_MULTIPLE
        else:
            run_h -= MODEL_MULTIPLE
    return run_w, run_h
