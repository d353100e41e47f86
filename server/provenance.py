"""What each image file records about how it was made (the record `pipeline.file_metadata` embeds), so that the
file alone is enough to make it again (`flux2-local reproduce`).

A record holds the request as the job ran it: the prompt (and the revised prompt when the model saw less of it, or
rewrote it), this image's seed and its place among the n of its request, steps, guidance, the delivered size, the
served model, prompt enhancement and LoRA adapters when used, the output format and quality, the mode (generation,
edit or variation) and, for edits, the SHA-256 of each uploaded image and of the mask: the images themselves are not
embedded, so reproducing an edit needs the same files. No time and no request id: the same request makes the same
file, byte for byte."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipeline.codecs import resolve_quality
from pipeline.jobs import GenerationJob

MODES = ("generation", "edit", "variation")


@cache
def server_version() -> str:
    """This package's installed version ("unknown" when it runs from a source tree that is not installed)."""
    try:
        return version("flux2-local")
    except PackageNotFoundError:
        return "unknown"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Sources:
    """Where a request's images came from: its mode, and the hashes of the files it uploaded (edits)."""

    mode: str = "generation"
    references: tuple[str, ...] = ()  # SHA-256 of each uploaded image, in the order sent
    mask: str | None = None  # SHA-256 of the uploaded mask

    @classmethod
    def uploaded(cls, mode: str, images: list[bytes], mask: bytes | None) -> Sources:
        return cls(mode, tuple(sha256_hex(data) for data in images), sha256_hex(mask) if mask is not None else None)


GENERATION = Sources()


@dataclass(frozen=True)
class Provenance:
    """The record shared by every image of one request; `record` adds what is each image's own."""

    common: dict[str, Any]

    def record(self, index: int, seed: int, used_prompt: str) -> dict[str, Any]:
        own: dict[str, Any] = {"seed": seed, "index": index}
        if used_prompt != self.common["prompt"]:
            own["revised_prompt"] = used_prompt
        return {**self.common, **own}


def provenance(job: GenerationJob, output_format: str, codec_quality: int | None, sources: Sources) -> Provenance:
    common: dict[str, Any] = {
        "version": server_version(),
        "mode": sources.mode,
        "model": job.model,
        "prompt": job.prompt,
        "n": job.n,
        "steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "size": f"{job.width}x{job.height}",
        "output_format": output_format,
        "background": "opaque",
    }
    quality = resolve_quality(output_format, codec_quality)
    if quality is not None:
        common["output_compression"] = quality
    if job.enhance_prompt:  # the rewrite is the seed's: asking again with enhancement on gives it again
        common["prompt_enhancement"] = "on"
    if job.loras:
        common["loras"] = [{"name": name, "scale": scale} for name, scale in job.loras]
    if sources.mode != "generation":
        common["references"] = list(sources.references)
        common["references_embedded"] = False
        if sources.mask is not None:
            common["mask_sha256"] = sources.mask
    return Provenance(common)
