"""An output directory that cannot be written: a clear 5xx for url responses, b64 still works, server healthy.
(As root, permission bits stop nothing: the output "directory" here is a regular file.)"""

from __future__ import annotations

import httpx
from conftest import RunningServer
from imaging import decode_b64


def test_unwritable_output_dir_is_a_clear_507_and_the_server_keeps_serving(tiny_klein, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    args = ["--output-dir", str(blocker / "outputs"), "--history-db", str(tmp_path / "history.sqlite3")]
    with RunningServer(["--model", str(tiny_klein), *args], tmp_path) as running:
        body = {"prompt": "x", "size": "16x16", "num_inference_steps": 1}
        failed = httpx.post(f"{running.base_url}/v1/images/generations", json=body, timeout=60)
        assert failed.status_code == 507
        error = failed.json()["error"]
        assert error["code"] == "storage_error" and error["type"] == "server_error"
        assert "b64_json" in error["message"] and "Traceback" not in failed.text
        inline = httpx.post(
            f"{running.base_url}/v1/images/generations", timeout=60, json={**body, "response_format": "b64_json"}
        )
        assert decode_b64(inline.json()["data"][0]["b64_json"]).size == (16, 16)  # its history copy failed quietly
        recorded = httpx.get(f"{running.base_url}/v1/images/history").json()["data"]
        assert [(e["status"], e["error"] and e["error"]["code"], e["files"]) for e in recorded] == [
            ("ok", None, []),
            ("error", "storage_error", []),
        ]
        assert httpx.get(f"{running.base_url}/health").status_code == 200


def test_cors_is_off_by_default_and_configurable(server, tiny_klein, tmp_path):
    preflight = {
        "Origin": "https://tools.studio.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    closed = httpx.options(f"{server.base_url}/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    with RunningServer(
        ["--model", str(tiny_klein), "--cors-origin", "https://tools.studio.example", "--api-key", "k"], tmp_path
    ) as running:
        opened = httpx.options(f"{running.base_url}/v1/images/generations", headers=preflight)
        assert opened.status_code == 200
        assert opened.headers["access-control-allow-origin"] == "https://tools.studio.example"
        # The official JS SDK in a browser asks for its own headers too: refusing one fails every call it makes.
        sdk_headers = (
            "authorization,content-type,x-stainless-lang,x-stainless-os,x-stainless-retry-count,"
            "x-stainless-timeout,idempotency-key"
        )
        sdk = httpx.options(
            f"{running.base_url}/v1/images/generations",
            headers={**preflight, "Access-Control-Request-Headers": sdk_headers},
        )
        assert sdk.status_code == 200, sdk.text
        assert "x-stainless-retry-count" in sdk.headers["access-control-allow-headers"].lower()
        other = httpx.options(
            f"{running.base_url}/v1/images/generations", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
