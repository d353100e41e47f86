"""References are made acceptable to diffusers' FLUX.2 pipelines; their encoded size gives the image tokens."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.references import encoded_size, prepare_reference


@pytest.mark.parametrize(
    "size, prepared",
    [
        ((64, 64), (64, 64)),
        ((32, 32), (64, 64)),
        ((80, 48), (107, 64)),
        ((1, 1), (64, 64)),
        ((900, 100), (900, 113)),
        ((100, 900), (113, 900)),
        ((3000, 10), (3000, 375)),
        ((2048, 1536), (2048, 1536)),
    ],
)
def test_prepare_reference_meets_the_pipeline_rules(size, prepared):
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    image = prepare_reference(Image.new("RGB", size, (10, 200, 30)))
    assert image.size == prepared
    Flux2ImageProcessor.check_image_input(image)  # raises on < 64 px or > 8:1


def test_padding_keeps_the_content_and_pads_white():
    source = Image.new("RGB", (900, 100), (255, 0, 0))
    prepared = prepare_reference(source)
    assert prepared.getpixel((450, 56)) == (255, 0, 0)
    assert prepared.getpixel((450, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "size, encoded",
    [
        ((64, 64), (64, 64)),
        ((1024, 1024), (1024, 1024)),
        ((2048, 2048), (1024, 1024)),
        ((100, 70), (96, 64)),
        ((1183, 887), (1168, 880)),
        ((32, 32), (64, 64)),
    ],
)
def test_encoded_size(size, encoded):
    assert encoded_size(*size) == encoded
