"""Streaming partial images, as OpenAI frames them, through the official Python SDK."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from hostile_images import png
from imaging import decode_b64, generate

from pipeline.previews import preview_steps


@pytest.mark.parametrize(
    "steps, count, expected",
    [
        (20, 3, [5, 10, 15]),
        (4, 3, [1, 2, 3]),
        (4, 1, [2]),
        (2, 3, [1]),
        (1, 2, []),
        (30, 0, []),
        (10, 2, [3, 7]),
    ],
)
def test_preview_steps_are_spread_before_the_last(steps, count, expected):
    assert preview_steps(steps, count) == expected


def test_generate_stream_yields_typed_events_and_the_same_final_image(client):
    params = dict(prompt="a lighthouse at dusk", size="96x64", seed=77, num_inference_steps=8)
    events = list(generate(client, stream=True, partial_images=2, **params))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ImageGenPartialImageEvent", "ImageGenPartialImageEvent", "ImageGenCompletedEvent"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        image = decode_b64(event.b64_json)
        assert image.format == "PNG"
        assert event.size == "96x64" and event.output_format == "png" and event.background == "opaque"
        assert event.created_at > 0
    assert decode_b64(events[0].b64_json).size == (48, 32)  # previews are decoded at half size
    final = events[-1]
    assert final.type == "image_generation.completed"
    assert final.usage.output_tokens == (96 // 16) * (64 // 16)
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    plain = generate(client, response_format="b64_json", **params)
    assert base64.b64decode(final.b64_json) == base64.b64decode(plain.data[0].b64_json)


def test_a_stream_of_two_images_says_which_image_each_preview_is_and_splits_the_usage(client):
    """n=2: each preview names its image, and each completed event carries its own image's usage, so that adding
    them up gives the request's (the JSON answer's) once; each once carried the whole request's."""
    params = dict(prompt="two kites", size="64x48", seed=9, n=2, num_inference_steps=3)
    events = list(generate(client, stream=True, partial_images=1, **params))
    previews = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert sorted((e.partial_image_index, e.model_extra["image_index"]) for e in previews) == [(0, 0), (0, 1)]
    assert [e.model_extra["image_index"] for e in completed] == [0, 1]
    assert [e.model_extra["seed"] for e in completed] == [9, 10]
    whole = generate(client, response_format="b64_json", **params).usage
    for field in ("input_tokens", "output_tokens", "total_tokens"):
        assert sum(getattr(e.usage, field) for e in completed) == getattr(whole, field), field
    for field in ("output_megapixels", "billed_megapixels"):
        assert sum(e.usage.model_extra[field] for e in completed) == whole.model_extra[field], field
    one_image = (64 // 16) * (48 // 16)
    assert [e.usage.output_tokens for e in completed] == [one_image, one_image]
    assert completed[0].usage.input_tokens == whole.input_tokens > 0 and completed[1].usage.input_tokens == 0


def test_edit_stream(client):
    stream = client.images.edit(
        image=("a.png", png(64, 64)),
        prompt="night sky",
        stream=True,
        partial_images=1,
        extra_body={"seed": 5, "num_inference_steps": 4},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decode_b64(events[-1].b64_json).size == (64, 64)
    plain = client.images.edit(
        image=("a.png", png(64, 64)),
        prompt="night sky",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 4},
    )
    assert base64.b64decode(events[-1].b64_json) == base64.b64decode(plain.data[0].b64_json)


def test_stream_without_partials_and_with_n_2(client):
    events = list(generate(client, prompt="x", size="32x32", n=2, seed=1, stream=True, num_inference_steps=2))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert [e.model_extra["seed"] for e in events] == [1, 2]


def test_raw_sse_framing_progress_comments_and_multipart_stream(server):
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/images/edits",
        timeout=60,
        data={"prompt": "x", "stream": "true", "partial_images": "3", "num_inference_steps": "6"},
        files=[("image", ("a.png", png(48, 48), "image/png"))],
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "x-flux2-ignored-params" not in response.headers  # partial_images is used: the request streams
        text = "".join(response.iter_text())
    assert ": progress 1/6" in text and ": progress 6/6" in text
    blocks = [b for b in text.split("\n\n") if b.startswith("event:")]
    assert [b.split("\n")[0] for b in blocks] == ["event: image_edit.partial_image"] * 3 + [
        "event: image_edit.completed"
    ]


def test_stream_errors_before_the_stream_are_plain_json(server):
    response = httpx.post(
        f"{server.base_url}/v1/images/generations", json={"prompt": "x", "stream": True, "partial_images": 4}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "partial_images"


def test_output_format_applies_to_partials(client):
    events = list(
        generate(
            client, prompt="x", size="64x64", stream=True, partial_images=1, output_format="webp", num_inference_steps=4
        )
    )
    assert all(decode_b64(e.b64_json).format == "WEBP" for e in events)
    assert io.BytesIO(base64.b64decode(events[-1].b64_json)).getbuffer().nbytes > 0


def test_a_closed_stream_cancels_its_job(server):
    import re
    import time

    body = {"prompt": "stream then leave", "size": "1024x1024", "num_inference_steps": 100, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/images/generations", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(": progress 2/"):
                break  # leave mid-generation
    deadline = time.monotonic() + 10
    while "stopped after" not in server.log() or not re.search(
        r"stopped after (\d+)/100 steps: the client disconnected", server.log()
    ):
        assert time.monotonic() < deadline, "the job was not stopped"
        time.sleep(0.1)
    done = int(re.findall(r"stopped after (\d+)/100 steps: the client disconnected", server.log())[-1])
    assert done < 100


@pytest.mark.parametrize("size, factor", [((96, 64), 2), ((512, 512), 2), ((1024, 768), 4), ((2048, 2048), 8)])
def test_previews_are_about_256_px_for_large_images(size, factor):
    from pipeline.previews import preview_reduction

    assert preview_reduction(*size) == factor
