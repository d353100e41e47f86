"""The generation history: one SQLite file (stdlib `sqlite3`), one row per image request that was not `sync_mode`.

Safe with several writers, threads and processes alike (Ray replicas on one machine): WAL journal (readers never
block the writer), a connection per thread, every write in `BEGIN IMMEDIATE` (the write lock is taken up front,
so two writers never deadlock upgrading), a busy timeout, and retries when the lock stays taken. `open_history`
checks the file at start (a corrupt, foreign or locked file is a `HistoryUnavailable` naming the file and what to
do), so a request is never the first to find out. Knows nothing of HTTP: rows come in and go out as dicts."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("flux2.history")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 5.0  # one attempt waits this long for another writer's lock
START_TIMEOUT_SECONDS = 3.0  # at start, a lock held this long means the file is held by someone else
WRITE_ATTEMPTS = 4
MAX_LIMIT = 100
_COLUMNS = (
    "id",
    "request_id",
    "created",
    "endpoint",
    "model",
    "prompt",
    "revised_prompt",
    "status",
    "http_status",
    "error_code",
    "error_message",
    "api_key_id",
    "data",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created REAL NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    prompt TEXT NOT NULL,
    revised_prompt TEXT,
    status TEXT NOT NULL,
    http_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    api_key_id TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (created, id);
CREATE INDEX IF NOT EXISTS entries_by_request ON entries (request_id);
CREATE TABLE IF NOT EXISTS entry_files (name TEXT PRIMARY KEY, entry_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entry_files_by_entry ON entry_files (entry_id);
"""


class HistoryUnavailable(Exception):
    """The history database cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class HistoryQuery:
    """A page of the history, newest first: `after` is the id of the last row of the previous page."""

    limit: int = 20
    after: str | None = None
    search: str | None = None  # a substring of the prompt or the revised prompt (case-insensitive for ASCII)
    model: str | None = None
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # unix seconds, exclusive
    status: str | None = None  # "ok" | "error"
    request_id: str | None = None


class UnknownCursor(ValueError):
    """`after` names no row (deleted, expired, or never there)."""


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class HistoryDB:
    """Rows are dicts with the keys of `_COLUMNS`, `data` a dict (JSON in the file)."""

    def __init__(self, path: Path, *, read_only: bool = False, busy_timeout: float = BUSY_TIMEOUT_SECONDS):
        self.path = Path(path)
        self.read_only = read_only
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # Connections: one per thread (sqlite3 connections must stay on their thread), all closed by close().
    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            if self.read_only:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                connection = sqlite3.connect(
                    uri, uri=True, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
                )
            else:
                connection = sqlite3.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
                )
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if not self.read_only:
                connection.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:  # each used on its own thread only; closed here, at the end
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    def _write(self, work: Callable[[sqlite3.Connection], Any], attempts: int = WRITE_ATTEMPTS) -> Any:
        """`work` inside BEGIN IMMEDIATE ... COMMIT, retried while another writer holds the lock."""
        connection = self._connection()
        for attempt in range(attempts):
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * 2**attempt)
                continue
            try:
                result = work(connection)
                connection.execute("COMMIT")
                return result
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        raise AssertionError("unreachable")

    # Start: the file is made, checked and migrated once, before any request.
    def prepare(self) -> None:
        connection = self._connection()
        connection.execute("PRAGMA journal_mode = WAL")
        (check,) = connection.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"the integrity check failed: {check}")
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"it was made by a newer flux2-local (schema {version} > {SCHEMA_VERSION})")

        found = {row[1] for row in connection.execute("PRAGMA table_info(entries)")}
        if found and not set(_COLUMNS) <= found:
            raise sqlite3.DatabaseError("it is not a flux2-local history (its 'entries' table has other columns)")

        def create(connection: sqlite3.Connection) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        self._write(create, attempts=1)  # at start, a held lock is an answer, not a wait

    # Writes
    def insert(self, row: dict[str, Any], files: Iterable[str] = ()) -> None:
        values = [json.dumps(row[c], separators=(",", ":")) if c == "data" else row[c] for c in _COLUMNS]

        def work(connection: sqlite3.Connection) -> None:
            connection.execute(
                f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values
            )
            connection.executemany(
                "INSERT OR REPLACE INTO entry_files (name, entry_id) VALUES (?, ?)", [(n, row["id"]) for n in files]
            )

        self._write(work)

    def delete(self, entry_id: str) -> list[str] | None:
        """Remove a row; the names of its files (None: no such row)."""

        def work(connection: sqlite3.Connection) -> list[str] | None:
            if connection.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchone() is None:
                return None
            names = [n for (n,) in connection.execute("SELECT name FROM entry_files WHERE entry_id = ?", (entry_id,))]
            connection.execute("DELETE FROM entry_files WHERE entry_id = ?", (entry_id,))
            connection.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            return names

        result: list[str] | None = self._write(work)
        return result

    def expire(self, older_than: float, removed_files: Iterable[str] = ()) -> int:
        """Rows expire with their files: rows created before `older_than` (unix seconds), and rows one of whose
        files was removed (pruned by age or count). Returns how many rows went."""
        names = list(removed_files)

        def work(connection: sqlite3.Connection) -> int:
            gone = {i for (i,) in connection.execute("SELECT id FROM entries WHERE created < ?", (older_than,))}
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                gone |= {
                    i for (i,) in connection.execute(f"SELECT entry_id FROM entry_files WHERE name IN ({marks})", chunk)
                }
            for entry_id in gone:
                connection.execute("DELETE FROM entry_files WHERE entry_id = ?", (entry_id,))
                connection.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            return len(gone)

        count: int = self._write(work)
        return count

    # Reads
    def get(self, entry_id: str) -> dict[str, Any] | None:
        row = self._connection().execute(f"SELECT {', '.join(_COLUMNS)} FROM entries WHERE id = ?", (entry_id,))
        found = row.fetchone()
        return _as_dict(found) if found is not None else None

    def page(self, query: HistoryQuery) -> tuple[list[dict[str, Any]], bool]:
        """One page (newest first) and whether more rows follow it."""
        where: list[str] = []
        args: list[Any] = []
        connection = self._connection()
        if query.after is not None:
            cursor = connection.execute("SELECT created FROM entries WHERE id = ?", (query.after,)).fetchone()
            if cursor is None:
                raise UnknownCursor(query.after)
            where.append("(created < ? OR (created = ? AND id < ?))")
            args += [cursor[0], cursor[0], query.after]
        if query.search:
            pattern = "%" + query.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(prompt LIKE ? ESCAPE '\\' OR revised_prompt LIKE ? ESCAPE '\\')")
            args += [pattern, pattern]
        for column, value in (("model", query.model), ("status", query.status), ("request_id", query.request_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.since is not None:
            where.append("created >= ?")
            args.append(query.since)
        if query.until is not None:
            where.append("created < ?")
            args.append(query.until)
        limit = max(1, min(MAX_LIMIT, query.limit))
        sql = f"SELECT {', '.join(_COLUMNS)} FROM entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        rows = connection.execute(sql, [*args, limit + 1]).fetchall()
        return [_as_dict(row) for row in rows[:limit]], len(rows) > limit

    def count(self) -> int:
        (total,) = self._connection().execute("SELECT COUNT(*) FROM entries").fetchone()
        return int(total)


def _as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    found = dict(zip(_COLUMNS, row, strict=True))
    found["data"] = json.loads(found["data"])
    return found


def open_history(path: Path) -> HistoryDB:
    """The history at `path`, made if new, checked and ready; else HistoryUnavailable saying what to do."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = HistoryDB(path, busy_timeout=START_TIMEOUT_SECONDS)
        history.prepare()
        history.close()
    except (sqlite3.Error, OSError) as exc:
        raise HistoryUnavailable(_explain(path, exc)) from exc
    return HistoryDB(path)


def _explain(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, sqlite3.Error) and _is_busy(exc):
        what = (
            f"is locked by another program ({text}). Close what holds it (another server with the same "
            "--history-db may be stuck in a long write), or give this server its own --history-db"
        )
    elif isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        what = (
            f"is not a usable history database ({text}). Move the file aside (or delete it) to start a new "
            "history, or pass --history-db with another path"
        )
    else:
        what = f"cannot be opened or written ({text}). Pass --history-db with a path this server can write"
    return f"The history database {path} {what}; --no-history starts without a history."
