"""The FLUX.2 [flex] parameter surface through the official SDK: sizes, formats, usage, controls."""

from __future__ import annotations

import base64
import io
import math

import httpx
import numpy as np
import openai
import pytest
from imaging import decode_b64, decode_bytes, generate, pixels
from PIL import Image

ONE_STEP = {"num_inference_steps": 1}

SEED_1K_TABLE = {
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


@pytest.mark.parametrize("ratio", sorted(SEED_1K_TABLE))
def test_seed_1k_sizes_via_size_and_via_aspect_ratio_plus_resolution(client, ratio):
    width, height = SEED_1K_TABLE[ratio]
    by_size = generate(client, prompt="x", size=f"{width}x{height}", response_format="b64_json", **ONE_STEP)
    by_shape = generate(client, prompt="x", aspect_ratio=ratio, resolution="1K", response_format="b64_json", **ONE_STEP)
    for result in (by_size, by_shape):
        assert decode_b64(result.data[0].b64_json).size == (width, height)
        assert result.size == f"{width}x{height}"


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"aspect_ratio": "7:5"}, (1183, 887)),  # nearest supported ratio in log space: 4:3, not 3:2
        ({"aspect_ratio": "1.45:1"}, (1254, 836)),  # 3:2
        ({"aspect_ratio": "2.39:1"}, (1563, 670)),  # 21:9
        ({"size": "16:9"}, (1365, 768)),  # W:H in size = aspect_ratio
        ({"aspect_ratio": "1:1", "resolution": "0.5K"}, (512, 512)),
        ({"aspect_ratio": "1:1", "resolution": "0.25"}, (512, 512)),
        ({"resolution": "4K"}, (2048, 2048)),  # 16 MP maps to the 4 MP tier
        ({"aspect_ratio": "custom", "width": 1000, "height": 500}, (1008, 496)),
        ({"size": "64x48", "aspect_ratio": "16:9", "resolution": "4K"}, (64, 48)),  # size always wins
        ({"size": "4000x3000"}, (2364, 1773)),  # above 4 MP: scaled to 4 MP, aspect kept
    ],
)
def test_size_forms(client, params, expected):
    result = generate(client, prompt="x", response_format="b64_json", **params, **ONE_STEP)
    image = decode_b64(result.data[0].b64_json)
    assert image.size == expected
    assert image.size[0] * image.size[1] <= 4 * 1024 * 1024


@pytest.mark.parametrize(
    "params, param",
    [
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"resolution": "huge"}, "resolution"),
        ({"aspect_ratio": "custom", "width": 512}, "height"),
        ({"width": 0, "height": 64}, "width"),
        ({"size": "15000x10"}, "size"),
        ({"output_format": "bmp"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"safety_tolerance": 6}, "safety_tolerance"),
        ({"enable_safety_checker": "maybe"}, "enable_safety_checker"),
        ({"quality": "ultra"}, "quality"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"steps": 0}, "steps"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),  # the second image's seed would be 2**63
    ],
)
def test_out_of_range_values_name_the_parameter(client, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, prompt="x", **params)
    assert caught.value.body["param"] == param


@pytest.mark.parametrize(
    "output_format, pil_format, media_type",
    [
        ("png", "PNG", "image/png"),
        ("jpeg", "JPEG", "image/jpeg"),
        ("jpg", "JPEG", "image/jpeg"),
        ("webp", "WEBP", "image/webp"),
        ("gif", "GIF", "image/gif"),
        ("avif", "AVIF", "image/avif"),
    ],
)
def test_every_output_format_agrees_in_bytes_content_type_and_response(client, output_format, pil_format, media_type):
    result = generate(client, prompt="x", size="72x40", extra_body={"output_format": output_format}, **ONE_STEP)
    assert result.output_format == ("jpeg" if output_format == "jpg" else output_format)
    served = httpx.get(result.data[0].url)
    assert served.headers["content-type"] == media_type
    image = decode_bytes(served.content)
    assert (image.format, image.size) == (pil_format, (72, 40))


def test_output_compression_and_quality_set_the_lossy_quality(client):
    def jpeg_bytes(**quality):
        result = generate(
            client,
            prompt="x",
            size="256x256",
            seed=1,
            output_format="jpeg",
            response_format="b64_json",
            **quality,
            **ONE_STEP,
        )
        return len(base64.b64decode(result.data[0].b64_json))

    assert jpeg_bytes(output_compression=10) < jpeg_bytes(output_compression=95)
    assert jpeg_bytes(output_quality=10) == jpeg_bytes(output_compression=10)


def test_usage_counts_tokens_and_megapixels(client):
    result = generate(
        client, prompt="a cat on a red sofa", size="1040x1040", n=2, response_format="b64_json", **ONE_STEP
    )
    usage = result.usage
    assert usage.input_tokens_details.text_tokens > 0
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.output_tokens == 2 * (1040 // 16) * (1040 // 16)
    assert usage.input_tokens == usage.input_tokens_details.text_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    extra = usage.model_extra
    assert extra["output_megapixels"] == 2 * 2  # 1040x1040 is just over 1 MP: rounds up to 2, per image
    assert extra["reference_megapixels"] == 0
    assert extra["billed_megapixels"] == 4
    assert (result.quality, result.background) == ("low", "opaque")  # 1 step of the model's default 4


def test_edit_inputs_over_4mp_are_scaled_to_4mp(client):
    big = Image.fromarray(np.random.RandomState(0).randint(0, 255, (2000, 3000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=80)
    result = client.images.edit(
        image=("big.jpg", buffer.getvalue()), prompt="x", response_format="b64_json", extra_body=ONE_STEP
    )
    width, height = decode_b64(result.data[0].b64_json).size
    assert width * height <= 4 * 1024 * 1024 < (width + 2) * (height + 2)
    assert math.isclose(width / height, 1.5, rel_tol=0.01)
    assert result.usage.model_extra["reference_megapixels"] == 4
    assert result.usage.model_extra["output_megapixels"] == 4


def test_sync_mode_returns_a_data_uri_and_stores_nothing(client, server):
    outputs = server.output_dir
    before = set(outputs.iterdir()) if outputs.exists() else set()
    result = generate(client, prompt="x", size="40x40", sync_mode=True, output_format="webp", **ONE_STEP)
    url = result.data[0].url
    assert url.startswith("data:image/webp;base64,")
    assert decode_bytes(base64.b64decode(url.split(",", 1)[1])).size == (40, 40)
    after = set(outputs.iterdir()) if outputs.exists() else set()
    assert after == before


def test_unknown_parameters_are_ignored_and_reported(server):
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        timeout=60,
        json={
            "prompt": "x",
            "size": "32x32",
            "num_inference_steps": 1,
            "lora": "style.safetensors",
            "foo": 1,
            "style": "vivid",
            "moderation": "low",
            "user": "u1",
            "background": "auto",
            "safety_tolerance": "3",
            "enable_safety_checker": True,
            "prompt_enhancement": "off",
        },
    )
    assert response.status_code == 200, response.text
    # Unknown fields, and known ones that were set but are not acted on here (background "auto" is honoured).
    assert response.headers["x-flux2-ignored-params"] == (
        "enable_safety_checker, foo, lora, moderation, safety_tolerance, style, user"
    )
    warnings = response.json()["warnings"]
    assert any("'foo', 'lora'" in w for w in warnings)
    for name in ("moderation", "user", "style", "safety_tolerance", "enable_safety_checker"):
        assert sum(name in w for w in warnings) == 1, (name, warnings)


@pytest.mark.parametrize(
    "params, ignored, words",
    [
        ({"steps": 3, "num_inference_steps": 1}, "steps", "num_inference_steps was given too"),
        # On this distilled klein guidance is unused whatever its spelling: both are named (test below).
        ({"cfg_scale": 3.0, "guidance_scale": 1.0}, "cfg_scale, guidance_scale", "guidance_scale was given too"),
        (
            {"output_format": "jpeg", "output_quality": 20, "output_compression": 90},
            "output_quality",
            "output_compression was given too",
        ),
        ({"output_compression": 30}, "output_compression", "not to png"),
        ({"output_format": "gif", "output_quality": 30}, "output_quality", "not to gif"),
        ({"quality": "low"}, "quality", "num_inference_steps sets the steps"),
        ({"aspect_ratio": "16:9"}, "aspect_ratio", "size '32x32' sets the size"),
        ({"resolution": "abc"}, "resolution", "size '32x32' sets the size"),
        ({"partial_images": 2}, "partial_images", "streamed responses only"),
    ],
)
def test_a_parameter_that_loses_to_another_or_does_not_apply_is_reported(client, params, ignored, words):
    """Two spellings of one setting with different values: the documented one wins and the other is reported as
    ignored; a lossy quality on a lossless format, a quality preset beside explicit steps and the size fields an
    exact size overrides likewise. The same values twice say nothing."""
    raw = client.images.with_raw_response.generate(
        prompt="x", size="32x32", response_format="b64_json", extra_body={"num_inference_steps": 1, **params}
    )
    assert raw.headers["x-flux2-ignored-params"] == ignored
    warnings = raw.parse().model_extra["warnings"]
    assert [w for w in warnings if w.startswith(ignored.split(",")[0])] and any(words in w for w in warnings), warnings
    same = client.images.with_raw_response.generate(
        prompt="x", size="32x32", response_format="b64_json", extra_body={"num_inference_steps": 1, "steps": 1}
    )
    assert "x-flux2-ignored-params" not in same.headers


@pytest.mark.parametrize("name", ["guidance_scale", "cfg_scale"])
def test_guidance_on_a_distilled_klein_is_reported_as_unused(client, name):
    """A distilled klein (the tiny default) runs without guidance: diffusers drops the value with a log line only,
    so the answer says so, and the image is the one without it. (dev uses it: tests/test_dev_model.py.)"""

    def made(**extra):
        return client.images.with_raw_response.generate(
            prompt="x", size="32x32", response_format="b64_json", extra_body={"seed": 4, **ONE_STEP, **extra}
        )

    raw, plain = made(**{name: 7.5}), made()
    assert raw.headers["x-flux2-ignored-params"] == name
    assert (
        f"{name} is not used: this distilled klein model runs without guidance." in raw.parse().model_extra["warnings"]
    )
    assert np.array_equal(
        pixels(decode_b64(raw.parse().data[0].b64_json)), pixels(decode_b64(plain.parse().data[0].b64_json))
    )
    assert "x-flux2-ignored-params" not in plain.headers


def test_transparent_background_is_reported_as_not_honoured(client):
    raw = client.images.with_raw_response.generate(
        prompt="x", size="32x32", background="transparent", response_format="b64_json", extra_body=ONE_STEP
    )
    assert raw.headers["x-flux2-ignored-params"] == "background"
    result = raw.parse()
    assert decode_b64(result.data[0].b64_json).mode == "RGB"  # opaque, as said
    assert result.background == "opaque"
    assert any("transparent" in w for w in result.model_extra["warnings"])


def test_a_plain_request_has_no_warnings_and_no_ignored_header(client):
    raw = client.images.with_raw_response.generate(
        prompt="x", size="32x32", background="opaque", response_format="b64_json", extra_body=ONE_STEP
    )
    assert "x-flux2-ignored-params" not in raw.headers
    assert raw.parse().model_extra.get("warnings") is None


def test_long_prompts_are_truncated_and_say_so(client):
    prompt = " ".join(f"word{i}" for i in range(700))
    result = generate(client, prompt=prompt, size="32x32", response_format="b64_json", **ONE_STEP)
    revised = result.data[0].revised_prompt
    assert prompt.startswith(revised) and len(revised) < len(prompt)
    assert "512" in result.model_extra["warnings"][0]
    assert result.usage.input_tokens_details.text_tokens < 512


def test_quality_and_guidance_aliases_change_the_image(client):
    def image(**params):
        return decode_b64(
            generate(client, prompt="x", size="64x64", seed=3, response_format="b64_json", **params).data[0].b64_json
        )

    base = np.asarray(image(quality="high"), dtype=int)
    assert np.abs(base - np.asarray(image(quality="low"), dtype=int)).max() > 0
    assert np.array_equal(np.asarray(image(num_inference_steps=4), dtype=int), base)  # high = the default 4 steps
    assert np.array_equal(np.asarray(image(steps=2), dtype=int), np.asarray(image(quality="low"), dtype=int))


def test_ignored_parameter_names_are_safe_in_the_header(server):
    # Found by schemathesis: a non-latin-1 field name once broke the header (a 500).
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        timeout=60,
        json={"prompt": "x", "size": "16x16", "num_inference_steps": 1, "Ā": None, "a\r\nb": 1},
    )
    assert response.status_code == 200
    assert response.headers["x-flux2-ignored-params"] == "a%0D%0Ab, %C4%80"  # sorted by name


@pytest.mark.parametrize("prompt", ["x\x00y", "🦊 in the snow", "שלום עולם", "a\r\nb\tc", "[IMG] <|im_end|> </s>"])
def test_odd_but_valid_prompts_work(client, prompt):
    result = generate(client, prompt=prompt, size="16x16", response_format="b64_json", **ONE_STEP)
    assert decode_b64(result.data[0].b64_json).size == (16, 16)
