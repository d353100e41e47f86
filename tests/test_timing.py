"""Per-request stage timing: the Server-Timing header, the log line, the Prometheus histograms."""

from __future__ import annotations

import io
import uuid

import httpx
from imaging import decode_b64
from PIL import Image

from server.timing import RequestTiming, parse_server_timing

STAGES = ("queue", "text_encode", "denoise", "decode", "encode", "total")


def _timed(client, prompt: str, **extra):
    raw = client.images.with_raw_response.generate(
        prompt=prompt, size="256x256", response_format="b64_json", extra_body={"num_inference_steps": 3, **extra}
    )
    return raw.headers["server-timing"], raw.parse()


def test_every_image_response_names_its_stages_and_they_add_up(client):
    prompt = f"timing {uuid.uuid4().hex}"
    header, result = _timed(client, prompt)
    assert decode_b64(result.data[0].b64_json).size == (256, 256)
    stages = parse_server_timing(header)
    assert set(STAGES) <= set(stages)
    assert all(stages[name][0] >= 0 for name in STAGES)
    assert stages["denoise"][0] > 0 and stages["decode"][0] > 0 and stages["encode"][0] > 0
    parts = sum(stages[name][0] for name in STAGES if name != "total")
    total = stages["total"][0]
    # The stages cover the request: what is left is the service's own bookkeeping.
    assert 0.7 * total <= parts <= total + 1.0, (parts, total, header)
    assert stages["text_encode"][1] == "encoded"
    assert "references" not in stages  # only with --reference-cache on (tests/test_reference_cache.py)

    again, _ = _timed(client, prompt, seed=2)
    assert parse_server_timing(again)["text_encode"][1] == "cache hit"
    assert parse_server_timing(again)["text_encode"][0] < stages["text_encode"][0] + 50


def test_edits_also_time_their_input_decoding(client):
    buffer = io.BytesIO()
    Image.new("RGB", (128, 96), (20, 120, 200)).save(buffer, format="PNG")
    raw = client.images.with_raw_response.edit(
        image=("a.png", buffer.getvalue()),
        prompt="x",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    stages = parse_server_timing(raw.headers["server-timing"])
    assert stages["inputs"][0] > 0 and set(STAGES) <= set(stages)


def test_stages_are_logged_once_per_request_and_exported_as_histograms(server, client):
    request_id = f"timing-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        timeout=120,
        headers={"x-request-id": request_id},
        json={"prompt": "log me", "size": "64x64", "num_inference_steps": 1, "response_format": "b64_json"},
    )
    assert response.status_code == 200
    lines = [line for line in server.log().splitlines() if request_id in line and "done:" in line]
    assert len(lines) == 1, lines
    for name in STAGES:
        assert f"{name}=" in lines[0]
    metrics = httpx.get(f"{server.base_url}/metrics").text
    for name in STAGES:
        assert f'flux2_stage_seconds_count{{stage="{name}"}}' in metrics


def test_the_header_format():
    timing = RequestTiming(queue=0.0012, encode=0.05, total=0.5)
    header = timing.header()
    assert header.startswith('queue;dur=1.2, text_encode;dur=0.0;desc="encoded"')
    assert "inputs" not in header
    assert parse_server_timing(header)["total"] == (500.0, None)
