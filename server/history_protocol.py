"""The history endpoints' shapes (pydantic, for answers and the OpenAPI document), their query's dates, and a stored
row turned into the entry a client reads."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import invalid_param

ENTRY_OBJECT: Literal["image.history_entry"] = "image.history_entry"


class HistoryError(BaseModel):
    status: int = Field(description="The HTTP status the request was answered with.")
    code: str | None = Field(description="OpenAI's error code (e.g. invalid_value, rate_limit_exceeded).")
    message: str | None


class HistoryFile(BaseModel):
    name: str
    url: str = Field(description="Where the image is served (GET /v1/images/files/{name}, same key), while kept.")


class HistoryEntry(BaseModel):
    id: str = Field(description="The entry's id (also sent as the answer's x-flux2-history-id header).")
    object: Literal["image.history_entry"] = ENTRY_OBJECT
    created: int = Field(description="When the request arrived, unix seconds.")
    request_id: str = Field(description="The request's x-request-id.")
    endpoint: Literal["generations", "edits", "variations"]
    model: str | None
    prompt: str
    revised_prompt: str | None = Field(description="The part of the prompt the model read (null if it never ran).")
    status: Literal["ok", "error"]
    error: HistoryError | None
    api_key_id: str | None = Field(
        description="key- and the first 8 hex digits of the SHA-256 of the key used (never the key); "
        "'playground' for the --playground-open page; null when the server has no keys."
    )
    parameters: dict[str, Any] | None = Field(
        description="The normalized parameters (size, steps, guidance, n, seed, formats...): sent back as they "
        "are, they make the same images. Null when the request failed before they were resolved."
    )
    request: dict[str, Any] = Field(description="The parameters the client sent (prompt and images aside).")
    ignored_parameters: list[str]
    stream: bool
    seeds: list[int] = Field(description="One per image: image i is reproducible alone with seeds[i].")
    references: list[str] = Field(description="SHA-256 (hex) of each uploaded image, in order (edits).")
    mask: str | None = Field(description="SHA-256 (hex) of the uploaded mask.")
    timings_ms: dict[str, float] = Field(description="The Server-Timing figures, in milliseconds.")
    files: list[HistoryFile] = Field(description="The images, kept as files with the same retention.")


class HistoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[HistoryEntry]
    first_id: str | None
    last_id: str | None
    has_more: bool


class HistoryDeleted(BaseModel):
    id: str
    object: Literal["image.history_entry"] = ENTRY_OBJECT
    deleted: bool


def entry(row: dict[str, Any], files_url: str) -> HistoryEntry:
    data = row["data"]
    error = None
    if row["status"] != "ok":
        error = HistoryError(status=row["http_status"], code=row["error_code"], message=row["error_message"])
    return HistoryEntry(
        id=row["id"],
        created=int(row["created"]),
        request_id=row["request_id"],
        endpoint=row["endpoint"],
        model=row["model"],
        prompt=row["prompt"],
        revised_prompt=row["revised_prompt"],
        status=row["status"],
        error=error,
        api_key_id=row["api_key_id"],
        parameters=data.get("parameters"),
        request=data.get("request") or {},
        ignored_parameters=data.get("ignored_parameters") or [],
        stream=bool(data.get("stream")),
        seeds=data.get("seeds") or [],
        references=data.get("references") or [],
        mask=data.get("mask"),
        timings_ms=data.get("timings_ms") or {},
        files=[HistoryFile(name=name, url=f"{files_url}/{name}") for name in data.get("files") or []],
    )


def parse_time(value: str | None, param: str) -> float | None:
    """Unix seconds, or an ISO 8601 date or time (no zone: UTC)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise invalid_param(
                f"'{param}' must be unix seconds or an ISO 8601 date or time (e.g. 2026-05-01 or "
                f"2026-05-01T09:30:00Z), got {value[:100]!r}.",
                param,
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        try:
            return moment.timestamp()
        except (OverflowError, ValueError, OSError):
            raise invalid_param(f"'{param}' is out of range: {value[:100]!r}.", param) from None
    if not math.isfinite(seconds):
        raise invalid_param(f"'{param}' must be a finite number of unix seconds.", param)
    return seconds
