"""The safety checker: a tiny random ViT NSFW classifier built here screens the outputs of a real server. Its
thresholds are set so that, for one request of two images, tolerance 1 flags both (block), tolerance 2 (the
default) flags exactly one (withhold) and tolerance 3 neither (pass)."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import RunningServer
from engine_helpers import job, make_engine
from imaging import decode_b64, generate, pixels

from pipeline.safety import SafetyChecker, SafetyCheckerError, parse_thresholds
from server.protocol import ImageParameters
from server.safety_policy import decide_safety
from server.settings import Settings
from server.timing import parse_server_timing

REQUEST = {"prompt": "a beach at noon", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}


def build_classifier(folder, labels=("normal", "nsfw")):
    """A tiny random ViT image classifier with its image processor, saved as a model folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(40)  # spread the scores of different images apart
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("nsfw-classifier"))


@pytest.fixture(scope="module")
def plan(tiny_klein, classifier):
    """A seed whose two images score far apart, the images (as the server will make them) and their scores."""
    engine = make_engine(tiny_klein)
    checker = SafetyChecker.load(str(classifier))
    try:
        for seed in range(20, 40, 2):
            images = engine.submit(job(prompt=REQUEST["prompt"], seeds=(seed, seed + 1))).future.result(60).images
            scores = checker.unsafe_scores(images)
            if abs(scores[0] - scores[1]) > 0.003:  # far above float noise (1e-6)
                return seed, images, scores
    finally:
        engine.stop()
    raise AssertionError("no seed gave two images scored apart")


@pytest.fixture(scope="module")
def screening(tiny_klein, classifier, plan, tmp_path_factory):
    _, _, scores = plan
    middle = sum(scores) / 2
    args = ["--model", str(tiny_klein), "--safety-checker", str(classifier), "--safety-thresholds", f"0,{middle},1,1,1"]
    with RunningServer(args, tmp_path_factory.mktemp("screening")) as running:
        running.client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield running


def test_pass_all_images_returned_and_the_checker_shown(screening, classifier, plan):
    seed, images, _ = plan
    raw = screening.client.images.with_raw_response.generate(
        prompt=REQUEST["prompt"], n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": seed, "safety_tolerance": 3, "num_inference_steps": 2},
    )  # fmt: skip
    result = raw.parse()
    assert [item.seed for item in result.data] == [seed, seed + 1]
    assert "x-flux2-withheld" not in raw.headers and "withheld_images" not in result.model_extra
    assert "x-flux2-ignored-params" not in raw.headers
    assert parse_server_timing(raw.headers["server-timing"])["safety"][0] > 0
    entry = httpx.get(f"{screening.base_url}/v1/images/history/{raw.headers['x-flux2-history-id']}").json()
    assert entry["parameters"]["safety_tolerance"] == 3  # a re-run from it is screened the same way
    for item, image in zip(result.data, images, strict=True):
        assert np.array_equal(pixels(decode_b64(item.b64_json)), pixels(image))
    assert httpx.get(f"{screening.base_url}/health").json()["safety_checker"] == str(classifier)
    assert screening.client.models.list().data[0].model_extra["safety_checker"] == str(classifier)


def test_withhold_the_flagged_image_and_say_how_many(screening, plan):
    seed, images, scores = plan
    safe = 0 if scores[0] < scores[1] else 1
    raw = screening.client.images.with_raw_response.generate(
        prompt=REQUEST["prompt"], n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": 2},  # the default tolerance: 2
    )  # fmt: skip
    result = raw.parse()
    assert raw.headers["x-flux2-withheld"] == "1"
    assert result.model_extra["withheld_images"] == 1
    assert any("1 of 2 images was withheld" in w for w in result.model_extra["warnings"])
    (item,) = result.data
    assert item.model_extra["seed"] == seed + safe
    assert np.array_equal(pixels(decode_b64(item.b64_json)), pixels(images[safe]))

    events = list(generate(screening.client, **{**REQUEST, "n": 2, "seed": seed, "stream": True}))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert events[0].model_extra["seed"] == seed + safe and events[0].model_extra["withheld_images"] == 1


def test_block_when_every_image_is_flagged(screening, plan):
    seed = plan[0]
    with pytest.raises(openai.BadRequestError) as caught:
        generate(screening.client, **REQUEST, n=2, seed=seed, safety_tolerance=1)
    assert caught.value.status_code == 400
    assert caught.value.body["code"] == "moderation_blocked"
    assert caught.value.body["type"] == "image_generation_user_error"
    assert caught.value.body["param"] is None
    # A stream says it in its error event.
    with pytest.raises(openai.APIError) as streamed:
        list(generate(screening.client, **REQUEST, seed=seed, safety_tolerance=1, stream=True))
    assert "safety" in str(streamed.value)
    # Nor are its previews streamed: they would show what the image is withheld for.
    assert _stream_events(screening, seed, tolerance=1) == ["error"]
    assert _stream_events(screening, seed, tolerance=3) == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert httpx.get(f"{screening.base_url}/health").status_code == 200  # and the server keeps serving


def _stream_events(server, seed: int, tolerance: int) -> list[str]:
    body = {**REQUEST, "seed": seed, "stream": True, "partial_images": 2, "safety_tolerance": tolerance}
    body["num_inference_steps"] = 4
    with httpx.stream("POST", f"{server.base_url}/v1/images/generations", json=body, timeout=120) as response:
        text = "".join(response.iter_text())
    return [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]


def test_turning_the_checker_off_is_refused_unless_allowed(screening, plan, classifier):
    seed = plan[0]
    raw = screening.client.images.with_raw_response.generate(
        prompt=REQUEST["prompt"], n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": 2, "enable_safety_checker": False},
    )  # fmt: skip
    assert raw.headers["x-flux2-withheld"] == "1"  # it still ran
    assert raw.headers["x-flux2-ignored-params"] == "enable_safety_checker"
    assert any("not allowed on this server" in w for w in raw.parse().model_extra["warnings"])
    # With --allow-disable-safety the request is honoured: nothing screened.
    allowed = Settings(allow_disable_safety=True)
    off = ImageParameters(prompt="x", enable_safety_checker=False)
    assert decide_safety(off, str(classifier), allowed).tolerance is None
    assert decide_safety(off, str(classifier), Settings()).tolerance == 2
    assert decide_safety(ImageParameters(prompt="x", safety_tolerance=5), str(classifier), allowed).tolerance == 5


def test_without_a_checker_it_is_said_at_start_in_health_models_and_warnings(server, client):
    assert "no safety checker configured" in server.log()
    assert httpx.get(f"{server.base_url}/health").json()["safety_checker"] is None
    assert client.models.list().data[0].model_extra["safety_checker"] is None
    raw = client.images.with_raw_response.generate(
        prompt="x", size="32x32", response_format="b64_json",
        extra_body={"enable_safety_checker": True, "num_inference_steps": 1},
    )  # fmt: skip
    assert raw.headers["x-flux2-ignored-params"] == "enable_safety_checker"
    assert any("no safety checker runs on this server" in w for w in raw.parse().model_extra["warnings"])


def test_require_safety_checker_refuses_a_request_for_one(tiny_klein, tmp_path):
    with RunningServer(["--model", str(tiny_klein), "--require-safety-checker"], tmp_path) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as caught:
            generate(client, **REQUEST, enable_safety_checker=True)
        assert caught.value.body["param"] == "enable_safety_checker"
        assert caught.value.body["code"] == "safety_checker_unavailable"
        assert len(generate(client, **REQUEST).data) == 1  # a request that does not ask is served


def test_label_choice_and_threshold_parsing(tmp_path):
    folder = build_classifier(tmp_path / "other", labels=("drawing", "explicit-content"))
    with pytest.raises(SafetyCheckerError, match="--safety-labels"):
        SafetyChecker.load(str(folder))
    checker = SafetyChecker.load(str(folder), unsafe_labels=("explicit-content",))
    assert checker.unsafe_ids == [1]
    assert parse_thresholds("0.1,0.2,0.3,0.4,0.5") == (0.1, 0.2, 0.3, 0.4, 0.5)
    for bad in ("0.1,0.2", "a,b,c,d,e", "0,0,0,0,2"):
        with pytest.raises(ValueError):
            parse_thresholds(bad)
    with pytest.raises(ValueError, match="in order"):  # tolerance 1 ("strict") would have been the most permissive
        parse_thresholds("0.9,0.1,0.5,0.7,0.85")
    assert parse_thresholds("0,0.5,1,1,1") == (0, 0.5, 1, 1, 1)  # equal neighbours are fine
