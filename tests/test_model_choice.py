"""Which models a server serves: --model values named, resolved, placed; tiny test weights told apart."""

from __future__ import annotations

import logging

import pytest

from pipeline.model_choice import ModelChoice, ModelChoiceError, resolve_models, split_name


def test_split_name():
    assert split_name("black-forest-labs/FLUX.2-klein-4B") == (None, "black-forest-labs/FLUX.2-klein-4B")
    assert split_name("klein=/models/klein") == ("klein", "/models/klein")
    assert split_name("/models/a=b") == (None, "/models/a=b")  # a path with "=" in it is no name


def test_tiny_weights_are_a_test_model_named_by_folder_or_first_name(tiny_klein, tiny_dev, caplog):
    with caplog.at_level(logging.WARNING, logger="flux2"):
        served = resolve_models(
            ModelChoice(sources=(str(tiny_klein), f"other={tiny_dev}"), first_name="first", device="cpu")
        )
    assert [c.name for c in served.configs] == ["first", "other"]
    assert served.test_models == ("first", "other")
    assert [c.placement.device for c in served.configs] == ["cpu", "cpu"]
    assert "TINY RANDOM-WEIGHT" in caplog.text and "images are NOISE" in caplog.text


def test_a_missing_folder_is_one_error(tmp_path):
    with pytest.raises(ModelChoiceError, match="neither a diffusers folder nor a hub id"):
        resolve_models(ModelChoice(sources=(str(tmp_path / "nope"),), device="cpu"))


def test_two_models_of_one_name_are_one_error(tiny_klein):
    with pytest.raises(ModelChoiceError, match="two models are named 'same'"):
        resolve_models(ModelChoice(sources=(f"same={tiny_klein}", f"same={tiny_klein}"), device="cpu"))


def test_a_bad_placement_is_the_same_error(tiny_klein):
    with pytest.raises(ModelChoiceError, match="device"):
        resolve_models(ModelChoice(sources=(str(tiny_klein),), device="tpu"))
