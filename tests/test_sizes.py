"""Size rules, as pure functions."""

from __future__ import annotations

import math

import pytest

from pipeline.sizes import (
    ASPECT_RATIOS,
    MAX_OUTPUT_PIXELS,
    MAX_SIDE,
    MEGAPIXEL,
    MODEL_MULTIPLE,
    SizeError,
    billable_megapixels,
    cap_pixels,
    model_size,
    parse_wxh,
    resolve_output_size,
)

# The product's published 1 MP table, plus the two computed 21:9 / 9:21 entries.
TABLE_1MP = {
    "4:3": (1183, 887),
    "4:5": (916, 1145),
    "5:4": (1145, 916),
    "1:1": (1024, 1024),
    "3:4": (887, 1182),
    "2:3": (836, 1254),
    "3:2": (1254, 836),
    "9:16": (768, 1365),
    "16:9": (1365, 768),
}
COMPUTED_1MP = {"21:9": (1563, 670), "9:21": (670, 1563)}
ALL_1MP = {**TABLE_1MP, **COMPUTED_1MP}


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _error_param(**kwargs) -> str:
    with pytest.raises(SizeError) as caught:
        resolve_output_size(**kwargs)
    assert str(caught.value)
    return caught.value.param


# --- existing helpers --------------------------------------------------------------------------------------------


def test_the_module_is_pure():
    import ast
    from pathlib import Path

    import pipeline.sizes

    tree = ast.parse(Path(pipeline.sizes.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "re", "fractions"}


def test_constants():
    assert MEGAPIXEL == 1024 * 1024
    assert MAX_OUTPUT_PIXELS == 4 * 1024 * 1024
    assert MAX_SIDE == 14142
    assert MODEL_MULTIPLE == 16


def test_size_error_is_a_value_error_with_a_param():
    error = SizeError("bad", "width")
    assert isinstance(error, ValueError)
    assert error.param == "width" and str(error) == "bad"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1024x1024", (1024, 1024)),
        ("1x1", (1, 1)),
        ("14142x1", (14142, 1)),
        (" 800 X 600 ", (800, 600)),
        ("1920×1080", (1920, 1080)),
    ],
)
def test_parse_wxh(text, expected):
    assert parse_wxh(text) == expected


@pytest.mark.parametrize("text", ["", "1024", "0x10", "10x0", "14143x10", "axb", "-1x5", "1024x1024x3", "1e3x5"])
def test_parse_wxh_refuses(text):
    with pytest.raises(SizeError) as caught:
        parse_wxh(text, "size")
    assert caught.value.param == "size"


def test_parse_wxh_names_the_given_param():
    with pytest.raises(SizeError) as caught:
        parse_wxh("nope", "reference")
    assert caught.value.param == "reference"


def test_cap_pixels_keeps_aspect_and_reaches_4mp():
    assert cap_pixels(2048, 2048) == (2048, 2048)
    width, height = cap_pixels(4000, 3000)
    assert width * height <= MAX_OUTPUT_PIXELS
    assert width * height > MAX_OUTPUT_PIXELS * 0.998
    assert abs(width / height - 4 / 3) < 0.01


def test_cap_pixels_with_a_custom_limit():
    assert cap_pixels(100, 100, max_pixels=2500) == (50, 50)
    assert cap_pixels(40, 40, max_pixels=2500) == (40, 40)


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (1183, 887), (2048, 2048), (14142, 1), (2366, 1772)])
def test_model_size_is_a_multiple_of_16_near_the_target(size):
    run_w, run_h = model_size(*size)
    assert run_w % 16 == 0 and run_h % 16 == 0
    assert run_w >= 16 and run_h >= 16
    assert run_w * run_h <= MAX_OUTPUT_PIXELS
    assert abs(run_w - size[0]) <= 8 or run_w == 16 or run_w * run_h > MAX_OUTPUT_PIXELS - 16 * max(size)


# --- the 1 MP table ----------------------------------------------------------------------------------------------


def test_supported_ratios():
    assert set(ASPECT_RATIOS) == set(ALL_1MP)


@pytest.mark.parametrize("ratio, expected", sorted(ALL_1MP.items()))
@pytest.mark.parametrize(
    "resolution", ["1K", "1k", "1", "1MP", "1 MP", "1mp", "1 megapixel", "1 megapixels", " 1.0 ", "auto", "AUTO", None]
)
def test_1mp_table_via_aspect_ratio(ratio, expected, resolution):
    assert resolve_output_size(aspect_ratio=ratio, resolution=resolution) == expected


@pytest.mark.parametrize("ratio, expected", sorted(ALL_1MP.items()))
@pytest.mark.parametrize("resolution", [None, "auto", "1K", "1", "1MP"])
def test_1mp_table_via_size_ratio(ratio, expected, resolution):
    assert resolve_output_size(size=ratio, resolution=resolution) == expected


def test_published_table_is_not_symmetric():
    assert resolve_output_size(aspect_ratio="4:3") == (1183, 887)
    assert resolve_output_size(aspect_ratio="3:4") == (887, 1182)


@pytest.mark.parametrize("long, short, expected", [(21, 9, (1563, 670)), (9, 21, (670, 1563))])
def test_21_9_follows_the_documented_formula(long, short, expected):
    lo, hi = min(long, short), max(long, short)
    short_side = _round_half_up(math.sqrt(MEGAPIXEL * lo / hi))
    long_side = _round_half_up(short_side * hi / lo)
    assert (short_side, long_side) == (670, 1563)
    assert resolve_output_size(aspect_ratio=f"{long}:{short}") == expected
    assert expected[0] * expected[1] <= MEGAPIXEL


# --- other tiers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, shape", sorted(ALL_1MP.items()))
@pytest.mark.parametrize(
    "resolution, factor",
    [("0.25", 0.5), ("0.5K", 0.5), ("0.25MP", 0.5), ("4", 2), ("2K", 2), ("4K", 2), ("4MP", 2), ("8K", 2)],
)
def test_tiers_scale_the_1mp_entry_by_area_then_cap(ratio, shape, resolution, factor):
    scaled = (_round_half_up(shape[0] * factor), _round_half_up(shape[1] * factor))
    assert resolve_output_size(aspect_ratio=ratio, resolution=resolution) == cap_pixels(*scaled)


@pytest.mark.parametrize(
    "resolution, expected",
    [
        ("0.25", (512, 512)),
        ("0.5K", (512, 512)),
        ("1K", (1024, 1024)),
        ("4", (2048, 2048)),
        ("2K", (2048, 2048)),
        ("4K", (2048, 2048)),
    ],
)
def test_square_tiers_are_exact(resolution, expected):
    assert resolve_output_size(aspect_ratio="1:1", resolution=resolution) == expected


@pytest.mark.parametrize(
    "ratio, expected",
    [
        ("4:3", (592, 444)),
        ("3:4", (444, 591)),
        ("16:9", (683, 384)),
        ("9:16", (384, 683)),
        ("3:2", (627, 418)),
        ("21:9", (782, 335)),
        ("9:21", (335, 782)),
        ("5:4", (573, 458)),
        ("4:5", (458, 573)),
    ],
)
def test_quarter_megapixel_shapes(ratio, expected):
    assert resolve_output_size(aspect_ratio=ratio, resolution="0.25") == expected


@pytest.mark.parametrize(
    "ratio, expected",
    [
        ("16:9", (2730, 1536)),
        ("9:16", (1536, 2730)),
        ("3:4", (1774, 2364)),
        ("2:3", (1672, 2508)),
        ("3:2", (2508, 1672)),
        ("21:9", (3126, 1340)),
        ("9:21", (1340, 3126)),
    ],
)
def test_4mp_shapes_within_the_cap_are_scaled_exactly(ratio, expected):
    assert resolve_output_size(aspect_ratio=ratio, resolution="4K") == expected


@pytest.mark.parametrize("ratio", ["4:3", "5:4", "4:5"])
def test_4mp_shapes_over_the_cap_are_capped(ratio):
    shape = ALL_1MP[ratio]
    assert shape[0] * 2 * shape[1] * 2 > MAX_OUTPUT_PIXELS
    width, height = resolve_output_size(aspect_ratio=ratio, resolution="4MP")
    assert (width, height) == cap_pixels(shape[0] * 2, shape[1] * 2)
    assert MAX_OUTPUT_PIXELS * 0.998 < width * height <= MAX_OUTPUT_PIXELS
    assert abs(width / height - shape[0] / shape[1]) < 0.002


def test_4_3_at_4mp_is_capped():
    assert 2366 * 1774 == 4_197_284
    assert resolve_output_size(aspect_ratio="4:3", resolution="4K") == cap_pixels(2366, 1774) == (2365, 1773)


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
@pytest.mark.parametrize("resolution", ["2K", "4K", "8K", "16K", "4", "4MP", "100", "1000000"])
def test_large_tiers_of_every_ratio_stay_within_4mp(ratio, resolution):
    width, height = resolve_output_size(aspect_ratio=ratio, resolution=resolution)
    assert width * height <= MAX_OUTPUT_PIXELS
    assert width * height > MAX_OUTPUT_PIXELS * 0.99


# --- nearest ratio -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, nearest",
    [
        ("7:5", "4:3"),
        ("2.39:1", "21:9"),
        ("1:1.05", "1:1"),
        ("10:1", "21:9"),
        ("1:10", "9:21"),
        ("1920:1080", "16:9"),
        ("1080:1920", "9:16"),
        ("2:1", "16:9"),
        ("1:2", "9:16"),
        ("1.85:1", "16:9"),
        ("2.2:1", "21:9"),
        ("1.4:1", "4:3"),
        ("1.45:1", "3:2"),
        ("1.1:1", "1:1"),
        ("1.15:1", "5:4"),
        ("3000:2000", "3:2"),
        ("640:480", "4:3"),
        ("8:10", "4:5"),
        ("6:4", "3:2"),
        (" 16 : 9 ", "16:9"),
        ("16.0:9.0", "16:9"),
        ("1.:1", "1:1"),
        (".5:1", "9:16"),
        ("1000000:1", "21:9"),
        ("1:1000000", "9:21"),
        ("0.001:0.001", "1:1"),
    ],
)
def test_nearest_ratio_in_log_space(given, nearest):
    assert resolve_output_size(aspect_ratio=given) == ALL_1MP[nearest]
    assert resolve_output_size(size=given) == ALL_1MP[nearest]


@pytest.mark.parametrize("given", ["7:5", "2.39:1", "1:1.05", "10:1", "1.85:1", "1.15:1", "1.45:1", "3:5", "7:3"])
def test_nearest_ratio_matches_a_log_space_search(given):
    w, h = (float(part) for part in given.split(":"))
    expected = min(
        ASPECT_RATIOS, key=lambda key: abs(math.log(w / h) - math.log(int(key.split(":")[0]) / int(key.split(":")[1])))
    )
    assert resolve_output_size(aspect_ratio=given) == ALL_1MP[expected]


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_every_supported_ratio_maps_to_itself(ratio):
    w, h = ratio.split(":")
    scaled = f"{int(w) * 3}:{int(h) * 3}"
    assert resolve_output_size(aspect_ratio=scaled) == ALL_1MP[ratio]


# --- nearest tier ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resolution, side",
    [
        ("0.5K", 512),
        ("1K", 1024),
        ("1.5K", 2048),
        ("2K", 2048),
        ("4K", 2048),
        ("8K", 2048),
        ("0.1K", 512),
        ("0.1", 512),
        ("0.25", 512),
        ("0.3", 512),
        ("0.4", 512),
        ("0.5", 1024),
        ("0.6", 1024),
        ("1", 1024),
        ("1.9", 1024),
        ("2", 2048),
        ("3", 2048),
        ("4", 2048),
        ("100", 2048),
        ("2.5 MP", 2048),
        ("0.25 MP", 512),
        ("4mp", 2048),
        ("1 megapixel", 1024),
        ("4 Megapixels", 2048),
        ("0.7K", 512),
        ("0.71K", 1024),
        ("1.41K", 1024),
        ("1.42K", 2048),
        (" 2k ", 2048),
        ("auto", 1024),
        ("Auto", 1024),
        (None, 1024),
        ("1.", 1024),
        (".25", 512),
    ],
)
def test_nearest_tier_in_log_space(resolution, side):
    assert resolve_output_size(aspect_ratio="1:1", resolution=resolution) == (side, side)
    assert resolve_output_size(resolution=resolution) == (side, side)


@pytest.mark.parametrize("resolution, side", [("0.5", 1024), ("2", 2048), ("2 MP", 2048), ("0.5MP", 1024)])
def test_an_exact_tie_picks_the_larger_tier(resolution, side):
    assert resolve_output_size(resolution=resolution) == (side, side)


# --- size WxH ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ("1024x1024", (1024, 1024)),
        ("1x1", (1, 1)),
        ("48x32", (48, 32)),
        ("1000x1001", (1000, 1001)),
        ("2048x2048", (2048, 2048)),
        ("14142x1", (14142, 1)),
        ("1x14142", (1, 14142)),
        (" 800 X 600 ", (800, 600)),
        ("1920×1080", (1920, 1080)),
        ("4096x1024", (4096, 1024)),
        ("1000x4194", (1000, 4194)),
    ],
)
def test_size_is_delivered_exactly_up_to_4mp(size, expected):
    assert resolve_output_size(size=size) == expected
    assert resolve_output_size(size=size, reference_size=(3000, 2000)) == expected


@pytest.mark.parametrize("size", ["4000x3000", "14142x14142", "2049x2048", "14142x297", "3000x3000", "5000x1000"])
def test_size_above_4mp_is_capped_keeping_aspect(size):
    w, h = parse_wxh(size)
    width, height = resolve_output_size(size=size)
    assert (width, height) == cap_pixels(w, h)
    assert width * height <= MAX_OUTPUT_PIXELS
    assert width * height > MAX_OUTPUT_PIXELS * 0.99
    assert abs(width / height - w / h) < 0.01 * (w / h)


def test_square_14142_is_capped_to_about_2048():
    width, height = resolve_output_size(size="14142x14142")
    assert width == height and 2046 <= width <= 2048


@pytest.mark.parametrize(
    "others",
    [
        {"aspect_ratio": "16:9"},
        {"resolution": "4K"},
        {"width": 512, "height": 512},
        {"aspect_ratio": "custom", "width": 512, "height": 256},
        {"aspect_ratio": "21:9", "resolution": "0.25"},
        {"reference_size": (3000, 2000)},
        {"aspect_ratio": "9:16", "resolution": "2K", "width": 64, "height": 64, "reference_size": (640, 480)},
    ],
)
def test_size_wxh_wins_over_everything(others):
    assert resolve_output_size(size="800x600", **others) == (800, 600)


@pytest.mark.parametrize(
    "others",
    [
        {"aspect_ratio": "garbage"},
        {"resolution": "-1"},
        {"width": 0},
        {"height": True},
        {"aspect_ratio": "custom"},
    ],
)
def test_size_wxh_ignores_parameters_it_overrides(others):
    assert resolve_output_size(size="800x600", **others) == (800, 600)


@pytest.mark.parametrize("size", [None, "auto", "AUTO", " Auto "])
def test_size_auto_means_not_given(size):
    assert resolve_output_size(size=size) == (1024, 1024)
    assert resolve_output_size(size=size, aspect_ratio="16:9") == (1365, 768)
    assert resolve_output_size(size=size, resolution="0.25") == (512, 512)
    assert resolve_output_size(size=size, width=1000, height=500) == (1008, 496)
    assert resolve_output_size(size=size, reference_size=(640, 480)) == (640, 480)


def test_size_ratio_is_the_same_as_aspect_ratio():
    for ratio in ("16:9", "2.39:1", "7:5", "1:3"):
        for resolution in (None, "0.25", "1K", "4K"):
            for reference in (None, (640, 480), (6000, 4000)):
                assert resolve_output_size(
                    size=ratio, resolution=resolution, reference_size=reference
                ) == resolve_output_size(aspect_ratio=ratio, resolution=resolution, reference_size=reference)


def test_size_ratio_wins_over_aspect_ratio_and_width_height():
    assert resolve_output_size(size="16:9", aspect_ratio="1:1") == (1365, 768)
    assert resolve_output_size(size="16:9", aspect_ratio="custom", width=64, height=64) == (1365, 768)
    assert resolve_output_size(size="9:16", resolution="4K", width=64, height=64) == (1536, 2730)


# --- aspect ratio + resolution over width/height -----------------------------------------------------------------


def test_aspect_ratio_wins_over_width_and_height():
    assert resolve_output_size(aspect_ratio="16:9", width=64, height=64) == (1365, 768)
    assert resolve_output_size(aspect_ratio="16:9", width=64) == (1365, 768)


@pytest.mark.parametrize("resolution", [None, "auto", "1K", "4K", "0.25"])
def test_custom_uses_width_and_height(resolution):
    assert resolve_output_size(aspect_ratio="custom", width=512, height=768, resolution=resolution) == (512, 768)
    assert resolve_output_size(aspect_ratio=" Custom ", width=512, height=768) == (512, 768)


def test_width_and_height_win_over_a_lone_resolution():
    assert resolve_output_size(width=512, height=256, resolution="4K") == (512, 256)
    assert resolve_output_size(width=512, height=256, reference_size=(3000, 2000)) == (512, 256)


# --- width / height ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "side, rounded",
    [
        (1, 16),
        (7, 16),
        (8, 16),
        (9, 16),
        (16, 16),
        (23, 16),
        (24, 32),
        (25, 32),
        (100, 96),
        (1000, 1008),
        (1007, 1008),
        (1008, 1008),
        (1015, 1008),
        (1016, 1024),
        (1024, 1024),
        (1500, 1504),
        (2000, 2000),
    ],
)
def test_width_and_height_round_half_up_to_a_multiple_of_16(side, rounded):
    assert resolve_output_size(width=side, height=64) == (rounded, 64)
    assert resolve_output_size(width=64, height=side) == (64, rounded)
    assert resolve_output_size(aspect_ratio="custom", width=side, height=side) == (rounded, rounded)


def test_1000x1000_rounds_to_1008():
    assert resolve_output_size(width=1000, height=1000) == (1008, 1008)


def test_width_and_height_never_round_past_the_largest_side():
    assert resolve_output_size(width=14142, height=16) == (14128, 16)
    assert resolve_output_size(width=16, height=14136) == (16, 14128)
    assert resolve_output_size(width=14120, height=16) == (14128, 16)


@pytest.mark.parametrize("width, height", [(4000, 3000), (14142, 14142), (2064, 2048), (8000, 600)])
def test_width_and_height_are_capped_at_4mp(width, height):
    result = resolve_output_size(width=width, height=height)
    assert result[0] * result[1] <= MAX_OUTPUT_PIXELS
    rounded = (_round_half_up(width / 16) * 16, _round_half_up(height / 16) * 16)
    assert result == cap_pixels(min(rounded[0], 14128), min(rounded[1], 14128))


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"width": 512}, "height"),
        ({"height": 512}, "width"),
        ({"aspect_ratio": "custom"}, "width"),
        ({"aspect_ratio": "custom", "width": 512}, "height"),
        ({"aspect_ratio": "custom", "height": 512}, "width"),
        ({"width": 512, "resolution": "1K"}, "height"),
        ({"height": 512, "reference_size": (640, 480)}, "width"),
    ],
)
def test_a_missing_width_or_height_is_named(kwargs, param):
    assert _error_param(**kwargs) == param


@pytest.mark.parametrize("value", [0, -1, -16, 14143, 100000, True, False, 512.0, "512", "auto"])
@pytest.mark.parametrize("param", ["width", "height"])
def test_invalid_width_or_height_is_named(value, param):
    other = "height" if param == "width" else "width"
    assert _error_param(**{param: value, other: 512}) == param
    assert _error_param(aspect_ratio="custom", **{param: value, other: 512}) == param


# --- edits -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, expected",
    [
        ((640, 480), (640, 480)),
        ((1, 1), (1, 1)),
        ((1023, 777), (1023, 777)),
        ((2048, 2048), (2048, 2048)),
        ((3000, 2000), cap_pixels(3000, 2000)),
        ((14142, 14142), cap_pixels(14142, 14142)),
    ],
)
def test_edits_default_to_the_reference_size_capped(reference, expected):
    assert resolve_output_size(reference_size=reference) == expected
    assert resolve_output_size(reference_size=reference, resolution="auto", size="auto") == expected


def test_edits_reference_3000x2000_is_capped_keeping_aspect():
    width, height = resolve_output_size(reference_size=(3000, 2000))
    assert (width, height) == (2508, 1672)
    assert MAX_OUTPUT_PIXELS * 0.998 < width * height <= MAX_OUTPUT_PIXELS
    assert abs(width / height - 1.5) < 0.001


def test_edits_with_a_resolution_keep_the_reference_aspect():
    assert resolve_output_size(resolution="1K", reference_size=(1600, 900)) == (1365, 768)
    assert resolve_output_size(resolution="0.25", reference_size=(1600, 900)) == (683, 384)
    # 2731x1536 would be 4,194,816 px, just over 4 MP: capped.
    assert resolve_output_size(resolution="4K", reference_size=(1600, 900)) == cap_pixels(2731, 1536) == (2730, 1535)
    assert resolve_output_size(resolution="1", reference_size=(500, 500)) == (1024, 1024)
    assert resolve_output_size(resolution="4MP", reference_size=(640, 480)) == cap_pixels(2365, 1774)


@pytest.mark.parametrize("reference", [(1600, 900), (640, 480), (3000, 2000), (1, 1), (777, 333), (100, 4000)])
@pytest.mark.parametrize("resolution, megapixels", [("0.5K", 0.25), ("1K", 1), ("2K", 4), ("4", 4)])
def test_edits_with_a_resolution_follow_the_formula(reference, resolution, megapixels):
    area = megapixels * MEGAPIXEL
    exact_w = math.sqrt(area * reference[0] / reference[1])
    expected = cap_pixels(_round_half_up(exact_w), _round_half_up(area / exact_w))
    result = resolve_output_size(resolution=resolution, reference_size=reference)
    assert result == expected
    assert abs(result[0] * result[1] - area) / area < 0.01
    assert abs(result[0] / result[1] - reference[0] / reference[1]) < 0.01 * reference[0] / reference[1]


def test_edits_with_an_aspect_ratio_use_the_reference_area():
    assert resolve_output_size(aspect_ratio="16:9", reference_size=(1024, 1024)) == (1365, 768)
    assert resolve_output_size(aspect_ratio="1:1", reference_size=(2048, 2048)) == (2048, 2048)
    assert resolve_output_size(aspect_ratio="1:1", reference_size=(6000, 4000)) == (2048, 2048)
    assert resolve_output_size(aspect_ratio="1:1", reference_size=(1024, 256)) == (512, 512)
    factor = math.sqrt(640 * 480 / MEGAPIXEL)
    assert resolve_output_size(aspect_ratio="16:9", reference_size=(640, 480)) == (
        _round_half_up(1365 * factor),
        _round_half_up(768 * factor),
    )


def test_edits_with_an_aspect_ratio_and_a_resolution_use_the_tier():
    assert resolve_output_size(aspect_ratio="16:9", resolution="1K", reference_size=(640, 480)) == (1365, 768)
    assert resolve_output_size(aspect_ratio="1:1", resolution="0.25", reference_size=(6000, 4000)) == (512, 512)


def test_text_to_image_with_only_a_resolution_is_square():
    assert resolve_output_size(resolution="0.25") == (512, 512)
    assert resolve_output_size(resolution="1K") == (1024, 1024)
    assert resolve_output_size(resolution="4K") == (2048, 2048)


def test_text_to_image_default():
    assert resolve_output_size() == (1024, 1024)


@pytest.mark.parametrize("reference", [(0, 10), (10, -1), (10,), (1.5, 10), (True, 10), (10, 10, 3)])
def test_a_bad_reference_size_is_a_programming_error(reference):
    with pytest.raises(ValueError):
        resolve_output_size(reference_size=reference)


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        "",
        " ",
        "1024",
        "0x10",
        "10x0",
        "14143x10",
        "axb",
        "-1x5",
        "1024x1024x3",
        "1e3x5",
        "custom",
        "big",
        "0:1",
        "1:0",
        "-16:9",
        "16:-9",
        "a:b",
        "16:9:1",
        ":9",
        "16:",
        "1e3:1",
        "nan:1",
        "inf:1",
        1024,
        16.9,
        ("16", "9"),
    ],
)
def test_bad_sizes_name_size(size):
    assert _error_param(size=size) == "size"
    assert _error_param(size=size, aspect_ratio="16:9", width=64, height=64) == "size"


@pytest.mark.parametrize(
    "ratio",
    [
        "",
        " ",
        "16",
        "1.5",
        "16x9",
        "0:1",
        "1:0",
        "0:0",
        "-16:9",
        "16:-9",
        "a:b",
        "16:9:1",
        ":9",
        "16:",
        "1e3:1",
        "nan:1",
        "inf:1",
        "auto",
        "16/9",
        "1 6:9",
        "１６:９",  # noqa: RUF001 - fullwidth digits on purpose: they must be refused
        1.5,
        16,
    ],
)
def test_bad_aspect_ratios_name_aspect_ratio(ratio):
    assert _error_param(aspect_ratio=ratio) == "aspect_ratio"
    assert _error_param(aspect_ratio=ratio, width=64, height=64, resolution="1K") == "aspect_ratio"


@pytest.mark.parametrize(
    "resolution",
    [
        "",
        " ",
        "0",
        "0K",
        "0MP",
        "0.0",
        "-1",
        "-1K",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1e3",
        "K",
        "MP",
        "1KK",
        "1 K MP",
        "4M",
        "1GP",
        "one",
        "1,5",
        "1/2",
        1,
        1.0,
        float("nan"),
        float("inf"),
    ],
)
def test_bad_resolutions_name_resolution(resolution):
    assert _error_param(resolution=resolution) == "resolution"
    assert _error_param(resolution=resolution, aspect_ratio="16:9") == "resolution"
    assert _error_param(resolution=resolution, reference_size=(640, 480)) == "resolution"
    assert _error_param(size="4:3", resolution=resolution) == "resolution"


def test_error_messages_quote_the_value():
    with pytest.raises(SizeError, match="7x"):
        resolve_output_size(size="7x")
    with pytest.raises(SizeError, match="16/9"):
        resolve_output_size(aspect_ratio="16/9")
    with pytest.raises(SizeError, match="banana"):
        resolve_output_size(resolution="banana")
    with pytest.raises(SizeError, match="14143"):
        resolve_output_size(width=14143, height=16)


def test_every_argument_is_keyword_only():
    with pytest.raises(TypeError):
        resolve_output_size("1024x1024")  # type: ignore[misc]


# --- invariants --------------------------------------------------------------------------------------------------

_RESOLUTIONS = [None, "auto", "0.1", "0.25", "0.5K", "1K", "1", "2", "2.5 MP", "2K", "4K", "8K"]
_REFERENCES = [
    None,
    (1, 1),
    (640, 480),
    (1600, 900),
    (3000, 2000),
    (14142, 14142),
    (14142, 1),
    (1, 14142),
    (100000, 3),
    (3, 100000),
    (20000, 20000),
]


@pytest.mark.parametrize("reference", _REFERENCES)
@pytest.mark.parametrize("resolution", _RESOLUTIONS)
@pytest.mark.parametrize("ratio", [None, *ASPECT_RATIOS, "2.39:1", "1000:1", "1:1000"])
def test_every_result_is_deliverable(reference, resolution, ratio):
    width, height = resolve_output_size(aspect_ratio=ratio, resolution=resolution, reference_size=reference)
    assert isinstance(width, int) and isinstance(height, int)
    assert 1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE
    assert width * height <= MAX_OUTPUT_PIXELS


@pytest.mark.parametrize("width", [1, 8, 15, 999, 4096, 14136, 14142])
@pytest.mark.parametrize("height", [1, 17, 1000, 14142])
def test_every_width_height_result_is_deliverable(width, height):
    w, h = resolve_output_size(aspect_ratio="custom", width=width, height=height)
    assert 1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE
    assert w * h <= MAX_OUTPUT_PIXELS


@pytest.mark.parametrize("size", ["1x1", "1x14142", "14142x1", "14142x14142", "2049x2049", "4095x1025"])
def test_every_size_result_is_deliverable(size):
    w, h = resolve_output_size(size=size)
    assert 1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE
    assert w * h <= MAX_OUTPUT_PIXELS


# --- pricing -----------------------------------------------------------------------------------------------------


# Note: three published "1 MP" shapes (4:3, 5:4, 4:5) are a little over 1,048,576 px, so they bill 2 MP.
@pytest.mark.parametrize(
    "width, height, expected",
    [
        (1024, 1024, 1),
        (1025, 1024, 2),
        (2048, 2048, 4),
        (16, 16, 1),
        (1, 1, 1),
        (512, 512, 1),
        (1365, 768, 1),
        (1183, 887, 2),
        (1145, 916, 2),
        (916, 1145, 2),
        (887, 1182, 1),
        (2048, 1024, 2),
        (2049, 1024, 3),
        (2365, 1773, 4),
        (14142, 1, 1),
        (1536, 2730, 4),
        (1024, 1025, 2),
        (0, 0, 1),
    ],
)
def test_billable_megapixels(width, height, expected):
    assert billable_megapixels(width, height) == expected


def test_billable_megapixels_minimum():
    assert billable_megapixels(16, 16, minimum=2) == 2
    assert billable_megapixels(2048, 2048, minimum=2) == 4
    assert billable_megapixels(16, 16, minimum=0) == 1
    assert billable_megapixels(0, 0, minimum=0) == 0
