"""Request -> job: steps, guidance, seeds and sizes resolved from the parameters and the model's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.weights import ModelDefaults, ModelSpec
from server.errors import APIError
from server.protocol import ImageEditRequest, ImageGenerationRequest
from server.settings import Settings
from server.translate import build_job, output_options, quality_tier

DEV = ModelSpec(
    path=Path("dev"),
    pipeline_class="Flux2Pipeline",
    family="dev",
    is_distilled=False,
    size_label=None,
    defaults=ModelDefaults(steps=50, guidance_scale=4.0),
)
SETTINGS = Settings(model_ids={"m": "m"}, max_steps=100)


def job(**params):
    return build_job(ImageGenerationRequest(prompt="p", **params), DEV, SETTINGS)


@pytest.mark.parametrize(
    "params, steps",
    [
        ({}, 50),
        ({"quality": "low"}, 25),
        ({"quality": "medium"}, 38),
        ({"quality": "high"}, 50),
        ({"quality": "hd"}, 62),
        ({"quality": "max"}, 75),
        ({"steps": 7}, 7),
        ({"num_inference_steps": 9}, 9),
        ({"num_inference_steps": 9, "steps": 3}, 9),
        ({"num_inference_steps": 9, "quality": "low"}, 9),
    ],
)
def test_steps(params, steps):
    assert job(**params).steps == steps


def test_quality_presets_never_exceed_max_steps():
    capped = build_job(
        ImageGenerationRequest(prompt="p", quality="max"), DEV, Settings(model_ids={"m": "m"}, max_steps=60)
    )
    assert capped.steps == 60
    with pytest.raises(APIError) as caught:
        build_job(ImageGenerationRequest(prompt="p", steps=61), DEV, Settings(model_ids={"m": "m"}, max_steps=60))
    assert caught.value.param == "steps"


@pytest.mark.parametrize(
    "params, guidance",
    [
        ({}, 4.0),
        ({"guidance_scale": 2.5}, 2.5),
        ({"cfg_scale": 3.0}, 3.0),
        ({"guidance_scale": 0, "cfg_scale": 3}, 0),
    ],
)
def test_guidance(params, guidance):
    assert job(**params).guidance_scale == guidance


def test_seeds_are_consecutive_and_drawn_when_absent():
    assert job(seed=10, n=3).seeds == (10, 11, 12)
    drawn = job(n=2).seeds
    assert drawn[1] == drawn[0] + 1
    assert job(seed=2**63 - 2, n=2).seeds == (2**63 - 2, 2**63 - 1)


def test_a_seed_whose_last_image_would_pass_the_largest_seed_is_refused():
    """Image i's seed is seed + i, and every reported seed must be one the API takes back (<= 2**63 - 1): the
    response once reported 2**63 for n=2, and a replay with that seed was refused."""
    with pytest.raises(APIError) as caught:
        job(seed=2**63 - 1, n=2)
    assert caught.value.status == 400 and caught.value.param == "seed"
    assert str(2**63 - 2) in caught.value.message


def test_edit_default_size_is_the_first_reference():
    references = (Image.new("RGB", (300, 200)), Image.new("RGB", (64, 64)))
    edit = build_job(ImageEditRequest(prompt="p"), DEV, SETTINGS, references)
    assert (edit.width, edit.height) == (300, 200)
    assert (edit.run_width, edit.run_height) == (304, 208)


def test_output_options_and_quality_label():
    options = output_options(ImageGenerationRequest(prompt="p", output_format=" JPG ", output_quality=70))
    assert (options.output_format, options.codec_quality, options.response_format) == ("jpeg", 70, "url")
    assert quality_tier(ImageGenerationRequest(prompt="p", quality="medium"), 38, 50) == "medium"
    assert quality_tier(ImageGenerationRequest(prompt="p", quality="max"), 75, 50) == "high"
    # Explicit steps override the preset (reported as ignored): the tier is the one the steps come to.
    assert quality_tier(ImageGenerationRequest(prompt="p", quality="low", steps=50), 50, 50) == "high"
    assert quality_tier(ImageGenerationRequest(prompt="p", num_inference_steps=25), 25, 50) == "low"
    assert quality_tier(ImageGenerationRequest(prompt="p", quality="max", steps=30), 30, 50) == "medium"
