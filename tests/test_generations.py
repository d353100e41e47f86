"""POST /v1/images/generations through the official OpenAI Python SDK against a real server."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import openai
import pytest
from imaging import decode_b64, decode_bytes, generate, pixels

STEPS = {"num_inference_steps": 2}  # tiny weights: 2 steps are enough to test the plumbing


def test_b64_json_decodes_to_a_png_of_the_requested_size(client):
    result = generate(client, prompt="a red fox in snow", size="96x64", response_format="b64_json", **STEPS)
    assert len(result.data) == 1
    image = decode_b64(result.data[0].b64_json)
    assert image.format == "PNG"
    assert image.size == (96, 64)
    assert result.data[0].url is None
    assert result.data[0].revised_prompt == "a red fox in snow"
    assert result.output_format == "png"
    assert result.size == "96x64"
    assert abs(result.created - time.time()) < 120


def test_a_json_body_without_a_content_type_is_read_as_json(server):
    """`requests.post(url, data=json.dumps(body))` sends no Content-Type: the body is still the JSON it is."""
    body = b'{"prompt": "x", "size": "32x16", "num_inference_steps": 1, "response_format": "b64_json"}'
    answer = httpx.post(f"{server.base_url}/v1/images/generations", content=body, timeout=60)
    assert "content-type" not in answer.request.headers
    assert answer.status_code == 200, answer.text
    assert decode_b64(answer.json()["data"][0]["b64_json"]).size == (32, 16)


def test_url_is_the_default_and_serves_the_png(client, server):
    result = generate(client, prompt="a lighthouse", size="80x48", **STEPS)
    url = result.data[0].url
    assert url.startswith(f"{server.base_url}/v1/")
    assert result.data[0].b64_json is None
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = decode_bytes(response.content)
    assert (image.format, image.size) == ("PNG", (80, 48))


def test_url_follows_the_host_the_client_called(server):
    body = {"prompt": "x", "size": "32x32", **STEPS}
    url = httpx.post(
        f"{server.base_url}/v1/images/generations", json=body, headers={"Host": "gpu-box.lan:9999"}
    ).json()["data"][0]["url"]
    assert url.startswith("http://gpu-box.lan:9999/v1/images/files/")
    forwarded = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json=body,
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.studio.example"},
    )
    assert forwarded.json()["data"][0]["url"].startswith("https://images.studio.example/v1/images/files/")


def test_n_2_gives_two_different_images_with_consecutive_seeds(client):
    result = generate(client, prompt="two cats", size="64x64", n=2, seed=41, response_format="b64_json", **STEPS)
    assert len(result.data) == 2
    first, second = (pixels(decode_b64(d.b64_json)) for d in result.data)
    assert first.shape == second.shape == (64, 64, 3)
    assert abs(first - second).max() > 10
    assert [d.model_extra["seed"] for d in result.data] == [41, 42]


def test_same_seed_gives_byte_identical_pngs(client):
    kwargs = dict(prompt="a bowl of fruit", size="64x64", seed=1234, response_format="b64_json", **STEPS)
    first = generate(client, **kwargs).data[0].b64_json
    second = generate(client, **kwargs).data[0].b64_json
    assert base64.b64decode(first) == base64.b64decode(second)


def test_different_seeds_give_different_images(client):
    kwargs = dict(prompt="a bowl of fruit", size="64x64", response_format="b64_json", **STEPS)
    first = pixels(decode_b64(generate(client, seed=1, **kwargs).data[0].b64_json))
    second = pixels(decode_b64(generate(client, seed=2, **kwargs).data[0].b64_json))
    assert abs(first - second).max() > 10


def test_image_i_of_a_batch_equals_that_seed_alone(client):
    batch = generate(client, prompt="stars", size="64x64", n=3, seed=500, response_format="b64_json", **STEPS)
    alone = generate(client, prompt="stars", size="64x64", seed=502, response_format="b64_json", **STEPS)
    # fp32 batch matmuls may differ from single ones in the last bit: allow 2/255 per pixel.
    assert abs(pixels(decode_b64(batch.data[2].b64_json)) - pixels(decode_b64(alone.data[0].b64_json))).max() <= 2


def test_without_seed_each_image_reports_the_seed_that_reproduces_it(client):
    drawn = generate(client, prompt="a kite", size="64x64", response_format="b64_json", **STEPS)
    seed = drawn.data[0].model_extra["seed"]
    assert isinstance(seed, int)
    again = generate(client, prompt="a kite", size="64x64", seed=seed, response_format="b64_json", **STEPS)
    assert base64.b64decode(again.data[0].b64_json) == base64.b64decode(drawn.data[0].b64_json)


def test_model_ids_and_aliases_are_accepted(client):
    for model in [m.id for m in client.models.list()]:
        result = generate(client, model=model, prompt="x", size="32x32", response_format="b64_json", **STEPS)
        assert decode_b64(result.data[0].b64_json).size == (32, 32)


def test_default_size_is_1024_square(client):
    result = generate(client, prompt="x", response_format="b64_json", num_inference_steps=1)
    assert decode_b64(result.data[0].b64_json).size == (1024, 1024)


def test_odd_sizes_are_delivered_exactly(client):
    for size in ["1x1", "17x33", "250x13"]:
        result = generate(client, prompt="x", size=size, response_format="b64_json", **STEPS)
        width, height = map(int, size.split("x"))
        assert decode_b64(result.data[0].b64_json).size == (width, height)


def test_models_list(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny-klein"
    assert "flux.2-flex" in ids and "flux.2-klein" in ids
    assert client.models.retrieve("flux.2-flex").id == "flux.2-flex"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")


def test_missing_prompt_is_a_400_naming_prompt(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt=openai.omit, size="64x64")  # no prompt is sent
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "prompt"
    assert caught.value.body["code"] == "missing_required_parameter"


def test_unknown_model_is_a_404_naming_the_served_ids(client):
    with pytest.raises(openai.NotFoundError) as caught:
        generate(client, model="dall-e-3", prompt="x")
    body = caught.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "flux.2-flex" in body["message"] and "tiny-klein" in body["message"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"size": "big"}, "size"),
        ({"size": "0x64"}, "size"),
        ({"size": "20000x64"}, "size"),
        ({"seed": -1}, "seed"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"num_inference_steps": 100000}, "num_inference_steps"),
        ({"prompt": "   "}, "prompt"),
        ({"n": "many"}, "n"),
    ],
)
def test_bad_values_are_400s_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, **{"prompt": "x", **extra})
    assert caught.value.body["param"] == param
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_health_answers_while_a_generation_runs(client, server):
    done = threading.Event()
    outcome = {}

    def run_slow():
        try:
            outcome["result"] = generate(
                client, prompt="slow", size="1024x1024", response_format="b64_json", num_inference_steps=30
            )
        finally:
            done.set()

    worker = threading.Thread(target=run_slow)
    started = time.monotonic()
    worker.start()
    time.sleep(0.5)
    answered_during = 0
    while not done.is_set():
        t0 = time.monotonic()
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
        answered_during += not done.is_set()
        time.sleep(0.1)
    worker.join()
    assert answered_during >= 3, f"generation took {time.monotonic() - started:.1f}s: too short to observe"
    assert decode_b64(outcome["result"].data[0].b64_json).size == (1024, 1024)
