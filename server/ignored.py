"""The `x-flux2-ignored-params` response header: the parameters a request sent that this server did not act on."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from urllib.parse import quote

IGNORED_HEADER = "x-flux2-ignored-params"


def note_ignored(headers: MutableMapping[str, str], names: Iterable[str]) -> None:
    """Name the ignored parameters in a header: percent-encoded (header values are latin-1; names are anything a
    client sent), at most 1,000 characters."""
    listed = ", ".join(quote(name, safe="") for name in sorted(names))
    if listed:
        headers[IGNORED_HEADER] = listed if len(listed) <= 1000 else listed[:997] + "..."
