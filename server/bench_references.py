"""The reference cache (`--reference-cache on`, pipeline/reference_cache.py) in the full-size bench.

Figures: the 1-, 4- and 10-reference edits again with the cache on, served by the same server (the loaded model's
cache switched on for these figures only, with a reference store that keeps nothing: each run pays its references'
encode and pass, as a first edit with them does), against diffusers' `Flux2KleinKVPipeline` on the same weights (the
same semantics); and the 4-reference edit repeated with its set in the reference store (filled once before the runs,
each run a new prompt: what a studio iterating on one set of references pays). The KV pipeline is built from the
components, not with `from_pipe`: `from_pipe` casts the shared modules to float32 unless told the dtype, the likely
cause of the 3.8x slowdown ../shared/GPU.md measured. The check: one
4-reference edit with the cache off and on and through the KV pipeline, same seed; the cached image's difference
from the other two (random weights: a numerical check only), and seconds per step with 0/1/4/10 references."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.loader import LoadedModel
from pipeline.reference_cache import ATTENTION_KWARG, ReferenceStore, install, prefill

from .bench_figures import Figure
from .bench_harness import StepTimer, plain_png, seeded_image, synchronize

COUNTS = (1, 4, 10)
REPEATED = (4, 10)  # the references counts of the figures whose set comes from the reference store


@contextlib.contextmanager
def cache_switched_on(loaded: LoadedModel, store: ReferenceStore | None = None) -> Iterator[None]:
    """The served model runs with `--reference-cache on` inside the block (our processors put back where building
    the KV pipeline put its own on the shared transformer; a layer that has ours keeps them), with `store` as its
    reference store: by default one that keeps nothing, so every edit pays its references' encode and pass, as a
    first edit does."""
    before = loaded.placement, loaded.reference_store
    install(loaded.pipe.transformer)
    loaded.placement = dataclasses.replace(before[0], reference_cache=True)
    loaded.reference_store = store if store is not None else ReferenceStore(0)
    try:
        yield
    finally:
        loaded.placement, loaded.reference_store = before


def kv_pipeline(pipe: Any) -> Any:
    """diffusers' KV pipeline on the same modules, in their dtype (its constructor sets its processors)."""
    from diffusers import Flux2KleinKVPipeline

    kv = Flux2KleinKVPipeline(**pipe.components, is_distilled=pipe.config.get("is_distilled", True))
    kv.set_progress_bar_config(disable=True)
    return kv


def reference_cache_figures(
    family: str,
    pipe: Any,
    loaded: LoadedModel,
    client: Any,
    prompts: Callable[[], list[str]],
    references: list[bytes],
    reference_pils: list[Any],
    size: int,
    steps: int,
    compiled: bool = False,
) -> list[Figure]:
    """The cached edits, served; against diffusers' KV pipeline on klein, except on a compiled pipeline: the KV
    pipeline puts its own processors on the shared transformer at every call and ours go back for every served
    edit, and each swap would cost the compiled blocks a recompile (past the limit they run eager)."""

    def served(count: int, store: ReferenceStore | None = None) -> None:
        with cache_switched_on(loaded, store):
            client.edit(prompts()[0], size, references[:count])

    def repeated(count: int) -> Figure:
        kept = ReferenceStore(1 << 40)  # the figure's own: its set stays, whatever its size
        return Figure(
            f"edit_{count}_repeated",
            f"edit, the same {count} references again, --reference-cache on (reference store hit)",
            lambda: served(count, kept),
            None,
            "no plain equivalent: diffusers keeps nothing across calls",
            prepare=lambda: served(count, kept),  # the first edit with these references fills the store
            cleanup=kept.clear,  # its set leaves the card with the figure
        )

    def direct(count: int) -> None:
        output = kv_pipeline(pipe)(
            prompt=prompts(),
            image=reference_pils[:count],
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=[torch.Generator("cpu").manual_seed(0)],
        )
        for image in output.images:
            plain_png(image)

    against_kv = family == "klein" and not compiled  # the KV pipeline is klein's only
    no_direct = "not measured under --compile" if compiled else "no plain equivalent"
    return [
        Figure(
            f"edit_{count}_cached",
            f"edit, {count} reference{'s' if count > 1 else ''}, --reference-cache on",
            lambda count=count: served(count),
            (lambda count=count: direct(count)) if against_kv else None,
            "Flux2KleinKVPipeline (same weights, dtype kept)" if against_kv else no_direct,
        )
        for count in COUNTS
    ] + [repeated(count) for count in REPEATED]


def reference_cache_check(
    pipe: Any, family: str, size: int, steps: int, device: str, say: Callable[[str], None]
) -> dict:
    """One 4-reference edit three ways (uncached, cached, KV pipeline) with one seed, and s/step by reference count."""
    import numpy as np

    from .bench_harness import reference_images

    _, refs = reference_images(max(COUNTS), size)
    prompt = "a lighthouse on a cliff at dusk"

    def edit(count: int, cached: bool) -> tuple[Any, float, float]:
        """(image as floats in [0, 1], seconds, median seconds per transformer call in the steps)."""
        extra: dict[str, Any] = {}
        synchronize(device)
        started = time.perf_counter()
        if count and cached:
            install(pipe.transformer)
            with torch.inference_mode():
                extra["attention_kwargs"] = {ATTENTION_KWARG: prefill(pipe, [tuple(refs[:count])], 1.0)}
        elif count:
            extra["image"] = refs[:count]
        timer = StepTimer(pipe.transformer, device)
        try:
            output = seeded_image(pipe, prompt, size, steps, **extra)
        finally:
            step = timer.detach()
        synchronize(device)
        return output, time.perf_counter() - started, step

    result: dict[str, Any] = {"size": size, "steps": steps, "per_step_s": {}, "edit_s": {}}
    for count in (0, *COUNTS):
        for cached in (False, True) if count else (False,):
            _, seconds, step = edit(count, cached)
            label = f"{count}{'_cached' if cached else ''}"
            result["per_step_s"][label], result["edit_s"][label] = step, seconds
    uncached, _, _ = edit(4, False)
    cached, _, _ = edit(4, True)
    result["cached_vs_uncached"] = _difference(cached, uncached)
    if family == "klein":
        theirs = seeded_image(kv_pipeline(pipe), prompt, size, steps, image=refs[:4])
        result["cached_vs_kv_pipeline"] = _difference(cached, np.asarray(theirs))
        install(pipe.transformer)  # ours behave as diffusers' own without a cache; the KV pipeline's set its own
    say(summary(result))
    return result


def _difference(a: Any, b: Any) -> dict:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {
        "max_abs_255": float(np.abs(a - b).max() * 255),
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse),
    }


def summary(check: dict) -> str:
    """One line for the table's head and the docs."""
    steps, edits = check["per_step_s"], check["edit_s"]
    by_count = "; ".join(
        f"{count} refs {edits[str(count)] / edits['0']:.2f}x off -> {edits[f'{count}_cached'] / edits['0']:.2f}x on "
        f"(s/step {steps[str(count)] / steps['0']:.2f}x -> {steps[f'{count}_cached'] / steps['0']:.2f}x)"
        for count in COUNTS
    )
    versus = check["cached_vs_uncached"]
    line = (
        f"reference cache, {check['size']}x{check['size']}, {check['steps']} steps, edit time against a generation's "
        f"({edits['0']:.3f} s): {by_count}; 4 references cached vs uncached: max {versus['max_abs_255']:.1f}/255, "
        f"PSNR {versus['psnr_db']:.1f} dB"
    )
    kv = check.get("cached_vs_kv_pipeline")
    if kv:
        line += f"; cached vs Flux2KleinKVPipeline: max {kv['max_abs_255']:.2f}/255, PSNR {kv['psnr_db']:.1f} dB"
    return line + " (random weights: a numerical check only)"
