"""Size rules: how a requested output size becomes the size the model computes. Pure functions."""

from __future__ import annotations

import math
import re
from fractions import Fraction

MEGAPIXEL = 1024 * 1024
MAX_OUTPUT_PIXELS = 4 * MEGAPIXEL  # 4 MP = 2048 x 2048
MAX_SIDE = 14142
# The VAE downsamples by 8 and the transformer packs 2x2 latent patches: the model works in steps of 16 pixels.
MODEL_MULTIPLE = 16

_WXH = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")
# A positive decimal number without sign or exponent ("16", "2.39", ".5", "1."); bounded so parsing stays cheap.
_NUMBER = r"([0-9]{1,15}(?:\.[0-9]{0,15})?|\.[0-9]{1,15})"
_RATIO = re.compile(rf"^\s*{_NUMBER}\s*:\s*{_NUMBER}\s*$")
_RESOLUTION = re.compile(rf"^\s*{_NUMBER}\s*(k|mp|megapixels?)?\s*$", re.IGNORECASE)

# The product's published shapes at the 1 MP tier. Not perfectly symmetric (4:3 is 1183x887, 3:4 is 887x1182),
# so they are data, not a formula.
_SHAPES_1MP: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1183, 887),
    "3:4": (887, 1182),
    "5:4": (1145, 916),
    "4:5": (916, 1145),
    "3:2": (1254, 836),
    "2:3": (836, 1254),
    "16:9": (1365, 768),
    "9:16": (768, 1365),
    # Not published; computed at 1 MP: short = round_half_up(sqrt(1048576 * 9/21)) = round_half_up(670.37) = 670,
    # long = round_half_up(670 * 21/9) = round_half_up(1563.33) = 1563 -> 1563x670 (1,047,210 px).
    "21:9": (1563, 670),
    "9:21": (670, 1563),
}
ASPECT_RATIOS: tuple[str, ...] = tuple(_SHAPES_1MP)
_RATIO_VALUES: dict[str, Fraction] = {
    key: Fraction(int(key.split(":")[0]), int(key.split(":")[1])) for key in ASPECT_RATIOS
}
RESOLUTION_TIERS_MP: tuple[Fraction, ...] = (Fraction(1, 4), Fraction(1), Fraction(4))
# The largest multiple of 16 that is still a valid side: explicit width/height never round past MAX_SIDE.
_MAX_ROUNDED_SIDE = MAX_SIDE // MODEL_MULTIPLE * MODEL_MULTIPLE


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
    """The largest size of the same aspect (sides floored, at least 1) with at most `max_pixels` pixels: the one
    pixel-cap rule, for outputs (4 MP, or the operator's lower cap) and for input images alike."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if new_w * new_h > max_pixels:  # a side clamped to 1, or float rounding
        if new_w >= new_h:
            new_w = max(1, max_pixels // new_h)
        else:
            new_h = max(1, max_pixels // new_w)
    return new_w, new_h


def model_size(width: int, height: int) -> tuple[int, int]:
    """The size the model computes for a delivered (width, height): each side rounded to the nearest multiple of
    16 (halves up, at least 16), which keeps aspect and area close; kept within 4 MP by stepping the longer side
    down."""
    run_w = max(MODEL_MULTIPLE, _round_half_up(width / MODEL_MULTIPLE) * MODEL_MULTIPLE)
    run_h = max(MODEL_MULTIPLE, _round_half_up(height / MODEL_MULTIPLE) * MODEL_MULTIPLE)
    while run_w * run_h > MAX_OUTPUT_PIXELS:
        if run_w >= run_h:
            run_w -= MODEL_MULTIPLE
        else:
            run_h -= MODEL_MULTIPLE
    return run_w, run_h


def billable_megapixels(width: int, height: int, minimum: int = 1) -> int:
    """Pricing: the area rounded up to the next whole megapixel (1 MP = 1024x1024), at least `minimum`."""
    return max(minimum, -(-(width * height) // MEGAPIXEL))


def resolve_output_size(
    *,
    size: str | None = None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    width: int | None = None,
    height: int | None = None,
    reference_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_OUTPUT_PIXELS,
) -> tuple[int, int]:
    """The delivered (width, height) of an output image, at most `max_pixels` (4 MP, or the operator's lower cap).

    Precedence: `size` "WxH" (exact, capped at 4 MP); else `size` "W:H" or `aspect_ratio` (nearest supported ratio)
    at the `resolution` tier; else `width`/`height` (multiples of 16); else `resolution` alone; else the default
    (1024x1024, or the first reference's size on edits). Parameters that lose are ignored, not validated.
    `reference_size` is the first input image's (width, height) on edits, None for text-to-image."""
    reference = _check_reference(reference_size)
    ratio, ratio_param = aspect_ratio, "aspect_ratio"
    if size is not None:
        if not isinstance(size, str):
            raise SizeError(f"Invalid size {size!r}: expected a string such as '1024x1024', '16:9' or 'auto'.", "size")
        text = size.strip()
        if ":" in text:
            ratio, ratio_param = text, "size"
        elif text.lower() != "auto":
            if not _WXH.match(text):
                raise SizeError(
                    f"Invalid size {size!r}: expected 'WIDTHxHEIGHT' such as '1024x1024', "
                    "an aspect ratio 'W:H' such as '16:9', or 'auto'.",
                    "size",
                )
            return _fit(*parse_wxh(text, "size"), max_pixels)
    custom = False
    if ratio is not None:
        if not isinstance(ratio, str):
            raise SizeError(f"Invalid {ratio_param} {ratio!r}: expected 'W:H' such as '16:9' or 'custom'.", ratio_param)
        if ratio.strip().lower() == "custom":  # only aspect_ratio can say so: a size with ':' is never "custom"
            custom = True
        else:
            shape = _SHAPES_1MP[_nearest_ratio(ratio, ratio_param)]
            tier = _parse_resolution(resolution)
            if tier is not None:
                area = int(tier * MEGAPIXEL)
            elif reference is not None:
                area = min(reference[0] * reference[1], MAX_OUTPUT_PIXELS)
            else:
                area = MEGAPIXEL
            return _fit(*_scale_shape(shape, area), max_pixels)
    if custom or width is not None or height is not None:
        return _fit(_round_side(width, "width"), _round_side(height, "height"), max_pixels)
    tier = _parse_resolution(resolution)
    if tier is not None:
        if reference is None:
            return _fit(*_scale_shape(_SHAPES_1MP["1:1"], int(tier * MEGAPIXEL)), max_pixels)
        return _fit(*_shape_for_ratio(reference, int(tier * MEGAPIXEL)), max_pixels)
    if reference is None:
        return _fit(1024, 1024, max_pixels)
    return _fit(*reference, max_pixels)


def _check_reference(reference_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The reference (width, height), checked: two positive integers, or None."""
    if reference_size is None:
        return None
    if len(reference_size) != 2 or not all(
        isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in reference_size
    ):
        raise ValueError(f"reference_size must be two positive integers, got {reference_size!r}.")
    return reference_size[0], reference_size[1]


def _nearest_ratio(value: str, param: str) -> str:
    """The supported ratio nearest to "W:H" in log space (exact arithmetic; a tie goes to the wider one)."""
    match = _RATIO.match(value)
    ratio = Fraction(match[1]) / Fraction(match[2]) if match and Fraction(match[2]) else None
    if not ratio:
        raise SizeError(
            f"Invalid {param} {value!r}: expected 'W:H' with positive numbers such as '16:9'"
            + (" or 'custom'." if param == "aspect_ratio" else "."),
            param,
        )
    return min(ASPECT_RATIOS, key=lambda key: (_log_distance(ratio, _RATIO_VALUES[key]), -_RATIO_VALUES[key]))


def _parse_resolution(value: str | None) -> Fraction | None:
    """The supported megapixel tier nearest to a resolution in log space (a tie goes to the larger tier);
    None for "auto" or None. "NK" means a side of about N x 1024, so N² megapixels."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SizeError(f"Invalid resolution {value!r}: expected a string such as '1K' or '1MP'.", "resolution")
    if value.strip().lower() == "auto":
        return None
    match = _RESOLUTION.match(value)
    number = Fraction(match[1]) if match else Fraction(0)
    if match is None or number <= 0:
        raise SizeError(
            f"Invalid resolution {value!r}: expected a positive 'NK' such as '1K' or '2K', "
            "a megapixel count such as '1' or '4MP', or 'auto'.",
            "resolution",
        )
    megapixels = number * number if match[2] and match[2].lower() == "k" else number
    return min(RESOLUTION_TIERS_MP, key=lambda tier: (_log_distance(megapixels, tier), -tier))


def _log_distance(value: Fraction, target: Fraction) -> Fraction:
    """A monotone stand-in for |log(value) - log(target)|, kept exact so that ties are real ties."""
    return max(value / target, target / value)


def _round_half_up(value: float) -> int:
    """Round to the nearest integer, halves upwards."""
    return math.floor(value + 0.5)


def _scale_shape(shape: tuple[int, int], area: int) -> tuple[int, int]:
    """A 1 MP shape scaled to `area` pixels: each side times sqrt(area / 1 MP), rounded half up."""
    factor = math.sqrt(area / MEGAPIXEL)
    return max(1, _round_half_up(shape[0] * factor)), max(1, _round_half_up(shape[1] * factor))


def _shape_for_ratio(reference: tuple[int, int], area: int) -> tuple[int, int]:
    """The reference's aspect ratio at `area` pixels: w = sqrt(area * rw / rh), h = area / w, rounded half up."""
    exact_w = math.sqrt(area * reference[0] / reference[1])
    return max(1, _round_half_up(exact_w)), max(1, _round_half_up(area / exact_w))


def _round_side(value: int | None, param: str) -> int:
    """An explicit width or height (1 to 14142) rounded half up to a multiple of 16, at least 16."""
    if value is None:
        raise SizeError(f"Missing {param}: width and height must be given together.", param)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SizeError(f"Invalid {param} {value!r}: expected an integer number of pixels.", param)
    if not 1 <= value <= MAX_SIDE:
        raise SizeError(f"Invalid {param} {value}: must be between 1 and {MAX_SIDE} pixels.", param)
    rounded = (value + MODEL_MULTIPLE // 2) // MODEL_MULTIPLE * MODEL_MULTIPLE
    return min(_MAX_ROUNDED_SIDE, max(MODEL_MULTIPLE, rounded))


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Keep a size deliverable: no side above 14142 px (aspect kept), then at most `max_pixels` (cap_pixels)."""
    if width > MAX_SIDE or height > MAX_SIDE:
        if width >= height:
            width, height = MAX_SIDE, max(1, height * MAX_SIDE // width)
        else:
            width, height = max(1, width * MAX_SIDE // height), MAX_SIDE
    return cap_pixels(width, height, max_pixels)
