"""The engine's contract in types: its unit of work and result, the events a job's listener hears, the reports
and snapshots it gives, and the exceptions it raises. Plain data, no HTTP in them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from PIL import Image

from .prompts import PromptTokens


@dataclass(frozen=True)
class GenerationJob:
    """One request's worth of images, normalized: every default resolved, every size final.

    `width` x `height` is what the client gets; `run_width` x `run_height` (multiples of 16, same aspect and area)
    is what the model computes, resized to the delivered size at the end when they differ. `references` are RGB
    images already decoded and capped at 4 MP; `mask` (mode "L", the first reference's size, 255 = repaint) limits
    the change to its white region: everything else comes back as the first reference has it."""

    prompt: str
    width: int
    height: int
    run_width: int
    run_height: int
    seeds: tuple[int, ...]  # one per image: image i is reproducible alone with seeds[i]
    steps: int
    guidance_scale: float
    references: tuple[Image.Image, ...] = field(default=(), repr=False)
    mask: Image.Image | None = field(default=None, repr=False)
    model: str = ""  # the served model name ("" = the engine's default model)
    request_id: str = ""
    partial_images: int = 0  # previews to stream while denoising (0-3)
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale), sorted by name; () = none
    enhance_prompt: bool = False  # rewrite the prompt with a language model first (prompt_enhancement "on")
    safety_tolerance: int | None = None  # 1 (strict) to 5 (permissive): screen the outputs; None: no screening

    @property
    def n(self) -> int:
        return len(self.seeds)

    @cached_property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call: same model, model size, steps, guidance, LoRA adapters
        and the same reference images (by content). Masked edits run alone."""
        if self.mask is not None:
            return ("alone", id(self))
        return (
            self.model,
            self.run_width,
            self.run_height,
            self.steps,
            self.guidance_scale,
            self.loras,
            self.reference_digests,
        )

    @cached_property
    def reference_digests(self) -> tuple[bytes, ...]:
        """Each reference image by content (mode, size and pixels): what the caches keyed by references use.
        Several are hashed on as many threads (hashlib releases the GIL); the server asks for them before it
        submits the job, so the engine's worker never hashes (4 references of 1024² cost ~35 ms there, which the
        H100's Server-Timing showed as queue time)."""
        if len(self.references) < 2:
            return tuple(_digest(image) for image in self.references)
        with ThreadPoolExecutor(max_workers=min(len(self.references), 8), thread_name_prefix="digest") as pool:
            return tuple(pool.map(_digest, self.references))


@dataclass(frozen=True)
class StageTimes:
    """Where one pipeline call's time went, in seconds (device work included: the stages are synchronized)."""

    text_encode: float = 0.0
    prompt_cached: bool = False  # every prompt of the call came from the embedding cache
    denoise: float = 0.0
    decode: float = 0.0
    enhance: float = 0.0  # rewriting prompts (prompt_enhancement), before the text encoding
    safety: float = 0.0  # screening the outputs with the safety checker, after the decode
    # With the reference cache: the references' K/V (VAE encode and one pass, or the store's copy), before the
    # denoise; without, the references are encoded inside the denoise.
    references: float = 0.0
    references_cached: bool = False  # every reference set of the call came from the reference store

    def __add__(self, other: StageTimes) -> StageTimes:
        return StageTimes(
            self.text_encode + other.text_encode,
            self.prompt_cached and other.prompt_cached,
            self.denoise + other.denoise,
            self.decode + other.decode,
            self.enhance + other.enhance,
            self.safety + other.safety,
            self.references + other.references,
            self.references_cached and other.references_cached,
        )


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image] = field(repr=False)
    seeds: tuple[int, ...]
    prompt: PromptTokens  # what the text encoder saw of the prompt
    batch_images: int = 1  # images in the pipeline call(s) this job ran in
    stages: StageTimes = StageTimes()
    warnings: tuple[str, ...] = ()  # what the engine changed about the job, in words (a rewrite that fell back)
    withheld: int = 0  # images the safety checker flagged: not in `images` (nor their seeds in `seeds`)


# -- what a job's listener hears (on the engine's worker thread: it must return quickly) ------------------------
@dataclass(frozen=True)
class Progress:
    done: int
    total: int


@dataclass(frozen=True)
class Preview:
    index: int  # 0-based, in the order the previews were taken
    images: list[Image.Image]  # one per image of the job


JobListener = Callable[[Progress | Preview], None]


# -- what the engine reports -----------------------------------------------------------------------------------
EngineState = Literal["loading", "ready", "failed", "stopping"]
BatchOutcome = Literal["ok", "cancelled", "oom", "error"]


@dataclass(frozen=True)
class BatchReport:
    """What one pipeline call did, for metrics."""

    model: str
    images: int
    steps_run: int
    seconds: float
    megapixels: float
    outcome: BatchOutcome


@dataclass(frozen=True)
class EngineHealth:
    state: EngineState
    models_loaded: tuple[str, ...]
    queued_images: int
    running_images: int
    load_error: str | None = None
    safety_checker: str | None = None  # the safety checker's folder or id, None when none is configured


@dataclass(frozen=True)
class EngineStats:
    """Counters for metrics."""

    queued_images: int
    running_images: int
    prompt_cache_hits: int
    prompt_cache_misses: int
    device_memory_bytes: int  # allocated on the CUDA device, 0 without one
    # The loaded models' reference stores (--reference-cache on): sets found, sets computed, bytes kept.
    reference_store_hits: int = 0
    reference_store_misses: int = 0
    reference_store_bytes: int = 0


# -- what the engine raises ------------------------------------------------------------------------------------
class EngineUnavailable(Exception):
    """The engine cannot take or run jobs: the model is loading or failed to load, or it is shutting down."""


class ModelLoadFailed(EngineUnavailable):
    """The model failed to load: no retry helps until its operator fixes the cause and restarts the server."""


class QueueFull(Exception):
    def __init__(self, queued_images: int, retry_after: float):
        super().__init__(f"{queued_images} images are already queued")
        self.queued_images = queued_images
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job was cancelled (client gone, timeout, shutdown) before it finished."""


class OutOfDeviceMemory(Exception):
    """Even a single image did not fit in device memory."""


def _digest(image: Image.Image) -> bytes:
    digest = hashlib.blake2b(f"{image.mode} {image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.digest()
