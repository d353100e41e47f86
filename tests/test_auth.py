"""API keys: every /v1 route needs one when configured (files too unless public), compared in constant time."""

from __future__ import annotations

import hmac

import httpx
import openai
import pytest
from conftest import RunningServer

from server.auth import key_matches, load_keys


@pytest.fixture(scope="module")
def keyed_server(tiny_klein, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keyed")
    key_file = workdir / "keys.txt"
    key_file.write_text("# studio keys\nfile-key-2  # the render farm\n\n")
    with RunningServer(
        ["--model", str(tiny_klein), "--api-key", "cli-key-1", "--api-key-file", str(key_file)], workdir
    ) as running:
        yield running


def _client(server, key):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def test_no_key_and_wrong_key_are_401(keyed_server):
    missing = httpx.get(f"{keyed_server.base_url}/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert missing.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(keyed_server, "wrong-key").images.generate(prompt="x", size="16x16")
    assert caught.value.body["code"] == "invalid_api_key"
    for header in ("Basic Y2xpLWtleS0x", "Bearer", "Bearer cli-key-1x", "cli-key-1"):
        response = httpx.get(f"{keyed_server.base_url}/v1/models", headers={"Authorization": header})
        assert response.status_code == 401, header


def test_right_keys_work_and_files_need_a_key(keyed_server):
    for key in ("cli-key-1", "file-key-2"):
        result = _client(keyed_server, key).images.generate(
            prompt="x", size="16x16", extra_body={"num_inference_steps": 1}
        )
        url = result.data[0].url
        assert httpx.get(url).status_code == 401
        served = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"


def test_health_is_open_metrics_is_not(keyed_server):
    assert httpx.get(f"{keyed_server.base_url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.base_url}/metrics").status_code == 401
    ok = httpx.get(f"{keyed_server.base_url}/metrics", headers={"Authorization": "Bearer cli-key-1"})
    assert ok.status_code == 200


def test_public_files_and_open_metrics(tiny_klein, tmp_path):
    with RunningServer(
        ["--model", str(tiny_klein), "--api-key", "k", "--public-files", "--open-metrics"], tmp_path
    ) as running:
        url = (
            _client(running, "k")
            .images.generate(prompt="x", size="16x16", extra_body={"num_inference_steps": 1})
            .data[0]
            .url
        )
        assert httpx.get(url).status_code == 200
        assert httpx.get(f"{running.base_url}/metrics").status_code == 200
        assert httpx.get(f"{running.base_url}/v1/models").status_code == 401


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ("alpha", "beta", "gamma")
    assert key_matches("alpha", keys)
    assert len(calls) == 3  # every key compared, even after a match
    calls.clear()
    assert not key_matches("delta", keys)
    assert len(calls) == 3


def test_load_keys(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text("one\n# comment\n two # trailing\n")
    assert load_keys(["a,b", "c d", "a"], key_file) == ("a", "b", "c", "d", "one", "two")


def test_cli_client_sends_the_key_from_the_environment(keyed_server, tmp_path):
    import os
    import subprocess
    import sys

    def run(key):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "generate",
                "x",
                "--size",
                "16x16",
                "--steps",
                "1",
                "--server",
                keyed_server.base_url,
                "-o",
                str(tmp_path / "k.png"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "FLUX2_API_KEY": key},
        )

    assert run("cli-key-1").returncode == 0
    refused = run("nope")
    assert refused.returncode == 1 and "401" in refused.stderr
