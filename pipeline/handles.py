"""A submitted job as the engine tracks it (`JobHandle`), and what a running batch does with its handles: the
per-step hook (progress, cancellation, progress log lines), the preview sink, and merging the parts of a job
split by an out-of-memory retry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from .batching import Slice, images_in
from .jobs import GenerationJob, GenerationResult, JobListener, Preview, Progress

log = logging.getLogger("flux2.engine")


@dataclass
class JobHandle:
    job: GenerationJob
    future: Future[GenerationResult] = field(default_factory=Future)
    cancel_reason: str | None = None
    steps_run: int = 0
    listener: JobListener | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when its batch began to run

    @property
    def queue_seconds(self) -> float:
        """How long the job waited before its batch ran (so far, if it still waits)."""
        return (self.started_at or time.perf_counter()) - self.submitted_at

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this job: dropped if still queued, interrupted at the next denoising step if running."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None


def preview_sink(handles: dict[int, JobHandle]) -> Callable[[Slice, int, list[Image.Image]], None]:
    """Passes a slice's previews to its job's listener."""

    def sink(piece: Slice, index: int, images: list[Image.Image]) -> None:
        handle = handles[id(piece.job)]
        if handle.listener is not None and not handle.cancelled:
            handle.listener(Preview(index, images))

    return sink


def merge_results(job: GenerationJob, parts: list[GenerationResult]) -> GenerationResult:
    """One job's result from the batches its images ran in (several only after an out-of-memory split)."""
    if len(parts) == 1:
        return parts[0]
    by_seed = {seed: image for part in parts for seed, image in zip(part.seeds, part.images, strict=True)}
    stages = parts[0].stages
    for part in parts[1:]:
        stages = stages + part.stages
    seeds = tuple(seed for seed in job.seeds if seed in by_seed)  # the others were withheld by the safety checker
    return GenerationResult(
        images=[by_seed[seed] for seed in seeds],
        seeds=seeds,
        prompt=parts[0].prompt,
        batch_images=max(p.batch_images for p in parts),
        stages=stages,
        warnings=parts[0].warnings,
        withheld=sum(p.withheld for p in parts),
    )


class BatchProgress:
    """The per-step hook of one batch: counts steps, stops the batch once every job in it is cancelled, logs
    progress at most every `log_seconds`."""

    def __init__(self, handles: list[JobHandle], slices: list[Slice], log_seconds: float):
        self.handles = handles
        self.images = images_in(slices)
        self.log_seconds = log_seconds
        self.steps_done = 0
        self.interrupted = False
        self._started = time.monotonic()
        self._last_log = self._started

    def __call__(self, done: int, total: int) -> bool:
        self.steps_done = done
        for handle in self.handles:
            handle.steps_run = done
            if handle.listener is not None and not handle.cancelled:
                handle.listener(Progress(done, total))
        now = time.monotonic()
        if now - self._last_log >= self.log_seconds:
            self._last_log = now
            log.info("step %d/%d, %d images, %.2f s/step", done, total, self.images, (now - self._started) / done)
        if done < total and all(h.cancelled for h in self.handles):
            self.interrupted = True
            log.info("stopped after %d/%d steps: %s", done, total, self.handles[0].cancel_reason)
            return True
        return False
