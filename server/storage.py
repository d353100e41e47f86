"""Generated image files: saved under unguessable names in the output dir, served back only from there, and
pruned by age and count."""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9_-]{22,64}\.[a-z]{3,4}$")


class ImageStore:
    def __init__(self, directory: Path, retention_seconds: float, max_files: int):
        self.directory = Path(directory)
        self.retention_seconds = retention_seconds
        self.max_files = max_files
        self._lock = threading.Lock()
        self.on_removed: Callable[[list[str]], None] | None = None  # hears the names prune deleted (the history)

    def save(self, data: bytes, extension: str) -> str:
        """Write `data` under a new random name (128 bits) and return the name. The file appears whole or not at
        all: it is written to a temporary name, then renamed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_urlsafe(16)}.{extension}"
        final = self.directory / name
        partial = self.directory / f".{name}.partial"
        try:
            partial.write_bytes(data)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        self.prune()
        return name

    def path_of(self, name: str) -> Path | None:
        """The file for a name we handed out, or None: no other path can be reached through it."""
        if not _NAME.match(name):
            return None
        path = (self.directory / name).resolve()
        root = self.directory.resolve()
        if os.path.commonpath([root, path]) != str(root) or not path.is_file():
            return None
        if time.time() - path.stat().st_mtime > self.retention_seconds:
            return None
        return path

    def remove(self, name: str) -> bool:
        """Delete a file we handed out (expired or not); False when there was none by that name."""
        if not _NAME.match(name):
            return False
        path = self.directory / name
        existed = path.is_file()
        path.unlink(missing_ok=True)
        return existed

    def prune(self) -> None:
        """Delete files past their retention, then the oldest beyond the count limit."""
        removed: list[str] = []
        with self._lock:
            now = time.time()
            entries = []
            for path in self.directory.iterdir():
                if not _NAME.match(path.name):
                    continue
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if now - mtime > self.retention_seconds:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
                else:
                    entries.append((mtime, path))
            entries.sort()
            for _, path in entries[: max(0, len(entries) - self.max_files)]:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed and self.on_removed is not None:
            self.on_removed(removed)
