"""Prometheus metrics (prometheus-client), one registry per app: requests, queue, batches, speed, output,
device memory, prompt cache."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.jobs import BatchReport, EngineStats

from .timing import OPTIONAL_STAGES, STAGES, RequestTiming


class Metrics:
    """Made before the engine (its `observe_batch` is the engine's `on_batch`), then `watch`es the engine's stats."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self._stats: Callable[[], EngineStats] | None = None
        self.requests = Counter(
            "flux2_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "flux2_request_seconds",
            "HTTP request duration",
            ["route"],
            registry=registry,
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        for name, text, field in (
            ("flux2_queue_images", "Images waiting in the queue", "queued_images"),
            ("flux2_running_images", "Images in the batch now running", "running_images"),
            ("flux2_device_memory_bytes", "Memory allocated on the CUDA device (0 without one)", "device_memory_bytes"),
            ("flux2_prompt_cache_hits", "Prompt embedding cache hits", "prompt_cache_hits"),
            ("flux2_prompt_cache_misses", "Prompt embedding cache misses", "prompt_cache_misses"),
            ("flux2_reference_store_hits", "Reference sets found in the reference store", "reference_store_hits"),
            ("flux2_reference_store_misses", "Reference sets computed (not in the store)", "reference_store_misses"),
            ("flux2_reference_store_bytes", "Device memory held by kept reference K/V", "reference_store_bytes"),
        ):
            Gauge(name, text, registry=registry).set_function(lambda field=field: self._stat(field))
        self.batch_images = Histogram(
            "flux2_batch_images",
            "Images per pipeline call",
            registry=registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
        )
        self.step_seconds = Histogram(
            "flux2_step_seconds",
            "Seconds per denoising step of a batch",
            registry=registry,
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self.image_seconds = Histogram(
            "flux2_image_seconds",
            "Seconds per image (batch time / images)",
            registry=registry,
            buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.stage_seconds = Histogram(
            "flux2_stage_seconds",
            f"Seconds per request in each stage ({', '.join(STAGES)}), as in Server-Timing",
            ["stage"],
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.images = Counter("flux2_images", "Images produced", ["model"], registry=registry)
        self.megapixels = Counter("flux2_megapixels", "Megapixels produced", ["model"], registry=registry)
        self.batches = Counter("flux2_batches", "Pipeline calls by outcome", ["outcome"], registry=registry)
        self.steps = Counter("flux2_steps", "Denoising steps run", registry=registry)

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Read the gauges from `stats` (the engine's) at each scrape."""
        self._stats = stats

    def _stat(self, field: str) -> float:
        return float(getattr(self._stats(), field)) if self._stats is not None else 0.0

    def observe_timing(self, timing: RequestTiming) -> None:
        for stage, seconds in timing.seconds().items():
            if stage not in OPTIONAL_STAGES or seconds:
                self.stage_seconds.labels(stage).observe(seconds)

    def observe_batch(self, report: BatchReport) -> None:
        self.batches.labels(report.outcome).inc()
        self.batch_images.observe(report.images)
        self.steps.inc(report.steps_run)
        if report.steps_run:
            self.step_seconds.observe(report.seconds / report.steps_run)
        if report.outcome == "ok":
            self.image_seconds.observe(report.seconds / report.images)
            self.images.labels(report.model).inc(report.images)
            self.megapixels.labels(report.model).inc(report.megapixels)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The request state's key under which a stream leaves its outcome's status (an `error` event's, 499 for a client
# that left), counted in place of the 200 its response began with.
STREAM_STATUS = "flux2_stream_status"


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template (not raw path: file names would explode the label set), and by
    its status: a stream's by how it ended (server/streaming.py), as the history records it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            code = scope.get("state", {}).get(STREAM_STATUS, status["code"])
            self.metrics.requests.labels(name, scope["method"], str(code)).inc()
            self.metrics.request_seconds.labels(name).observe(time.perf_counter() - started)
