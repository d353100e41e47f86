"""The engine's unit of work and its result: plain frozen data, no HTTP and no torch in them."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class GenerationJob:
    """One request's worth of images, normalized: every default resolved, every size final.

    `width` x `height` is what the client gets; `run_width` x `run_height` (multiples of 16, same aspect and area)
    is what the model computes, resized to the delivered size at the end when they differ."""

    prompt: str
    width: int
    height: int
    run_width: int
    run_height: int
    seeds: tuple[int, ...]  # one per image: image i is reproducible alone with seeds[i]
    steps: int
    guidance_scale: float

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image] = field(repr=False)
    seeds: tuple[int, ...]
    seconds: float
