"""The generation history through a real server and the OpenAI SDK: what a row holds, a re-run from it gives the same
bytes, sync_mode stays out, failures and streams are recorded, paging and filters, DELETE takes the files too, 8
concurrent requests make 8 rows, the history survives a restart, keys apply, a corrupt or locked file stops the
start with a clear message, --no-history, and the `flux2-local history` command."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, serve_refused
from hostile_images import png
from imaging import generate
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HISTORY = "/v1/images/history"


def tag() -> str:
    return uuid.uuid4().hex[:12]


def history(server, **params) -> dict:
    response = httpx.get(f"{server.base_url}{HISTORY}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def entry(server, entry_id: str) -> dict:
    response = httpx.get(f"{server.base_url}{HISTORY}/{entry_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def only(server, search: str) -> dict:
    (found,) = history(server, search=search)["data"]
    return found


def test_a_row_holds_the_request_and_a_rerun_from_it_gives_the_same_bytes(client, server):
    word = tag()
    raw = client.images.with_raw_response.generate(
        prompt=f"a lighthouse {word}",
        n=2,
        size="48x32",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "output_format": "webp", "lora": "x"},
    )
    result = raw.parse()
    first = entry(server, raw.headers["x-flux2-history-id"])  # the answer names its row
    assert first == only(server, word)
    assert (first["status"], first["error"], first["endpoint"], first["stream"]) == ("ok", None, "generations", False)
    assert first["request_id"] == raw.headers["x-request-id"]
    assert first["prompt"] == first["revised_prompt"] == f"a lighthouse {word}"
    assert first["seeds"] == [item.seed for item in result.data] and first["seeds"][1] == first["seeds"][0] + 1
    parameters = first["parameters"]
    assert parameters["size"] == "48x32" and parameters["n"] == 2 and parameters["seed"] == first["seeds"][0]
    assert (parameters["num_inference_steps"], parameters["output_format"]) == (2, "webp")
    assert first["request"]["num_inference_steps"] == 2 and first["ignored_parameters"] == ["lora"]
    assert "lora" not in first["request"]  # unknown fields: their names only
    assert {"queue", "text_encode", "denoise", "decode", "encode", "total"} <= set(first["timings_ms"])
    assert first["timings_ms"]["total"] > 0
    # b64 answers are kept as files too, so that the history can show them; the same bytes as answered.
    answered = [base64.b64decode(item.b64_json) for item in result.data]
    assert [httpx.get(f["url"]).content for f in first["files"]] == answered

    # Re-run: the row's normalized parameters, sent back as they are, make the same images.
    again = client.images.generate(
        prompt=first["prompt"],
        n=parameters["n"],
        size=parameters["size"],
        response_format="b64_json",
        extra_body={k: v for k, v in parameters.items() if k not in ("n", "size", "response_format")},
    )
    assert [base64.b64decode(item.b64_json) for item in again.data] == answered


def test_sync_mode_leaves_no_row_and_no_file(client, server):
    word = tag()
    before = set(server.output_dir.iterdir())
    result = generate(client, prompt=f"x {word}", size="32x32", sync_mode=True, num_inference_steps=1)
    assert result.data[0].url.startswith("data:image/png;base64,")
    time.sleep(0.3)
    assert history(server, search=word)["data"] == []
    assert {p for p in server.output_dir.iterdir() if not p.name.startswith("history.sqlite3")} == {
        p for p in before if not p.name.startswith("history.sqlite3")
    }


def test_failures_are_recorded_with_their_error_code(client, server):
    word = tag()
    with pytest.raises(openai.BadRequestError):
        generate(client, prompt=f"x {word}", size="huge")
    with pytest.raises(openai.NotFoundError):
        generate(client, prompt=f"y {word}", model="no-such-model")
    failed = history(server, search=word, status="error")["data"]
    assert [(e["prompt"], e["error"]["status"], e["error"]["code"]) for e in failed] == [
        (f"y {word}", 404, "model_not_found"),
        (f"x {word}", 400, "invalid_value"),
    ]
    assert failed[1]["parameters"] is None and failed[1]["request"]["size"] == "huge"
    assert "Invalid size 'huge'" in failed[1]["error"]["message"] and failed[1]["files"] == []
    assert history(server, search=word, status="ok")["data"] == []


def test_an_edit_records_the_hashes_of_its_images_and_mask(server):
    word = tag()
    first, second = png(64, 48), png(32, 32)
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 48), (0, 0, 0, 0)).save(buffer, "PNG")
    mask = buffer.getvalue()
    response = httpx.post(
        f"{server.base_url}/v1/images/edits",
        data={"prompt": f"merge {word}", "num_inference_steps": "1", "response_format": "url"},
        files=[("image[]", ("a.png", first)), ("image[]", ("b.png", second)), ("mask", ("m.png", mask))],
        timeout=120,
    )
    assert response.status_code == 200, response.text
    row = only(server, word)
    assert row["endpoint"] == "edits" and row["parameters"]["size"] == "64x48"
    assert row["references"] == [hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]
    assert row["mask"] == hashlib.sha256(mask).hexdigest()
    assert [f["url"] for f in row["files"]] == [item["url"] for item in response.json()["data"]]


def test_a_stream_is_recorded_when_it_ends(server):
    word = tag()
    body = {"prompt": f"stream {word}", "size": "32x32", "num_inference_steps": 2, "stream": True, "seed": 3}
    with httpx.stream("POST", f"{server.base_url}/v1/images/generations", json=body, timeout=120) as response:
        text = response.read().decode()
        entry_id = response.headers["x-flux2-history-id"]
    completed = json.loads(text.split("event: image_generation.completed\ndata: ", 1)[1].split("\n", 1)[0])
    row = entry(server, entry_id)
    assert (row["stream"], row["status"], row["seeds"]) == (True, "ok", [3])
    assert httpx.get(row["files"][0]["url"]).content == base64.b64decode(completed["b64_json"])


def test_paging_filters_and_errors_of_the_list(client, server):
    word = tag()
    started = time.time()
    for i in range(3):
        generate(client, prompt=f"page {word} {i}", size="16x16", num_inference_steps=1, response_format="b64_json")
    page = history(server, search=word, limit=2)
    assert [e["prompt"] for e in page["data"]] == [f"page {word} 2", f"page {word} 1"]
    assert (page["object"], page["has_more"], page["first_id"]) == ("list", True, page["data"][0]["id"])
    rest = history(server, search=word, limit=2, after=page["last_id"])
    assert [e["prompt"] for e in rest["data"]] == [f"page {word} 0"] and not rest["has_more"]
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started - 1))
    assert len(history(server, search=word, since=since, model="flux.2-klein")["data"]) == 3  # an alias works
    assert history(server, search=word, until=str(started - 60))["data"] == []
    for params, param in (
        ({"since": "yesterday"}, "since"),
        ({"after": "hist_nope"}, "after"),
        ({"limit": 0}, "limit"),
        ({"search": f"{word}\x00"}, "search"),  # SQLite's LIKE would stop at the NUL and match far more
    ):
        response = httpx.get(f"{server.base_url}{HISTORY}", params=params)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    missing = httpx.get(f"{server.base_url}{HISTORY}/hist_nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "No history entry with id 'hist_nope' (it may have expired).",
        "type": "invalid_request_error",
        "param": "id",
        "code": "not_found",
    }


def test_delete_removes_the_row_and_its_files(client, server):
    word = tag()
    result = generate(client, prompt=f"delete {word}", size="16x16", n=2, num_inference_steps=1)
    row = only(server, word)
    assert [f["url"] for f in row["files"]] == [item.url for item in result.data]
    assert all(httpx.get(item.url).status_code == 200 for item in result.data)
    deleted = httpx.delete(f"{server.base_url}{HISTORY}/{row['id']}")
    assert deleted.json() == {"id": row["id"], "object": "image.history_entry", "deleted": True}
    assert all(httpx.get(item.url).status_code == 404 for item in result.data)
    assert not any((server.output_dir / f["name"]).exists() for f in row["files"])
    assert httpx.get(f"{server.base_url}{HISTORY}/{row['id']}").status_code == 404
    assert httpx.delete(f"{server.base_url}{HISTORY}/{row['id']}").status_code == 404


def test_eight_concurrent_requests_make_eight_rows(client, server):
    word = tag()

    def one(i: int):
        return generate(client, prompt=f"crowd {word} {i}", size="16x16", num_inference_steps=1, seed=i)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    rows = history(server, search=word, limit=100)["data"]
    assert sorted(r["prompt"] for r in rows) == sorted(f"crowd {word} {i}" for i in range(8))
    assert sorted(r["seeds"][0] for r in rows) == list(range(8)) == [r.data[0].seed for r in results]


def test_the_history_survives_a_restart_and_needs_the_key(tiny_klein, tmp_path):
    db = tmp_path / "elsewhere" / "history.sqlite3"
    args = ["--model", str(tiny_klein), "--history-db", str(db), "--output-dir", str(tmp_path / "out")]
    with RunningServer(args, tmp_path / "first") as first:
        body = {"prompt": "before the restart", "size": "16x16", "num_inference_steps": 1}
        made = httpx.post(f"{first.base_url}/v1/images/generations", json=body, timeout=120)
        assert made.status_code == 200
    assert db.exists()
    with RunningServer([*args, "--api-key", "studio-key"], tmp_path / "second") as second:
        assert httpx.get(f"{second.base_url}{HISTORY}").status_code == 401
        assert httpx.get(f"{second.base_url}{HISTORY}/x").status_code == 401
        assert httpx.delete(f"{second.base_url}{HISTORY}/x").status_code == 401
        keyed = openai.OpenAI(base_url=f"{second.base_url}/v1", api_key="studio-key", max_retries=0, timeout=120)
        generate(keyed, prompt="after the restart", size="16x16", num_inference_steps=1)
        listed = httpx.get(f"{second.base_url}{HISTORY}", headers={"Authorization": "Bearer studio-key"}).json()
    assert [(e["prompt"], e["api_key_id"]) for e in listed["data"]] == [
        ("after the restart", "key-" + hashlib.sha256(b"studio-key").hexdigest()[:8]),
        ("before the restart", None),
    ]
    assert "studio-key" not in db.read_bytes().decode("latin-1")  # never the key itself


def _serve_fails(tiny_klein, tmp_path, db: Path) -> str:
    return serve_refused(
        "--model", str(tiny_klein), "--history-db", str(db), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


def test_a_corrupt_or_locked_database_stops_the_start_with_what_to_do(tiny_klein, tmp_path):
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"\x00garbage" * 1000)
    message = _serve_fails(tiny_klein, tmp_path, corrupt)
    assert f"The history database {corrupt} is not a usable history database" in message
    assert "Move the file aside" in message and "--no-history" in message and "Traceback" not in message

    locked = tmp_path / "locked.sqlite3"
    sqlite3.connect(locked).execute("CREATE TABLE t (x)").connection.close()
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        message = _serve_fails(tiny_klein, tmp_path, locked)
    finally:
        holder.close()
    assert f"The history database {locked} is locked by another program" in message and "--no-history" in message


def test_no_history_records_and_keeps_nothing(tiny_klein, tmp_path):
    out = tmp_path / "out"
    with RunningServer(["--model", str(tiny_klein), "--no-history", "--output-dir", str(out)], tmp_path) as running:
        body = {"prompt": "x", "size": "16x16", "num_inference_steps": 1, "response_format": "b64_json"}
        made = httpx.post(f"{running.base_url}/v1/images/generations", json=body, timeout=120)
        assert made.status_code == 200 and "x-flux2-history-id" not in made.headers
        for method, path in (("GET", HISTORY), ("GET", f"{HISTORY}/x"), ("DELETE", f"{HISTORY}/x")):
            response = httpx.request(method, f"{running.base_url}{path}")
            assert response.status_code == 404
            error = response.json()["error"]
            assert error["code"] == "history_disabled" and "--no-history" in error["message"]
    assert not out.exists() or list(out.iterdir()) == []  # no database, no kept b64 image


def test_the_history_command_lists_searches_and_exports(client, server, tmp_path):
    word = tag()
    for i in range(2):
        generate(client, prompt=f"cli {word} {i}", size="16x16", num_inference_steps=1, seed=40 + i)

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", "history", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        )

    listed = command("--server", server.base_url, "--search", word, "--status", "ok")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and f"cli {word} 1" in lines[0] and "seed 41" in lines[0] and "16x16" in lines[0]
    export = tmp_path / "history.jsonl"
    exported = command("--server", server.base_url, "--search", word, "--jsonl", str(export))
    assert exported.returncode == 0 and "2 entries written" in exported.stderr
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"cli {word} 1", f"cli {word} 0"] and rows[0]["seeds"] == [41]
    # The same rows read from the file itself, no server asked.
    direct = command("--db", str(server.output_dir / "history.sqlite3"), "--search", word, "--jsonl", "-")
    assert direct.returncode == 0, direct.stderr
    assert [json.loads(line)["id"] for line in direct.stdout.splitlines()] == [r["id"] for r in rows]
    failed = command("--server", server.base_url, "--since", "someday")
    assert failed.returncode == 1 and "'since' must be unix seconds or an ISO 8601" in failed.stderr


def test_the_openapi_document_describes_the_history_routes(server):
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    listing, one = spec["paths"]["/v1/images/history"], spec["paths"]["/v1/images/history/{entry_id}"]
    assert set(listing) == {"get"} and set(one) == {"get", "delete"}
    assert {p["name"] for p in listing["get"]["parameters"]} >= {"limit", "after", "search", "model", "since", "status"}
    assert "HistoryList" in str(listing["get"]["responses"]["200"])
    assert "HistoryDeleted" in str(one["delete"]["responses"]["200"])
    for operation in (listing["get"], one["get"], one["delete"]):
        assert "ErrorResponse" in str(operation["responses"]["404"]) and "422" not in operation["responses"]
