"""`flux2-local history`: list, search and export the generation history.

By default it asks a running server (GET /v1/images/history): the same filters, keys and aliases as the API, from
any machine that can reach it. `--db PATH` reads a history file directly instead, read-only, with no server
running (a backup, a stopped server's file): the same rows through the same code (server/history.py)."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer

from .client import auth_headers, server_root
from .client_commands import _API_KEY, _SERVER
from .errors import APIError
from .history import MAX_LIMIT, HistoryDB, HistoryQuery
from .history_protocol import entry, parse_time
from .serving import FILES_ROUTE

TABLE_LIMIT = 20


class _Failed(Exception):
    pass


def history(
    search: Annotated[
        str | None, typer.Option("--search", "-s", help="Text in the prompt.", show_default=False)
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only this model id or alias.", show_default=False)] = None,
    since: Annotated[
        str | None, typer.Option(help="From this time: ISO 8601 (no zone: UTC) or unix seconds.", show_default=False)
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time.", show_default=False)] = None,
    status: Annotated[str | None, typer.Option(help="ok or error.", show_default=False)] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help=f"At most this many entries (default: {TABLE_LIMIT} listed, all exported)."),
    ] = None,
    jsonl: Annotated[
        Path | None,
        typer.Option(
            help="Export as JSON lines, one entry a line, to this file ('-': standard output).", dir_okay=False
        ),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(
            help="Read this history file directly (read-only) instead of asking a server.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    server: Annotated[str, _SERVER] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, _API_KEY] = None,
) -> None:
    """List, search or export (JSON lines) the history of a running flux2-local server, newest first."""
    if status not in (None, "ok", "error"):
        raise typer.BadParameter("must be ok or error", param_hint="--status")
    if limit is None:
        limit = None if jsonl is not None else TABLE_LIMIT
    filters = {"search": search, "model": model, "since": since, "until": until, "status": status}
    try:
        found = _from_file(db, filters, server) if db is not None else _from_server(server, api_key, filters)
        entries = _take(found, limit)
        if jsonl is None:
            _table(entries)
        elif str(jsonl) == "-":
            _write_jsonl(entries, sys.stdout)
        else:
            try:
                opened = jsonl.open("w", encoding="utf-8")
            except OSError as exc:
                raise _Failed(f"cannot write {jsonl}: {exc.strerror or exc}") from exc
            with opened as out:
                count = _write_jsonl(entries, out)
            typer.echo(f"{count} entr{'y' if count == 1 else 'ies'} written to {jsonl}", err=True)
    except _Failed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


def _take(entries: Iterator[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    for count, item in enumerate(entries):
        if limit is not None and count >= limit:
            return
        yield item


def _from_server(server: str, api_key: str | None, filters: dict[str, str | None]) -> Iterator[dict[str, Any]]:
    url = f"{server_root(server)}/v1/images/history"
    params: dict[str, Any] = {key: value for key, value in filters.items() if value is not None}
    params["limit"] = MAX_LIMIT
    with httpx.Client(headers=auth_headers(api_key), timeout=30) as client:
        while True:
            try:
                response = client.get(url, params=params)
            except httpx.HTTPError as exc:
                raise _Failed(f"could not reach {server}: {exc}") from exc
            if response.status_code != 200:
                raise _Failed(_error_text(response))
            page = response.json()
            yield from page["data"]
            if not page["has_more"] or not page["data"]:
                return
            params["after"] = page["last_id"]


def _from_file(path: Path, filters: dict[str, str | None], server: str) -> Iterator[dict[str, Any]]:
    try:
        since, until = parse_time(filters["since"], "since"), parse_time(filters["until"], "until")
    except APIError as exc:
        raise _Failed(exc.message) from exc
    history = HistoryDB(path, read_only=True)
    files_url = server_root(server) + FILES_ROUTE
    after = None
    try:
        while True:
            query = HistoryQuery(
                limit=MAX_LIMIT,
                after=after,
                search=filters["search"],
                model=filters["model"],
                since=since,
                until=until,
                status=filters["status"],
            )
            rows, has_more = history.page(query)
            for row in rows:
                yield entry(row, files_url).model_dump()
            if not has_more or not rows:
                return
            after = rows[-1]["id"]
    except sqlite3.Error as exc:
        raise _Failed(f"could not read the history {path}: {exc}") from exc
    finally:
        history.close()


def _write_jsonl(entries: Iterator[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    for item in entries:
        out.write(json.dumps(item, ensure_ascii=False) + "\n")
        count += 1
    return count


def _table(entries: Iterator[dict[str, Any]]) -> None:
    shown = 0
    for item in entries:
        when = datetime.fromtimestamp(item["created"]).strftime("%Y-%m-%d %H:%M:%S")
        parameters = item.get("parameters") or {}
        outcome = item["status"] if item["status"] == "ok" else f"error {(item.get('error') or {}).get('code')}"
        seeds = item.get("seeds") or []
        prompt = " ".join(item["prompt"].split())
        typer.echo(
            f"{when}  {item['id']}  {outcome:<10}  {item.get('model') or '-'}  {parameters.get('size', '-')}  "
            f"seed {seeds[0] if seeds else '-'}  {prompt[:70] + ('…' if len(prompt) > 70 else '')}"
        )
        shown += 1
    if not shown:
        typer.echo("No history entries.", err=True)


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:300]}"
