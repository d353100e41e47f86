"""The history's SQLite file on its own: concurrent writers (threads and processes) lose no row, paging and filters,
expiry with the files, and a corrupt, foreign or locked file refused at start with a message saying what to do."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.history import HistoryQuery, HistoryUnavailable, UnknownCursor, open_history
from server.storage import ImageStore

ROOT = Path(__file__).resolve().parent.parent


def row(entry_id: str, created: float, prompt: str = "a cat", **fields) -> dict:
    return {
        "id": entry_id,
        "request_id": f"req-{entry_id}",
        "created": created,
        "endpoint": "generations",
        "model": "tiny",
        "prompt": prompt,
        "revised_prompt": prompt,
        "status": "ok",
        "http_status": 200,
        "error_code": None,
        "error_message": None,
        "api_key_id": None,
        "data": {"seeds": [1]},
        **fields,
    }


WRITER = """
import sys, time
from server.history import HistoryDB
db = HistoryDB(sys.argv[1])
for i in range(int(sys.argv[3])):
    db.insert({"id": f"{sys.argv[2]}-{i}", "request_id": "r", "created": time.time(), "endpoint": "generations",
               "model": "tiny", "prompt": "p", "revised_prompt": None, "status": "ok", "http_status": 200,
               "error_code": None, "error_message": None, "api_key_id": None, "data": {}}, [f"{sys.argv[2]}-{i}.png"])
db.close()
"""


def test_eight_threads_and_eight_processes_writing_at_once_lose_no_row(tmp_path):
    path = tmp_path / "history.sqlite3"
    db = open_history(path)
    per_writer = 25
    start = threading.Barrier(8)

    def write(worker: int) -> None:
        start.wait()
        for i in range(per_writer):
            db.insert(row(f"t{worker}-{i}", time.time()), [f"t{worker}-{i}.png"])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"p{w}", str(per_writer)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for w in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [process.wait(timeout=120) for process in processes] == [0] * 8
    assert db.count() == 16 * per_writer
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert check.execute("SELECT COUNT(*) FROM entry_files").fetchone() == (16 * per_writer,)
    db.close()


def test_pages_follow_the_cursor_and_filters_combine(tmp_path):
    db = open_history(tmp_path / "h.sqlite3")
    for i in range(7):
        status = {"status": "error", "http_status": 400, "error_code": "invalid_value"} if i == 3 else {}
        db.insert(row(f"e{i}", 1000.0 + i, prompt=f"a {'red' if i % 2 else 'blue'} 50%_off cat", **status))
    page, more = db.page(HistoryQuery(limit=3))
    assert [r["id"] for r in page] == ["e6", "e5", "e4"] and more
    page, more = db.page(HistoryQuery(limit=3, after="e4"))
    assert [r["id"] for r in page] == ["e3", "e2", "e1"] and more
    page, more = db.page(HistoryQuery(limit=3, after="e1"))
    assert [r["id"] for r in page] == ["e0"] and not more
    assert [r["id"] for r in db.page(HistoryQuery(search="RED"))[0]] == ["e5", "e3", "e1"]
    assert db.page(HistoryQuery(search="50%_off"))[0] and not db.page(HistoryQuery(search="50%x"))[0]
    assert [r["id"] for r in db.page(HistoryQuery(status="error"))[0]] == ["e3"]
    assert [r["id"] for r in db.page(HistoryQuery(since=1002, until=1004))[0]] == ["e3", "e2"]
    assert db.page(HistoryQuery(model="other"))[0] == []
    with pytest.raises(UnknownCursor):
        db.page(HistoryQuery(after="nope"))
    assert db.get("e3")["error_code"] == "invalid_value" and db.get("nope") is None
    db.close()


def test_rows_expire_with_their_files(tmp_path):
    db = open_history(tmp_path / "h.sqlite3")
    store = ImageStore(tmp_path / "files", retention_seconds=3600, max_files=2)
    pruned: list[str] = []
    store.on_removed = pruned.extend
    names = [store.save(bytes([i]), "png") for i in range(2)]
    db.insert(row("first", time.time()), [names[0]])
    db.insert(row("second", time.time()), [names[1]])
    db.insert(row("old-b64", time.time() - 7200))  # no file, past the retention
    os.utime(store.directory / names[0], (time.time() - 10, time.time() - 10))
    store.save(b"third", "png")  # over the count limit: the oldest file goes
    assert pruned == [names[0]]
    assert db.expire(time.time() - 3600, pruned) == 2
    assert [r["id"] for r in db.page(HistoryQuery())[0]] == ["second"]
    assert db.delete("second") == [names[1]] and db.delete("second") is None
    db.close()


def test_a_corrupt_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "history.sqlite3"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(HistoryUnavailable) as caught:
        open_history(path)
    message = str(caught.value)
    assert str(path) in message and "not a usable history database" in message
    assert "Move the file aside" in message and "--no-history" in message


def test_a_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE entries (id TEXT, something TEXT)")
    with pytest.raises(HistoryUnavailable, match="not a flux2-local history"):
        open_history(path)


def test_a_locked_file_is_refused_without_waiting_long(tmp_path):
    path = tmp_path / "history.sqlite3"
    open_history(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(HistoryUnavailable) as caught:
            open_history(path)
        assert time.monotonic() - started < 10
        assert str(path) in str(caught.value) and "locked by another program" in str(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    open_history(path).close()  # free again: it opens
