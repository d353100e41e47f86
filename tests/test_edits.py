"""POST /v1/images/edits through the official OpenAI Python SDK (multipart) and as JSON with data: URIs."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from imaging import decode_b64, pixels
from PIL import Image

STEPS = {"num_inference_steps": 2}


def png_bytes(width=64, height=48, seed=0, mode="RGB") -> bytes:
    rng = np.random.RandomState(seed)
    array = rng.randint(0, 255, (height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def edit(client, **params):
    accepted = {
        "image",
        "prompt",
        "background",
        "input_fidelity",
        "mask",
        "model",
        "n",
        "output_compression",
        "output_format",
        "partial_images",
        "quality",
        "response_format",
        "size",
        "stream",
        "user",
    }
    extra = {k: params.pop(k) for k in list(params) if k not in accepted}
    return client.images.edit(**params, extra_body=extra or None)


def test_one_image_auto_size_keeps_the_input_size(client):
    result = edit(
        client,
        image=("in.png", png_bytes(96, 64), "image/png"),
        prompt="make it night",
        response_format="b64_json",
        **STEPS,
    )
    assert decode_b64(result.data[0].b64_json).size == (96, 64)
    assert result.size == "96x64"
    assert result.usage.input_tokens_details.image_tokens == (96 // 16) * (64 // 16)


def test_two_images_as_image_list_and_explicit_size(client):
    result = edit(
        client,
        image=[png_bytes(64, 64, 1), png_bytes(80, 48, 2)],
        prompt="combine them",
        size="128x96",
        response_format="b64_json",
        **STEPS,
    )
    assert decode_b64(result.data[0].b64_json).size == (128, 96)
    # 64x64 is 4x4 patches; 80x48 is scaled up to 107x64 (pipelines want >= 64 px), encoded at 96x64: 6x4.
    assert result.usage.input_tokens_details.image_tokens == 16 + 24


def test_ten_images_work_and_eleven_are_refused(client):
    images = [png_bytes(32, 32, seed) for seed in range(10)]
    result = edit(client, image=images, prompt="a collage", size="64x64", response_format="b64_json", **STEPS)
    assert decode_b64(result.data[0].b64_json).size == (64, 64)
    assert result.usage.reference_megapixels == 10  # each reference counts at least 1 MP
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, image=[*images, png_bytes(32, 32, 11)], prompt="too many", **STEPS)
    assert caught.value.body["param"] == "image"
    assert caught.value.body["code"] == "too_many_images"


def test_format_is_detected_from_the_bytes_not_the_declared_type(client):
    # The Node SDK sends application/octet-stream; a misnamed file must still work.
    result = edit(
        client,
        image=("photo.jpg", png_bytes(48, 48), "application/octet-stream"),
        prompt="x",
        response_format="b64_json",
        **STEPS,
    )
    assert decode_b64(result.data[0].b64_json).size == (48, 48)


def test_a_file_that_is_not_an_image_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, image=("notes.png", b"hello, not an image", "image/png"), prompt="x", **STEPS)
    assert caught.value.body["param"] == "image"
    assert caught.value.body["code"] == "invalid_image"


def test_mask_keeps_the_unmasked_pixels(client):
    source = png_bytes(64, 48, seed=5)
    alpha = np.full((48, 64), 255, dtype=np.uint8)
    alpha[16:40, 8:40] = 0  # transparent = repaint
    mask_rgba = np.dstack([np.zeros((48, 64, 3), np.uint8), alpha])
    buffer = io.BytesIO()
    Image.fromarray(mask_rgba, "RGBA").save(buffer, format="PNG")
    result = edit(
        client,
        image=("src.png", source),
        mask=("mask.png", buffer.getvalue()),
        prompt="a red balloon",
        response_format="b64_json",
        n=2,
        seed=3,
        **STEPS,
    )
    original = pixels(Image.open(io.BytesIO(source)))
    keep = alpha == 255
    for item in result.data:
        out = pixels(decode_b64(item.b64_json))
        assert out.shape == original.shape
        assert np.array_equal(out[keep], original[keep])
        assert np.abs(out[~keep] - original[~keep]).mean() > 5


def test_a_mask_that_repaints_nothing_is_said_to(client):
    """An opaque mask (or one without alpha and without white) gives back the image as sent: most likely the wrong
    file, so the answer says so; a mask with something to repaint says nothing."""
    source = png_bytes(64, 48, seed=5)

    def mask_png(alpha: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.dstack([np.zeros((48, 64, 3), np.uint8), alpha]), "RGBA").save(buffer, format="PNG")
        return buffer.getvalue()

    def answer(mask: bytes):
        return edit(client, image=("src.png", source), mask=("mask.png", mask), prompt="x", seed=1,
                    response_format="b64_json", **STEPS)  # fmt: skip

    opaque = answer(mask_png(np.full((48, 64), 255, np.uint8)))
    assert np.array_equal(pixels(decode_b64(opaque.data[0].b64_json)), pixels(Image.open(io.BytesIO(source))))
    assert any("The mask repaints nothing" in w for w in opaque.model_extra["warnings"])
    some = np.full((48, 64), 255, np.uint8)
    some[:8, :8] = 0
    assert not [w for w in answer(mask_png(some)).model_extra.get("warnings") or [] if "mask" in w]


def test_mask_of_another_size_is_a_400(client):
    buffer = io.BytesIO()
    Image.new("RGBA", (10, 10)).save(buffer, format="PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, image=("src.png", png_bytes(64, 48)), mask=("mask.png", buffer.getvalue()), prompt="x", **STEPS)
    assert caught.value.body["param"] == "mask"
    assert "64x48" in caught.value.body["message"]


def test_json_edit_with_data_uris(server):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(64, 32)).decode()
    response = httpx.post(
        f"{server.base_url}/v1/images/edits",
        timeout=60,
        json={
            "prompt": "x",
            "images": [{"image_url": uri}, {"image_url": uri}],
            "response_format": "b64_json",
            "seed": 9,
            **STEPS,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode_b64(body["data"][0]["b64_json"]).size == (64, 32)
    assert body["data"][0]["seed"] == 9


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://127.0.0.1/x.png"])
def test_json_edit_refuses_remote_urls_by_default(server, url):
    response = httpx.post(
        f"{server.base_url}/v1/images/edits", timeout=30, json={"prompt": "x", "images": [{"image_url": url}]}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "images[0].image_url"
    assert response.json()["error"]["code"] == "remote_images_disabled"


def test_json_edit_without_images_is_a_400(server):
    response = httpx.post(f"{server.base_url}/v1/images/edits", timeout=30, json={"prompt": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "images"


def test_multipart_strings_are_coerced(server):
    files = [("image[]", ("a.png", png_bytes(32, 32), "image/png")), ("image[]", ("b.png", png_bytes(48, 32)))]
    data = {
        "prompt": "x",
        "n": "2",
        "seed": "100",
        "sync_mode": "true",
        "guidance_scale": "2.5",
        "num_inference_steps": "2",
        "output_format": "jpg",
        "output_compression": "80",
    }
    response = httpx.post(f"{server.base_url}/v1/images/edits", files=files, data=data, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["seed"] for item in body["data"]] == [100, 101]
    assert body["output_format"] == "jpeg"
    for item in body["data"]:
        assert item["url"].startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(item["url"].split(",", 1)[1])))
        assert (image.format, image.size) == ("JPEG", (32, 32))
