"""Size rules, as pure functions."""

from __future__ import annotations

import pytest

from pipeline.sizes import MAX_OUTPUT_PIXELS, SizeError, cap_pixels, model_size, parse_wxh


@pytest.mark.parametrize("text, expected", [
    ("1024x1024", (1024, 1024)), ("1x1", (1, 1)), ("14142x1", (14142, 1)), (" 800 X 600 ", (800, 600)),
    ("1920×1080", (1920, 1080)),
])
def test_parse_wxh(text, expected):
    assert parse_wxh(text) == expected


@pytest.mark.parametrize("text", ["", "1024", "0x10", "10x0", "14143x10", "axb", "-1x5", "1024x1024x3", "1e3x5"])
def test_parse_wxh_refuses(text):
    with pytest.raises(SizeError) as caught:
        parse_wxh(text, "size")
    assert caught.value.param == "size"


def test_cap_pixels_keeps_aspect_and_reaches_4mp():
    assert cap_pixels(2048, 2048) == (2048, 2048)
    width, height = cap_pixels(4000, 3000)
    assert width * height <= MAX_OUTPUT_PIXELS
    assert width * height > MAX_OUTPUT_PIXELS * 0.998
    assert abs(width / height - 4 / 3) < 0.01


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (1183, 887), (2048, 2048), (14142, 1), (2366, 1772)])
def test_model_size_is_a_multiple_of_16_near_the_target(size):
    run_w, run_h = model_size(*size)
    assert run_w % 16 == 0 and run_h % 16 == 0
    assert run_w >= 16 and run_h >= 16
    assert run_w * run_h <= MAX_OUTPUT_PIXELS
    assert abs(run_w - size[0]) <= 8 or run_w == 16 or run_w * run_h > MAX_OUTPUT_PIXELS - 16 * max(size)
