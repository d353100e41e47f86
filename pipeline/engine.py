"""The engine: one worker thread owns the device and the models; jobs wait in a bounded queue and run in batches.

It knows nothing of HTTP. `submit` returns a `JobHandle` whose `future` (a `concurrent.futures.Future`, awaited
by an asyncio server with `asyncio.wrap_future`) carries the result, and whose `cancel` stops the job at the next
denoising step. Jobs that can share a pipeline call (same model, size, steps, guidance and references) are
coalesced up to `max_batch_images`; each image keeps its own prompt and seed. A batch waits up to `batch_window`
seconds for companions only while the server announces requests still on their way (`arriving`): a lone request
starts at once. A CUDA out-of-memory error frees the cache and retries the batch in halves before failing the
job."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .adapters import Adapters
from .batching import Slice, images_in, split_in_half
from .handles import BatchProgress, JobHandle, merge_results, preview_sink
from .internals import execution_device
from .jobs import (
    BatchOutcome,
    BatchReport,
    EngineHealth,
    EngineState,
    EngineStats,
    EngineUnavailable,
    GenerationJob,
    GenerationResult,
    JobCancelled,
    JobListener,
    ModelLoadFailed,
    OutOfDeviceMemory,
    QueueFull,
)
from .loader import LoadedModel
from .pool import ModelPool, release_device_memory
from .prompt_enhancement import DEFAULT_MAX_NEW_TOKENS, PromptEnhancer
from .runner import run_batch
from .safety import TOLERANCE_THRESHOLDS, SafetyChecker
from .text_cache import PromptCache
from .weights import ModelSpec

log = logging.getLogger("flux2.engine")

# The request ids of the batch the worker is running ("a,b,c"), for log lines written meanwhile (the engine's own,
# diffusers' warnings): a logging filter can read it.
running_request_ids: contextvars.ContextVar[str] = contextvars.ContextVar("running_request_ids", default="")


class Arrival:
    """A request on its way to `Engine.submit`; release it once (idempotent), or use it as a context manager."""

    def __init__(self, engine: Engine):
        self._engine: Engine | None = engine

    def release(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine._arrived()

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(frozen=True)
class EngineOptions:
    """How the engine batches and queues; the command line's defaults come from here."""

    max_batch_images: int = 4  # images compatible jobs may share in one pipeline call
    batch_window: float = 0.02  # seconds a batch waits for companions still arriving
    max_queue_images: int = 64  # images allowed to wait; beyond, QueueFull
    prompt_cache_bytes: int = 512 * 1024**2  # CPU memory for cached prompt embeddings
    progress_log_seconds: float = 10.0  # a running batch logs its progress at most this often
    enhancer_model: str | None = None  # a causal LM folder for prompt_enhancement; None: the model's own encoder
    enhancer_max_tokens: int = DEFAULT_MAX_NEW_TOKENS  # tokens a prompt rewrite may have
    safety_checker: str | None = None  # an image-classification model folder or hub id; None: no screening
    safety_labels: tuple[str, ...] = ()  # the classifier's unsafe labels; (): found by name ("nsfw", ...)
    safety_thresholds: tuple[float, ...] = TOLERANCE_THRESHOLDS  # unsafe probability flagged at tolerance 1..5


class Engine:
    """The public surface: `start`, `stop`, `submit` -> `JobHandle` (`cancel`), `arriving`, `state`, `health()`,
    `stats()`, `model_specs()`, `model_adapters()`, `wait_ready`; `on_batch` hears a `BatchReport` after every
    pipeline call."""

    def __init__(
        self,
        pool: ModelPool,
        options: EngineOptions = EngineOptions(),
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        **overrides: Any,
    ):
        options = replace(options, **overrides) if overrides else options
        self.pool = pool
        self.options = options
        self.on_batch = on_batch
        self.prompt_cache = PromptCache(options.prompt_cache_bytes)
        # Totals over the loaded models' reference stores, taken by the worker after each batch (the pool is the
        # worker's; the HTTP side reads this dict, replaced whole).
        self._reference_stats: dict[str, int] = {}
        self.enhancer = PromptEnhancer(options.enhancer_model, options.enhancer_max_tokens)
        self.safety: SafetyChecker | None = None  # loaded by the worker with the default model
        pool.on_evict = lambda name: self.prompt_cache.drop_model(str(pool.configs[name].spec.path))
        self._queue: deque[JobHandle] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="flux2-engine", daemon=True)
        self._ready = threading.Event()
        self._stopping = False
        self._running: list[JobHandle] = []
        self._seconds_per_image = 1.0  # measured: exponential average over finished batches
        self._arriving = 0  # requests the server has begun to receive and not yet submitted
        self.load_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def begin_stop(self) -> None:
        """Take no more jobs (state "stopping"); queued and running ones go on."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; let queued and running ones finish for up to `timeout` seconds, then cancel them."""
        self.begin_stop()
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel_all("the server is shutting down")
            self._thread.join(max(5.0, timeout))

    def cancel_all(self, reason: str) -> None:
        """Cancel every queued and running job: each ends with JobCancelled(`reason`), a running one at its next
        denoising step."""
        with self._cond:
            for handle in list(self._queue) + self._running:
                handle.cancel(reason)
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        """No job queued or running."""
        with self._cond:
            return not self._queue and not self._running

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.load_error is None

    @property
    def state(self) -> EngineState:
        if self._stopping:
            return "stopping"
        if self.load_error is not None:
            return "failed"
        return "ready" if self._ready.is_set() else "loading"

    def health(self) -> EngineHealth:
        return EngineHealth(
            state=self.state,
            models_loaded=tuple(self.pool.loaded),
            queued_images=self.queued_images,
            running_images=self.running_images,
            load_error=self.load_error,
            safety_checker=self.options.safety_checker,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            queued_images=self.queued_images,
            running_images=self.running_images,
            prompt_cache_hits=self.prompt_cache.hits,
            prompt_cache_misses=self.prompt_cache.misses,
            device_memory_bytes=torch.cuda.memory_allocated() if torch.cuda.is_available() else 0,
            **self._reference_stats,
        )

    def model_specs(self) -> dict[str, ModelSpec]:
        """What each served model is (family, defaults), by name; the first is the default model."""
        return {name: config.spec for name, config in self.pool.configs.items()}

    def model_adapters(self) -> dict[str, Adapters]:
        """The LoRA adapters each served model has, by name."""
        return {name: config.adapters for name, config in self.pool.configs.items()}

    @property
    def queued_images(self) -> int:
        with self._cond:
            return sum(h.job.n for h in self._queue if not h.cancelled)

    @property
    def running_images(self) -> int:
        with self._cond:
            return sum(h.job.n for h in self._running)

    # -- submitting ----------------------------------------------------------------------------------------------
    def arriving(self) -> Arrival:
        """Announce a request the server has begun to receive: until the returned `Arrival` is released (once it
        is submitted, or refused), a batch about to start waits up to `batch_window` for it. With none announced,
        a job starts at once."""
        with self._cond:
            self._arriving += 1
        return Arrival(self)

    def _arrived(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, job: GenerationJob, listener: JobListener | None = None) -> JobHandle:
        """Queue `job`. `listener`, if given, hears its progress after every step and its previews (when the job
        asks for partial images), on the worker thread: it must return quickly."""
        with self._cond:
            if self._stopping:
                raise EngineUnavailable("the server is shutting down")
            if self.load_error is not None:
                raise ModelLoadFailed(f"the model failed to load: {self.load_error}")
            if not self._ready.is_set():
                raise EngineUnavailable("loading")
            queued = sum(h.job.n for h in self._queue if not h.cancelled)
            if queued and queued + job.n > self.options.max_queue_images:
                ahead = queued + sum(h.job.n for h in self._running)
                raise QueueFull(queued, retry_after=max(1.0, ahead * self._seconds_per_image))
            handle = JobHandle(job, listener=listener)
            self._queue.append(handle)
            self._cond.notify_all()
            return handle

    # -- the worker ----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            # No local name for the default model: this frame lives as long as the worker, and would keep the model
            # (its weights on the device) alive after the pool evicts it.
            self.safety = self._load_safety_checker(execution_device(self.pool.get().pipe))
        except Exception as exc:  # any load failure is reported, never raised into a dead thread
            log.exception("the default model or the safety checker failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
        while (batch := self._next_batch()) is not None:
            if self.load_error is not None:
                for handle in batch:
                    handle.future.set_exception(ModelLoadFailed(f"the model failed to load: {self.load_error}"))
                continue
            self._run(batch)

    def _load_safety_checker(self, device: torch.device) -> SafetyChecker | None:
        source = self.options.safety_checker
        if source is None:
            log.warning("no safety checker configured (--safety-checker): generated images are not screened")
            return None
        return SafetyChecker.load(source, device, self.options.safety_thresholds, self.options.safety_labels)

    def _next_batch(self) -> list[JobHandle] | None:
        """Block for the next job, then gather compatible ones for up to `batch_window` seconds."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            key = batch[0].job.batch_key
            images = batch[0].job.n
            window_ends = time.monotonic() + self.options.batch_window
            while images < self.options.max_batch_images:
                for handle in list(self._queue):
                    if (
                        not handle.cancelled
                        and handle.job.batch_key == key
                        and images + handle.job.n <= self.options.max_batch_images
                    ):
                        self._queue.remove(handle)
                        batch.append(handle)
                        images += handle.job.n
                remaining = window_ends - time.monotonic()
                if images >= self.options.max_batch_images or remaining <= 0 or self._stopping or not self._arriving:
                    break
                self._cond.wait(remaining)
            self._running = batch
            return batch

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._queue if h.cancelled]:
            self._queue.remove(handle)
            handle.future.set_exception(JobCancelled(handle.cancel_reason))

    def _run(self, batch: list[JobHandle]) -> None:
        started = time.perf_counter()
        for handle in batch:
            handle.started_at = started
            handle.future.set_running_or_notify_cancel()
        job = batch[0].job
        try:
            model = self.pool.get(job.model or None)
        except Exception as exc:
            log.exception("model %s failed to load", job.model)
            self._finish(batch, {id(h): exc for h in batch}, {})
            return
        book = _BatchBook({id(h.job): h for h in batch}, {id(h): [] for h in batch})
        token = running_request_ids.set(",".join(h.job.request_id for h in batch if h.job.request_id))
        try:
            self._run_slices(model, [Slice(h.job, h.job.seeds) for h in batch], book)
        finally:
            running_request_ids.reset(token)
        self._reference_stats = self._reference_totals()
        self._finish(batch, book.failures, book.results)

    def _retry_after_oom(self, model: LoadedModel, slices: list[Slice], book: _BatchBook, store_dropped: bool) -> bool:
        """After a batch ran out of device memory: once with every model's kept reference K/V dropped, else split in
        half, else (one image) fail its job. True when the batch was retried (its outcome is the retries')."""
        kept = sum(
            loaded.reference_store.clear() for loaded in self.pool.loaded_models() if loaded.reference_store is not None
        )
        release_device_memory()
        if kept and not store_dropped:  # reference K/V kept from earlier edits held memory: once more without
            log.warning(
                "out of device memory for %d images with %.2f GiB of kept reference K/V: dropped them, retrying",
                images_in(slices),
                kept / 1024**3,
            )
            self._run_slices(model, slices, book, store_dropped=True)
            return True
        if images_in(slices) == 1:
            log.error("out of device memory even for one image")
            book.failures[id(book.handles[id(slices[0].job)])] = OutOfDeviceMemory(
                "the device ran out of memory for a single image"
            )
            return False
        left, right = split_in_half(slices)
        log.warning(
            "out of device memory for %d images: retrying as %d + %d",
            images_in(slices),
            images_in(left),
            images_in(right),
        )
        self._run_slices(model, left, book, store_dropped)
        self._run_slices(model, right, book, store_dropped)
        return True

    def _reference_totals(self) -> dict[str, int]:
        stores = [model.reference_store for model in self.pool.loaded_models() if model.reference_store is not None]
        return {
            "reference_store_hits": sum(store.hits for store in stores),
            "reference_store_misses": sum(store.misses for store in stores),
            "reference_store_bytes": sum(store.size for store in stores),
        }

    def _run_slices(
        self,
        model: LoadedModel,
        slices: list[Slice],
        book: _BatchBook,
        store_dropped: bool = False,  # a retry after dropping the kept reference K/V: not again (it may refill it)
    ) -> None:
        handles, results, failures = book.handles, book.results, book.failures
        slices = [s for s in slices if id(handles[id(s.job)]) not in failures]
        if not slices:
            return
        mine = [handles[id(s.job)] for s in slices]
        progress = BatchProgress(mine, slices, self.options.progress_log_seconds)
        started = time.perf_counter()
        outcome: BatchOutcome = "ok"
        sink = preview_sink(handles) if any(h.listener and h.job.partial_images for h in mine) else None
        if sink is not None and self.safety is not None:
            sink = self.safety.screen_previews(sink)
        try:
            outputs = run_batch(
                model,
                slices,
                self.prompt_cache,
                progress,
                sink,
                wanted=lambda piece: not handles[id(piece.job)].cancelled,
                enhancer=self.enhancer,
            )
            for piece, result in zip(slices, outputs, strict=True):
                if result is not None:  # None: cancelled meanwhile, not decoded
                    if self.safety is not None:
                        result = self.safety.screen(piece.job, result)
                    results[id(handles[id(piece.job)])].append(result)
            if progress.interrupted:
                outcome = "cancelled"
        except torch.OutOfMemoryError:
            outcome = "oom"
        except Exception as exc:
            outcome = "error"
            log.exception("a batch of %d images failed", images_in(slices))
            for handle in mine:
                failures.setdefault(id(handle), exc)
        # Out of memory: handled here, after the handler, so that the failed call's frames (its activations, the
        # reference K/V it held) are released before anything is tried again.
        if outcome == "oom" and self._retry_after_oom(model, slices, book, store_dropped):
            return
        seconds = time.perf_counter() - started
        if outcome == "ok":
            per_image = seconds / images_in(slices)
            self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * per_image
        if self.on_batch is not None:
            first = slices[0].job
            self.on_batch(
                BatchReport(
                    model=first.model or self.pool.default,
                    images=images_in(slices),
                    steps_run=progress.steps_done,
                    seconds=seconds,
                    megapixels=sum(len(s.seeds) * s.job.width * s.job.height for s in slices) / 1024**2,
                    outcome=outcome,
                )
            )

    def _finish(
        self, batch: list[JobHandle], failures: dict[int, BaseException], results: dict[int, list[GenerationResult]]
    ) -> None:
        with self._cond:
            self._running = []
        for handle in batch:
            if handle.cancelled:
                handle.future.set_exception(JobCancelled(handle.cancel_reason))
            elif id(handle) in failures:
                handle.future.set_exception(failures[id(handle)])
            else:
                handle.future.set_result(merge_results(handle.job, results[id(handle)]))


@dataclass
class _BatchBook:
    """One batch's jobs (handles by their job's id) and what each got: its results (several pipeline calls after
    an out-of-memory split) or its failure."""

    handles: dict[int, JobHandle]
    results: dict[int, list[GenerationResult]]
    failures: dict[int, BaseException] = field(default_factory=dict)
