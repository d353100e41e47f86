"""The engine behind the real server: concurrency and batching, 429s, disconnects, timeouts, SIGTERM, request ids,
metrics and several models."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import RunningServer
from imaging import decode_b64

LONG = {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 100}  # ~10 s on tiny weights on this CPU


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_eight_concurrent_sdk_clients_succeed_and_are_batched(server):
    batches_before = metric(server.base_url, "flux2_batch_images_count")
    images_before = metric(server.base_url, "flux2_batch_images_sum")

    async def main():
        clients = [openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0) for _ in range(8)]
        return await asyncio.gather(
            *[
                c.images.generate(
                    prompt=f"concurrent {i}",
                    size="128x128",
                    response_format="b64_json",
                    extra_body={"seed": i, "num_inference_steps": 4},
                )
                for i, c in enumerate(clients)
            ]
        )

    results = asyncio.run(main())
    assert [decode_b64(r.data[0].b64_json).size for r in results] == [(128, 128)] * 8
    batches = metric(server.base_url, "flux2_batch_images_count") - batches_before
    images = metric(server.base_url, "flux2_batch_images_sum") - images_before
    assert images == 8
    assert batches < 8, "some requests must have shared a pipeline call"


def test_request_ids_are_echoed_created_and_logged(server):
    given = httpx.get(f"{server.base_url}/v1/models", headers={"x-request-id": "trace-abc.123"})
    assert given.headers["x-request-id"] == "trace-abc.123"
    created = httpx.get(f"{server.base_url}/v1/models").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", created)
    hostile = httpx.get(f"{server.base_url}/health", headers={"x-request-id": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"
    httpx.post(
        f"{server.base_url}/v1/images/generations",
        headers={"x-request-id": "gen-42"},
        json={"prompt": "x", "size": "16x16", "num_inference_steps": 1},
    )
    assert "[gen-42]" in server.log()


def test_metrics_count_requests_by_route_and_status(server):
    httpx.get(f"{server.base_url}/v1/models/nope")
    text = httpx.get(f"{server.base_url}/metrics").text
    assert 'flux2_requests_total{method="GET",route="/v1/models/{model_id:path}",status="404"}' in text
    for name in (
        "flux2_queue_images",
        "flux2_step_seconds_bucket",
        "flux2_image_seconds_bucket",
        "flux2_images_total",
        "flux2_megapixels_total",
        "flux2_device_memory_bytes",
        "flux2_prompt_cache_hits",
    ):
        assert name in text


@pytest.fixture(scope="module")
def small_server(tiny_klein, tiny_dev, tmp_path_factory):
    """A second server: a queue of 2 images, a 3 s request timeout, and two models (klein default, dev)."""
    workdir = tmp_path_factory.mktemp("small")
    with RunningServer(
        [
            "--model",
            f"kl={tiny_klein}",
            "--model",
            f"dv={tiny_dev}",
            "--max-queue-images",
            "2",
            "--request-timeout",
            "3",
            "--max-batch-images",
            "1",
        ],
        workdir,
    ) as running:
        yield running


def _in_background(fn):
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except Exception as exc:  # kept for the test to look at
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _images_in_flight(base: str) -> tuple[int, int]:
    health = httpx.get(f"{base}/health").json()
    return health["running_images"], health["queued_images"]


def _wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_queue_full_is_a_429_with_retry_after_then_recovers(small_server):
    base = small_server.base_url
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    first, _ = _in_background(lambda: httpx.post(f"{base}/v1/images/generations", json=LONG, timeout=60))
    _wait_until(lambda: httpx.get(f"{base}/health").json()["running_images"] == 1)
    queued, _ = _in_background(
        lambda: httpx.post(
            f"{base}/v1/images/generations",
            timeout=60,
            json={"prompt": "q", "size": "32x32", "n": 2, "num_inference_steps": 1},
        )
    )
    _wait_until(lambda: httpx.get(f"{base}/health").json()["queued_images"] == 2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(prompt="one more", size="32x32")
    assert caught.value.status_code == 429
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    first.join(60)
    queued.join(60)
    assert client.images.generate(prompt="after", size="32x32", extra_body={"num_inference_steps": 1}).data


def test_timeout_cancels_the_job_and_the_server_stays_healthy(small_server):
    base = small_server.base_url
    started = time.monotonic()
    response = httpx.post(f"{base}/v1/images/generations", json=LONG, timeout=60)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert response.headers["x-should-retry"] == "false"
    assert time.monotonic() - started < 8
    _wait_until(lambda: httpx.get(f"{base}/health").json()["running_images"] == 0, timeout=10)
    assert re.search(r"stopped after (\d+)/100 steps: request timeout", small_server.log())
    # the worker's own log line carries the request's id too
    assert re.search(r"flux2\.engine \[[0-9a-f]{32}\] stopped after", small_server.log())
    ok = httpx.post(
        f"{base}/v1/images/generations", json={"prompt": "x", "size": "16x16", "num_inference_steps": 1}, timeout=30
    )
    assert ok.status_code == 200


def _generations_by_status(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    pattern = r'^flux2_requests_total\{method="POST",route="/v1/images/generations",status="(\d+)"\} (\S+)$'
    return {status: float(value) for status, value in re.findall(pattern, text, re.M)}


def test_metrics_count_a_stream_by_how_it_ended(small_server):
    """A stream's response begins 200; one that ends in a timeout's error event counts as a 504 and one whose client
    left as a 499, as the same requests without stream do (and as the history records them)."""
    base = small_server.base_url
    before = _generations_by_status(base)
    with httpx.stream("POST", f"{base}/v1/images/generations", json={**LONG, "stream": True}, timeout=60) as timed:
        assert timed.status_code == 200 and "event: error" in timed.read().decode()
    _wait_until(lambda: _generations_by_status(base).get("504", 0) == before.get("504", 0) + 1, timeout=10)
    with httpx.stream("POST", f"{base}/v1/images/generations", json={**LONG, "stream": True}, timeout=60) as left:
        next(left.iter_raw())  # the stream has begun (a progress comment): the client leaves
    _wait_until(lambda: _generations_by_status(base).get("499", 0) == before.get("499", 0) + 1, timeout=10)
    assert _generations_by_status(base).get("200", 0) == before.get("200", 0)


def test_a_client_that_disconnects_stops_its_job_and_frees_the_worker(small_server):
    base = small_server.base_url
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/images/generations", json=LONG, timeout=1.0)
    _wait_until(lambda: "the client disconnected" in small_server.log(), timeout=10)
    done, asked = map(
        int, re.findall(r"stopped after (\d+)/(\d+) steps: the client disconnected", small_server.log())[-1]
    )
    assert done < asked
    started = time.monotonic()
    ok = httpx.post(
        f"{base}/v1/images/generations", json={"prompt": "next", "size": "16x16", "num_inference_steps": 1}, timeout=30
    )
    assert ok.status_code == 200
    assert time.monotonic() - started < 3, "the next request starts at once"


def test_several_models_are_listed_and_served(small_server):
    client = openai.OpenAI(base_url=f"{small_server.base_url}/v1", api_key="x", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["kl", "dv"]
    assert {"flux.2-flex", "flux.2-klein", "flux.2-dev"} <= set(ids)
    for model in ("dv", "flux.2-dev", "kl", "flux.2-flex"):
        result = client.images.generate(
            model=model, prompt="x", size="32x32", response_format="b64_json", extra_body={"num_inference_steps": 1}
        )
        assert decode_b64(result.data[0].b64_json).size == (32, 32)
    assert set(httpx.get(f"{small_server.base_url}/health").json()["models_loaded"]) == {"kl", "dv"}


def test_sigterm_finishes_the_request_in_flight_and_exits_0(tiny_klein, tmp_path):
    running = RunningServer(["--model", str(tiny_klein), "--shutdown-timeout", "60"], tmp_path)
    running.wait_healthy()
    base = running.base_url
    request, outcome = _in_background(
        lambda: httpx.post(
            f"{base}/v1/images/generations",
            timeout=120,
            json={"prompt": "finish me", "size": "1024x1024", "num_inference_steps": 25, "response_format": "b64_json"},
        )
    )
    _wait_until(lambda: httpx.get(f"{base}/health").json()["running_images"] == 1)
    running.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Still listening while it drains: a new request and /health get a 503 (a load balancer's cue), not a refused
    # connection.
    refused = httpx.post(f"{base}/v1/images/generations", json={"prompt": "late"}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"]
    assert httpx.get(f"{base}/health", timeout=10).status_code == 503
    request.join(120)
    assert outcome["value"].status_code == 200, outcome
    assert decode_b64(outcome["value"].json()["data"][0]["b64_json"]).size == (1024, 1024)
    assert running.process.wait(60) == 0
    running.stop()


def test_sigterm_past_the_shutdown_timeout_answers_each_request_in_flight_and_exits_in_time(tiny_klein, tmp_path):
    """Work that outlasts --shutdown-timeout is cancelled at its next step, and each request in flight gets its own
    answer: a plain one a 503 `cancelled` in OpenAI's envelope, a stream its `error` event. Once uvicorn cancelled
    the requests' tasks instead: a bare 500 text/plain, a stream cut mid-body, a traceback each in the log, and an
    exit after twice the timeout (uvicorn's wait, then the engine's)."""
    running = RunningServer(["--model", str(tiny_klein), "--shutdown-timeout", "2"], tmp_path)
    running.wait_healthy()
    base = running.base_url
    plain, plain_outcome = _in_background(
        lambda: httpx.post(f"{base}/v1/images/generations", json={**LONG, "prompt": "plain"}, timeout=120)
    )

    def stream() -> str:
        with httpx.stream(
            "POST", f"{base}/v1/images/generations", json={**LONG, "prompt": "streamed", "stream": True}, timeout=120
        ) as response:
            assert response.status_code == 200
            return response.read().decode()

    streamed, stream_outcome = _in_background(stream)
    _wait_until(lambda: _images_in_flight(base) == (1, 1) or _images_in_flight(base) == (2, 0))  # (running, queued)
    signalled = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    plain.join(60)
    streamed.join(60)
    answer = plain_outcome["value"]
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "cancelled" and "shutting down" in answer.json()["error"]["message"]
    events = stream_outcome["value"]
    assert "event: error" in events and '"code":"cancelled"' in events.replace(" ", ""), events[-500:]
    assert running.process.wait(30) == 0
    assert time.monotonic() - signalled < 2 + 10, "the drain, then the cancelled steps' end"
    running.stop()
    log = running.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert "timeout graceful shutdown exceeded" not in log, log[-3000:]  # uvicorn had no task left to cancel
