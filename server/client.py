"""`flux2-local generate` / `edit` / `reproduce`: a command-line client for a running server. It streams the
request, shows a progress bar fed by the stream's progress comments, and writes the images."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from pipeline.codecs import FILE_EXTENSIONS, normalize_output_format


class ClientError(Exception):
    """What went wrong, in words for the terminal."""


@dataclass
class SavedImage:
    path: Path
    seed: int | None
    size: str


def run_request(
    server: str,
    api_key: str | None,
    endpoint: str,
    fields: dict,
    images: list[Path],
    mask: Path | None,
    output: Path | None,
    show_progress: bool = True,
) -> list[SavedImage]:
    """POST to /v1/images/{endpoint} with stream=true and save each completed image. The output's folder is
    checked before the request: an image the server made is never lost to a path that cannot be written."""
    check_output(output)
    headers = auth_headers(api_key)
    url = f"{server_root(server)}/v1/images/{endpoint}"
    body = {key: value for key, value in fields.items() if value is not None}
    body["stream"] = True
    files = None
    if endpoint in ("edits", "variations"):
        files = [("image[]" if len(images) > 1 else "image", (p.name, p.read_bytes())) for p in images]
        if mask is not None:
            files.append(("mask", (mask.name, mask.read_bytes())))
        body = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in body.items()}
    saved: list[SavedImage] = []
    interactive = show_progress and sys.stdout.isatty()
    lines = _LineProgress(enabled=show_progress and not interactive)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        disable=not interactive,
        transient=True,
    ) as bar:
        task = bar.add_task("queued", total=None)
        try:
            request = dict(data=body, files=files) if files is not None else dict(json=body)
            with httpx.stream(
                "POST", url, headers=headers, timeout=httpx.Timeout(30, read=None), **request
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise ClientError(_error_text(response))
                lines.started()
                for event, data in _events(response.iter_lines()):
                    if event == "progress":
                        done, total = data
                        bar.update(task, description="denoising", completed=done, total=total)
                        lines.step(done, total)
                    elif event == "error":
                        raise ClientError(data.get("error", {}).get("message", "the server reported an error"))
                    elif event.endswith(".completed"):
                        saved.append(_save(data, output, len(saved), fields.get("n") or 1))
                        lines.completed(len(saved), fields.get("n") or 1)
        except httpx.HTTPError as exc:
            raise ClientError(f"could not reach {server}: {exc}") from exc
    if not saved:
        raise ClientError("the server sent no image")
    return saved


def server_root(server: str) -> str:
    """The server's base URL as the commands take it, with or without the `/v1` the OpenAI SDKs are given."""
    root = server.strip().rstrip("/")
    return root.removesuffix("/v1")


def check_output(output: Path | None) -> None:
    """A ClientError, before any request, for an output path that cannot be written (None: the current folder)."""
    folder = Path.cwd() if output is None else output.parent
    if output is not None and output.is_dir():
        raise ClientError(f"cannot write {output}: it is a folder (give a file name)")
    if not folder.is_dir():
        raise ClientError(f"cannot write {output}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ClientError(f"cannot write {output or 'here'}: the folder {folder} is not writable")


def output_format_for(output: Path | None, asked: str | None) -> str | None:
    """The format to ask for: `--format` if given, else the one the output file's extension names (out.jpg: jpeg);
    a ClientError when the two disagree (JPEG bytes in a .png file) or when, without `--format`, the extension names
    none (PNG bytes in out.xyz). An unknown `--format` is the server's to refuse."""
    named = format_named(output.suffix.lstrip(".")) if output is not None else None
    if asked is None and named is None and output is not None and output.suffix:
        raise ClientError(
            f"cannot tell an image format from {output.name}: name it .png, .jpg, .webp, .gif or .avif, "
            "or pass --format"
        )
    if asked is None or named is None:
        return asked or named
    if format_named(asked) not in (None, named):
        raise ClientError(f"--format {asked} does not match the output file {output.name} ({named}): change one")
    return asked


def format_named(name: str) -> str | None:
    """The output format a name or file extension names ("jpg": "jpeg"), None if it names none."""
    try:
        return normalize_output_format(name)
    except ValueError:
        return None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header for a key; none at all for a missing, empty or blank one."""
    key = (api_key or "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


class _LineProgress:
    """Progress as plain lines on stderr, for when stdout is no terminal (a pipe, a log file, CI): one line when the
    server starts answering, one per denoising step, one per image received."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.started_at = time.monotonic()

    def _say(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.monotonic() - self.started_at:6.1f} s] {text}", file=sys.stderr, flush=True)

    def started(self) -> None:
        self._say("request accepted, waiting for the model")

    def step(self, done: int, total: int) -> None:
        self._say(f"step {done}/{total}")

    def completed(self, received: int, count: int) -> None:
        self._say(f"image {received}/{count} received")


def _events(lines: Iterator[str]) -> Iterator[tuple[str, object]]:
    """Server-Sent Events: ("progress", (done, total)) from `: progress d/t` comments, (event name, data dict)."""
    event = None
    for line in lines:
        if line.startswith(": progress "):
            done, _, total = line.removeprefix(": progress ").partition("/")
            yield "progress", (int(done), int(total))
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:") and event is not None:
            yield event, json.loads(line.removeprefix("data:").strip())
        elif not line:
            event = None


def _save(data: dict, output: Path | None, index: int, count: int) -> SavedImage:
    output_format = data.get("output_format", "png")
    extension = FILE_EXTENSIONS.get(output_format, output_format)
    seed = data.get("seed")
    if output is None:
        path = Path(f"flux2-{seed if seed is not None else index + 1}.{extension}")
    elif count > 1:
        path = output.with_name(f"{output.stem}-{index + 1}{output.suffix or '.' + extension}")
    else:
        path = output
    try:
        path.write_bytes(base64.b64decode(data["b64_json"]))
    except OSError as exc:
        raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return SavedImage(path=path, seed=seed, size=data.get("size", ""))


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        where = f" (parameter {error['param']})" if error.get("param") else ""
        return f"{response.status_code}: {error['message']}{where}"
    except (ValueError, KeyError, TypeError):  # no error of ours: another server (an HTML page), or a proxy
        return (
            f"{response.status_code} from {response.request.url}, not an answer of flux2-local's: "
            "is --server the flux2-local server's address (e.g. http://127.0.0.1:8000)?"
        )
