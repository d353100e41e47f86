"""Everything the HTTP side is configured with, in one frozen object built once at start. Its field defaults are
the command line's (server/options.py reads them from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.codecs import DEFAULT_MAX_INPUT_PIXELS
from pipeline.sizes import MAX_OUTPUT_PIXELS


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    shutdown_timeout: float = 30.0  # on SIGTERM, seconds in-flight work may take before it is cancelled
    # Every id /v1/models lists, in order, mapped to the served model it names (aliases included).
    model_ids: dict[str, str] = field(default_factory=dict)
    test_models: tuple[str, ...] = ()  # served models with tiny random test weights: their images are noise
    output_dir: Path = Path("outputs")
    public_url: str | None = None  # base of the URLs we hand out, e.g. "https://images.studio.lan"
    retention_seconds: float = 24 * 3600  # generated files older than this are deleted
    max_stored_images: int = 1000  # and at most this many are kept
    history: bool = True  # record every request that is not sync_mode (server/history.py)
    history_db: Path | None = None  # the history's SQLite file; None: history.sqlite3 in output_dir
    max_steps: int = 100
    request_timeout: float = 600.0  # seconds a request may wait and run before it is cancelled
    metrics: bool = True
    embed_metadata: bool = True  # each file carries its parameters (PNG text, EXIF/XMP); off: --no-metadata
    # Hardening
    api_keys: tuple[str, ...] = ()
    public_files: bool = False  # generated files readable without a key
    open_metrics: bool = False  # /metrics readable without a key
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 256 * 1024**2
    max_image_bytes: int = 50 * 1024**2
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    max_output_pixels: int = MAX_OUTPUT_PIXELS
    max_prompt_chars: int = 20_000
    playground: bool = True  # serve the Playground page at / and /playground
    playground_open: bool = False  # with keys set, let the same-origin Playground page call the API without one
    allow_remote_images: bool = False  # fetch http(s) image_urls (public addresses only)
    remote_image_timeout: float = 10.0
    allow_disable_safety: bool = False  # honour enable_safety_checker=false
    require_safety_checker: bool = False  # without a checker, enable_safety_checker=true is a 400

    @property
    def default_model(self) -> str:
        return next(iter(self.model_ids.values()))

    @property
    def history_path(self) -> Path:
        return self.history_db if self.history_db is not None else self.output_dir / "history.sqlite3"

    @property
    def test_model_ids(self) -> list[str]:
        """The ids (aliases included) that name a tiny test model."""
        return [i for i, name in self.model_ids.items() if name in self.test_models]


def model_ids_for(models: list[tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """{id: name} for served models given as (name, aliases): each name is its own id; an alias goes to the first
    model that claims it (so `flux.2-flex` names the default model)."""
    ids: dict[str, str] = {}
    for name, _ in models:
        ids[name] = name
    for name, aliases in models:
        for alias in aliases:
            ids.setdefault(alias, name)
    return ids
