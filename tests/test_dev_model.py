"""The FLUX.2 dev pipeline (Mistral 3 encoder, PixtralProcessor, embedded guidance) served end to end."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import RunningServer
from imaging import decode_b64, pixels
from PIL import Image

STEPS = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def dev_client(tiny_dev, tmp_path_factory):
    from openai import OpenAI

    workdir = tmp_path_factory.mktemp("dev-server")
    with RunningServer(["--model", str(tiny_dev), "--model-name", "my-dev"], workdir) as running:
        yield OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def _png(width, height, seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def test_dev_lists_its_aliases(dev_client):
    assert [m.id for m in dev_client.models.list()] == ["my-dev", "flux.2-flex", "flux.2-dev"]


def test_dev_generates_and_edits_with_references_and_a_mask(dev_client):
    result = dev_client.images.generate(
        model="flux.2-dev", prompt="a fox", size="80x64", response_format="b64_json", extra_body={"seed": 1, **STEPS}
    )
    assert decode_b64(result.data[0].b64_json).size == (80, 64)

    edited = dev_client.images.edit(
        model="flux.2-flex",
        image=[_png(64, 64, 1), _png(96, 64, 2)],
        prompt="mix",
        response_format="b64_json",
        extra_body=STEPS,
    )
    assert decode_b64(edited.data[0].b64_json).size == (64, 64)

    source = _png(64, 64, 3)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    masked = dev_client.images.edit(
        image=("s.png", source),
        mask=("m.png", buffer.getvalue()),
        prompt="a hole",
        response_format="b64_json",
        extra_body=STEPS,
    )
    out, original = pixels(decode_b64(masked.data[0].b64_json)), pixels(Image.open(io.BytesIO(source)))
    keep = np.ones((64, 64), bool)
    keep[16:48, 16:48] = False
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[~keep] - original[~keep]).mean() > 5


def test_dev_uses_the_guidance_and_does_not_call_it_ignored(dev_client):
    """dev's embedded guidance changes the image (a distilled klein reports it unused: tests/test_api_surface.py)."""

    def made(guidance):
        return dev_client.images.with_raw_response.generate(
            prompt="a fox",
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 2, "guidance_scale": guidance, **STEPS},
        )

    low, high = made(1.0), made(8.0)
    assert "x-flux2-ignored-params" not in low.headers and "x-flux2-ignored-params" not in high.headers
    assert low.parse().model_extra.get("warnings") is None
    assert not np.array_equal(
        pixels(decode_b64(low.parse().data[0].b64_json)), pixels(decode_b64(high.parse().data[0].b64_json))
    )
