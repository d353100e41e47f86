"""Per-request stage timing: the standard `Server-Timing` response header, one log line per request, and the
figures Prometheus histograms by stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.jobs import StageTimes

HEADER = "Server-Timing"
STAGES = (
    "inputs",
    "queue",
    "enhance",
    "text_encode",
    "references",
    "denoise",
    "decode",
    "safety",
    "encode",
    "total",
)
OPTIONAL_STAGES = ("inputs", "enhance", "references", "safety")  # reported only when they took place
# The stages whose work a cache may have saved: the description each gets in the header and the log.
_CACHED = {"text_encode": ("cache hit", "encoded"), "references": ("cache hit", "computed")}


@dataclass
class RequestTiming:
    """Filled in as a request goes: `inputs` (decoding uploaded images), `queue` (waiting for the engine), the
    engine's stages, `encode` (image files, base64, storage), `total` (from the service's first line)."""

    started: float = field(default_factory=time.perf_counter)
    inputs: float = 0.0
    queue: float = 0.0
    stages: StageTimes = StageTimes()
    encode: float = 0.0
    total: float = 0.0

    def finish(self) -> None:
        self.total = time.perf_counter() - self.started

    def seconds(self) -> dict[str, float]:
        return {
            "inputs": self.inputs,
            "queue": self.queue,
            "enhance": self.stages.enhance,
            "text_encode": self.stages.text_encode,
            "references": self.stages.references,
            "denoise": self.stages.denoise,
            "decode": self.stages.decode,
            "safety": self.stages.safety,
            "encode": self.encode,
            "total": self.total,
        }

    def header(self) -> str:
        """`queue;dur=1.2, text_encode;dur=35.0;desc="cache hit", ...` in milliseconds (RFC: Server-Timing)."""
        parts = []
        for name, seconds in self.seconds().items():
            if name in OPTIONAL_STAGES and not seconds:
                continue
            part = f"{name};dur={seconds * 1000:.1f}"
            if name in _CACHED:
                part += f';desc="{self._cache_word(name)}"'
            parts.append(part)
        return ", ".join(parts)

    def log_text(self) -> str:
        return " ".join(
            f"{name}={seconds:.3f}s{' (cache hit)' if self._hit(name) else ''}"
            for name, seconds in self.seconds().items()
        )

    def _hit(self, name: str) -> bool:
        return name in _CACHED and self._cache_word(name) == _CACHED[name][0]

    def _cache_word(self, name: str) -> str:
        hit, miss = _CACHED[name]
        cached = self.stages.prompt_cached if name == "text_encode" else self.stages.references_cached
        return hit if cached else miss


def parse_server_timing(value: str) -> dict[str, tuple[float, str | None]]:
    """{name: (milliseconds, description)} from a Server-Timing header (for tests, the bench and clients)."""
    metrics: dict[str, tuple[float, str | None]] = {}
    for entry in value.split(","):
        name, *params = [piece.strip() for piece in entry.split(";")]
        duration, description = 0.0, None
        for param in params:
            key, _, raw = param.partition("=")
            if key == "dur":
                duration = float(raw)
            elif key == "desc":
                description = raw.strip('"')
        if name:
            metrics[name] = (duration, description)
    return metrics
