"""`flux2-local serve --ray` for real: a local Ray cluster started by the command, 2 CPU replicas of the tiny model
behind Ray's HTTP proxy, one output folder. Requests spread over both replicas, a url made by one replica
downloads through whichever serves it, a replica killed with requests in flight is replaced while the requests it
held fail retryably (and the SDK's retry succeeds), and SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import RunningServer
from imaging import decode_bytes

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' (it is in [test])")

from openai import OpenAI

REPLICA = "x-flux2-replica"
QUICK = {"prompt": "a lighthouse", "size": "64x64", "extra_body": {"num_inference_steps": 1}}


@pytest.fixture(scope="module")
def ray_server(tiny_klein, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ray")
    args = ["--ray", "--autoscale", "2:2", "--device", "cpu", "--model", str(tiny_klein), "--output-dir", "outputs"]
    # A relative --output-dir: the command makes it absolute for the replicas, which run in other directories.
    server = RunningServer(args, workdir, env={"RAY_DEDUP_LOGS": "0"})
    try:
        server.wait_healthy(timeout=240)
        deadline = time.monotonic() + 240
        while "through Ray Serve" not in server.log():  # both replicas started (serve.run returned)
            assert server.process.poll() is None and time.monotonic() < deadline, server.log()[-4000:]
            time.sleep(0.5)
        server.output_dir = workdir / "outputs"
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


def _client(server, retries: int = 0) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=retries, timeout=120)


def _generate(client: OpenAI, **params):
    """One generation; (replica header, response)."""
    raw = client.images.with_raw_response.generate(**{**QUICK, **params})
    return raw.headers[REPLICA], raw.parse()


def test_concurrent_sdk_requests_all_succeed_and_reach_both_replicas(ray_server):
    client = _client(ray_server)
    replicas: set[str] = set()
    for _ in range(3):  # the proxy picks replicas at random among the least loaded: a round may use only one
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _generate(client, response_format="b64_json"), range(8)))
        assert len(answers) == 8 and all(len(body.data) == 1 and body.data[0].b64_json for _, body in answers)
        replicas |= {name for name, _ in answers}
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas
    assert all(name.startswith("flux2#Flux2Replica#") for name in replicas)


def test_a_url_from_one_replica_downloads_through_whichever_serves_it(ray_server):
    client = _client(ray_server)
    maker, body = _generate(client, response_format="url")
    url = body.data[0].url
    assert url.startswith(f"{ray_server.base_url}/v1/images/files/")
    servers, contents = set(), set()
    for _ in range(30):
        download = httpx.get(url, timeout=30)
        assert download.status_code == 200, download.text
        servers.add(download.headers[REPLICA])
        contents.add(download.content)
        if servers - {maker}:
            break
    assert servers - {maker}, f"every download went to the replica that made the file ({maker})"
    assert len(contents) == 1
    assert decode_bytes(contents.pop()).size == (64, 64)
    # One folder for all replicas, made absolute where the command ran.
    assert (ray_server.output_dir / url.rsplit("/", 1)[1]).is_file()


def test_a_killed_replica_is_replaced_and_its_requests_are_retryable(ray_server):
    client = _client(ray_server)
    before, kept = _generate(client, response_format="url")
    kept_url = kept.data[0].url
    victim = before.rsplit(":", 1)[1]
    # Long enough to be running when the replica dies 1.5 s in: a 512² 12-step image took 0.29 s on this CPU and
    # five of them 1.3 s, so with 12 steps every request could finish first (it did once, with the CPU otherwise
    # idle).
    steps = 100
    slow = {"prompt": "a slow lighthouse", "size": "512x512", "num_inference_steps": steps}

    raw_answers: list[httpx.Response] = []
    sdk_answers: list = []

    def raw_request() -> None:
        raw_answers.append(httpx.post(f"{ray_server.base_url}/v1/images/generations", json=slow, timeout=120))

    def sdk_request() -> None:  # the SDK as users run it: retries on (max_retries=3)
        sdk_answers.append(
            _client(ray_server, retries=3).images.generate(
                prompt=slow["prompt"], size="512x512", extra_body={"num_inference_steps": steps}
            )
        )

    threads = [threading.Thread(target=f) for f in [raw_request] * 6 + [sdk_request] * 4]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the requests reach the replicas and run
    os.kill(int(victim), signal.SIGKILL)
    for thread in threads:
        thread.join(180)

    # Without retries, each request either finished or got a retryable 503 in OpenAI's envelope.
    assert len(raw_answers) == 6
    for answer in raw_answers:
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 503:
            assert answer.headers["retry-after"]
            assert answer.json()["error"]["code"] == "replica_unavailable"
    assert any(a.status_code == 503 for a in raw_answers), [a.status_code for a in raw_answers]
    # With the SDK's retries every request succeeded.
    assert len(sdk_answers) == 4 and all(len(answer.data) == 1 for answer in sdk_answers)

    # Requests after the kill succeed, and Ray brings a new replica up in place of the dead one.
    replicas: set[str] = set()
    deadline = time.monotonic() + 120
    while len(replicas - {before}) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            replicas |= {name for name, _ in pool.map(lambda _: _generate(client), range(4))}
    assert len(replicas - {before}) == 2, replicas
    # Nothing was lost from the output store: the dead replica's file still downloads.
    assert httpx.get(kept_url, timeout=30).status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(ray_server):
    answers: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{ray_server.base_url}/v1/images/generations",
                json={"prompt": "last one", "size": "256x256", "num_inference_steps": 8},
                timeout=120,
            )
        )
    )
    request.start()
    time.sleep(1.0)
    ray_server.process.send_signal(signal.SIGTERM)
    request.join(120)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert ray_server.process.wait(timeout=120) == 0, ray_server.log()[-4000:]
    assert "stopping: each replica finishes its requests" in ray_server.log()
    # The command started its own cluster and stopped it: none of our replicas is left running.
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", "ServeReplica:flux2"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "replica processes left running"
        time.sleep(0.5)
    try:
        httpx.get(f"{ray_server.base_url}/health", timeout=5)
        raise AssertionError("still serving after SIGTERM")
    except httpx.TransportError:
        pass
