"""The history endpoints, behind the same keys as the image routes: list (newest first, paged like OpenAI's lists,
filtered by text, model, dates and status), read one entry, delete one (its row and its files). With --no-history
each answers 404 `history_disabled`."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query, Request

from ..errors import APIError, invalid_param
from ..history import MAX_LIMIT, HistoryDB, HistoryQuery, UnknownCursor
from ..history_protocol import HistoryDeleted, HistoryEntry, HistoryList, entry, parse_time
from ..protocol import ErrorResponse
from ..serving import FILES_ROUTE
from ..urls import public_base_url

router = APIRouter(prefix="/v1/images/history")
log = logging.getLogger("flux2.history")
T = TypeVar("T")

_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid query parameter (named in error.param)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "No such entry, or the history is off (--no-history)"},
    503: {"model": ErrorResponse, "description": "The history database could not be read or written just now"},
}


async def _run(work: Callable[..., T], *args: Any) -> T:
    """A database call off the event loop; a database that fails is a 503 saying so, not a 500."""
    try:
        return await asyncio.to_thread(work, *args)
    except sqlite3.Error as exc:
        log.error("the history database failed: %s", exc)
        raise APIError(
            503, f"The history database could not be used just now ({exc}); retry.", code="history_error"
        ) from exc


def _db(request: Request) -> HistoryDB:
    db: HistoryDB | None = request.app.state.service.history.db
    if db is None:
        raise APIError(
            404,
            "The history is off on this server (it was started with --no-history): nothing is recorded.",
            code="history_disabled",
        )
    return db


def _files_url(request: Request) -> str:
    return public_base_url(request, request.app.state.service.settings) + FILES_ROUTE


def _not_found(entry_id: str) -> APIError:
    return APIError(
        404, f"No history entry with id '{entry_id[:200]}' (it may have expired).", param="id", code="not_found"
    )


@router.get("", response_model=HistoryList, responses=_RESPONSES, summary="List the history, newest first")
async def list_history(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Entries per page (1-100).")] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page (its last_id).")] = None,
    search: Annotated[
        str | None, Query(max_length=1000, description="Text in the prompt or the revised prompt.")
    ] = None,
    model: Annotated[str | None, Query(max_length=1000, description="A model id or alias.")] = None,
    since: Annotated[str | None, Query(description="From this time: unix seconds or ISO 8601 (no zone: UTC).")] = None,
    until: Annotated[str | None, Query(description="Before this time: unix seconds or ISO 8601.")] = None,
    status: Annotated[Literal["ok", "error"] | None, Query(description="ok or error.")] = None,
    request_id: Annotated[str | None, Query(max_length=200, description="The request's x-request-id.")] = None,
) -> HistoryList:
    db = _db(request)
    settings = request.app.state.service.settings
    if search and "\x00" in search:  # SQLite's LIKE stops at a NUL: "a\0b" would match every prompt with "a"
        raise invalid_param("search cannot contain a NUL character.", "search")
    query = HistoryQuery(
        limit=limit,
        after=after,
        search=search or None,
        model=settings.model_ids.get(model, model) if model else None,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        status=status,
        request_id=request_id,
    )
    try:
        rows, has_more = await _run(db.page, query)
    except UnknownCursor:
        raise invalid_param(
            f"'after' names no history entry ({(after or '')[:200]!r}): it may have been deleted or expired.",
            "after",
        ) from None
    files_url = _files_url(request)
    data = [entry(row, files_url) for row in rows]
    return HistoryList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{entry_id}", response_model=HistoryEntry, responses=_RESPONSES, summary="One history entry")
async def get_history_entry(entry_id: str, request: Request) -> HistoryEntry:
    row = await _run(_db(request).get, entry_id)
    if row is None:
        raise _not_found(entry_id)
    return entry(row, _files_url(request))


@router.delete(
    "/{entry_id}",
    response_model=HistoryDeleted,
    responses=_RESPONSES,
    summary="Delete a history entry and its image files",
)
async def delete_history_entry(entry_id: str, request: Request) -> HistoryDeleted:
    db = _db(request)
    names = await _run(db.delete, entry_id)
    if names is None:
        raise _not_found(entry_id)
    store = request.app.state.service.store
    await asyncio.to_thread(lambda: [store.remove(name) for name in names])
    return HistoryDeleted(id=entry_id, deleted=True)
