"""POST /v1/images/variations through the official OpenAI SDK (`images.create_variation`): an edit of one image with
a neutral prompt and a new seed per image; its errors in OpenAI's envelope."""

from __future__ import annotations

import base64
import hashlib

import httpx
import numpy as np
import openai
import pytest
from hostile_images import png
from imaging import decode_b64, pixels

from pipeline.file_metadata import read_metadata
from server.variations import VARIATION_PROMPT

STEPS = {"num_inference_steps": 2}
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks create_variation


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_two_variations_of_the_requested_size_differ(client):
    source = png(64, 48)
    result = client.images.create_variation(
        image=("in.png", source, "image/png"), n=2, size="256x256", response_format="b64_json", extra_body=STEPS
    )
    first, second = (decode_b64(item.b64_json) for item in result.data)
    assert first.size == second.size == (256, 256) and result.size == "256x256"
    assert not np.array_equal(pixels(first), pixels(second))
    assert result.data[1].seed == result.data[0].seed + 1
    assert result.data[0].revised_prompt == VARIATION_PROMPT
    record = read_metadata(base64.b64decode(result.data[0].b64_json))
    assert (record["mode"], record["prompt"]) == ("variation", VARIATION_PROMPT)
    assert record["references"] == [hashlib.sha256(source).hexdigest()]


def test_default_size_is_the_image_s_and_a_seed_reproduces(client):
    kwargs = {"image": ("in.png", png(80, 48), "image/png"), "response_format": "b64_json"}
    once = client.images.create_variation(**kwargs, extra_body={"seed": 12, **STEPS})
    again = client.images.create_variation(**kwargs, extra_body={"seed": 12, **STEPS})
    assert once.size == "80x48" and once.data[0].seed == 12
    assert np.array_equal(pixels(decode_b64(once.data[0].b64_json)), pixels(decode_b64(again.data[0].b64_json)))
    fresh = client.images.create_variation(**kwargs, extra_body=STEPS)
    assert fresh.data[0].seed != 12


def test_a_variation_is_the_edit_with_the_neutral_prompt(client):
    image = ("in.png", png(64, 64), "image/png")
    variation = client.images.create_variation(image=image, response_format="b64_json", extra_body={"seed": 4, **STEPS})
    edit = client.images.edit(
        image=image, prompt=VARIATION_PROMPT, response_format="b64_json", extra_body={"seed": 4, **STEPS}
    )
    assert np.array_equal(pixels(decode_b64(variation.data[0].b64_json)), pixels(decode_b64(edit.data[0].b64_json)))


def test_url_responses_work(client):
    result = client.images.create_variation(image=("in.png", png(32, 32), "image/png"), extra_body=STEPS)
    assert httpx.get(result.data[0].url).status_code == 200


@pytest.mark.parametrize(
    "form, files, status, param, code",
    [
        ({"n": "1"}, None, 400, "image", "missing_required_parameter"),
        ({}, [("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))], 400, "image", None),
        ({"prompt": "a cat"}, [("image", ("a.png", png(), "image/png"))], 400, "prompt", "unsupported_parameter"),
        ({}, [("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png(), "image/png"))], 400, "mask", None),
        ({"size": "huge"}, [("image", ("a.png", png(), "image/png"))], 400, "size", None),
        ({"n": "11"}, [("image", ("a.png", png(), "image/png"))], 400, "n", None),
        ({}, [("image", ("a.txt", b"not an image", "text/plain"))], 400, "image", "invalid_image"),
        ({"model": "dall-e-2"}, [("image", ("a.png", png(), "image/png"))], 404, "model", "model_not_found"),
    ],
)
def test_errors_use_the_openai_envelope(server, form, files, status, param, code):
    response = httpx.post(f"{server.base_url}/v1/images/variations", data=form, files=files, timeout=60)
    assert_error(response, status, param, code)


def test_a_json_body_is_refused_clearly(server):
    response = httpx.post(f"{server.base_url}/v1/images/variations", json={"image": "x"}, timeout=30)
    assert_error(response, 400, "image", "invalid_content_type")


def test_the_sdk_raises_its_error_type(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.create_variation(image=("in.png", b"garbage", "image/png"))
    assert caught.value.body["param"] == "image"


def test_openapi_documents_the_route(server):
    operation = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]["/v1/images/variations"]["post"]
    assert "neutral prompt" in operation["description"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["image"] and "prompt" not in schema["properties"]
    assert "ErrorResponse" in str(operation["responses"]["400"])
