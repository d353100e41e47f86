"""Everything the HTTP side is configured with, in one frozen object built once at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    model_name: str  # the served model's id in /v1/models
    model_aliases: tuple[str, ...] = ()
    output_dir: Path = Path("outputs")
    public_url: str | None = None  # base of the URLs we hand out, e.g. "https://images.studio.lan"
    retention_seconds: float = 24 * 3600  # generated files older than this are deleted
    max_stored_images: int = 1000  # and at most this many are kept
    max_steps: int = 100

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_name, *(a for a in self.model_aliases if a != self.model_name))
