"""Optional step caching (`--cache`): diffusers' cache hooks on the transformer reuse work across denoising
steps. `taylorseer[:INTERVAL]` (TaylorSeer: the attention layers run fully every INTERVAL steps, Taylor-series
predictions between). Off by default: it trades exactness for speed, most useful for FLUX.2 dev's 50 steps.

diffusers' First Block Cache is refused: in diffusers 0.42 its hooks fail on FLUX.2's transformer blocks
(a TypeError subtracting their list outputs), checked by tests/test_step_cache.py."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

CacheKind = Literal["off", "taylorseer"]
CACHE_KINDS: tuple[CacheKind, ...] = ("off", "taylorseer")
DEFAULT_INTERVAL = 5


class CacheSpecError(ValueError):
    """A --cache value that cannot be used; the message says what is accepted."""


@dataclass(frozen=True)
class StepCache:
    kind: CacheKind = "off"
    value: int = 0  # taylorseer: steps between full computations

    def __str__(self) -> str:
        return "off" if self.kind == "off" else f"{self.kind}:{self.value}"


def parse_cache(text: str) -> StepCache:
    """ "off", "taylorseer", "taylorseer:4" -> a StepCache."""
    kind, _, raw = text.strip().lower().partition(":")
    if kind == "first-block":
        raise CacheSpecError(
            "cache 'first-block' does not run with FLUX.2 in diffusers 0.42 (its hooks fail on "
            "FLUX.2's blocks); use taylorseer[:INTERVAL]"
        )
    if kind not in CACHE_KINDS:
        raise CacheSpecError(f"cache must be one of {', '.join(CACHE_KINDS)} (taylorseer:INTERVAL), got {text!r}")
    if kind == "off":
        if raw:
            raise CacheSpecError(f"cache 'off' takes no value, got {text!r}")
        return StepCache()
    if not raw:
        return StepCache("taylorseer", DEFAULT_INTERVAL)
    if not raw.isdigit() or int(raw) < 2:
        raise CacheSpecError(f"taylorseer's interval must be a whole number of steps >= 2, got {raw!r}")
    return StepCache("taylorseer", int(raw))


def apply_cache(transformer: object, cache: StepCache) -> None:
    """Register the cache hooks on the transformer (no-op for "off")."""
    if cache.kind == "off":
        return
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig

    transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=cache.value))  # type: ignore[attr-defined]


def cache_context(transformer: Any) -> contextlib.AbstractContextManager[Any]:
    """Around a pipeline call: the cache hooks need a named context for the transformer's calls. klein's pipeline
    opens its own per call; dev's opens none, so without this a cached dev model fails ("No cache context is
    set"). Nothing to do without a cache."""
    if getattr(transformer, "is_cache_enabled", False):
        return transformer.cache_context("cond")  # type: ignore[no-any-return]
    return contextlib.nullcontext()
