"""The first passes through streamed components, run at load instead of in the first requests.

diffusers' group offloading with CUDA streams prefetches the next group while one runs, but learns the order the
groups run in from the first forward pass: that pass copies every group in the foreground, blocking
(`LazyPrefetchGroupOffloadingHook`), and only the passes after it overlap copies with compute. Under a streamed
plan (`encoder-streamed`, `block-streaming`) the first request would pay that pass. On an H200 under a 12 GiB cap
the first image after one warm-up image also took 1.0 s where the later ones took 0.63 s (cause not known yet:
the bench now records the allocator's retries). So a model whose streamed components have not traced their order
runs the runner itself at load, `passes` times: a one-step image at the default size through the same stages a
request takes (the text encode cut where FLUX.2 stops reading, the klein base model's empty negative prompt, the
denoise, the final decode), with a prompt cache of its own, so nothing a request sees is touched. Where nothing
streams with prefetching (resident plans, swapped plans, a CPU) this does nothing. A warm-up that fails (out of
memory, say) is logged and the model serves anyway."""

from __future__ import annotations

import logging
import time

from .batching import Slice
from .compilation import WARM_UP_SIDE
from .internals import prefetch_order_pending
from .jobs import GenerationJob
from .loader import LoadedModel
from .runner import run_batch
from .text_cache import PromptCache

log = logging.getLogger("flux2.loader")

PASSES = 2  # the tracing pass, then one with prefetching (its first copies on the side stream)
_STREAMED = ("text_encoder", "transformer", "vae")


def pending(model: LoadedModel) -> list[str]:
    """The model's components whose prefetch order is still to be traced by their first forward pass."""
    return [name for name in _STREAMED if prefetch_order_pending(getattr(model.pipe, name, None))]


def warm_up_streams(model: LoadedModel, side: int = WARM_UP_SIDE, passes: int = PASSES) -> list[float]:
    """Run `passes` one-step images through the runner if some component has its prefetch order to trace; the
    seconds of each pass ([] when nothing streams with prefetching)."""
    components = pending(model)
    if not components:
        return []
    defaults = model.spec.defaults
    seconds: list[float] = []
    for index in range(passes):
        job = GenerationJob(
            prompt=f"warm-up {index}",  # a new prompt per pass: each encodes, as a request's cache miss does
            width=side,
            height=side,
            run_width=side,
            run_height=side,
            seeds=(0,),
            steps=1,
            guidance_scale=defaults.guidance_scale,
        )
        started = time.perf_counter()
        try:
            run_batch(model, [Slice(job, job.seeds)], PromptCache(1 << 30))
        except Exception as exc:  # the model still serves: its first request then traces, as without the warm-up
            log.warning("offload: the load warm-up of streamed %s failed: %s: %s", components, type(exc).__name__, exc)
            return seconds
        seconds.append(time.perf_counter() - started)
    log.info(
        "offload: streamed %s warmed up at load (their prefetch order traced): %d one-step %dx%d images, %s s",
        ", ".join(components),
        passes,
        side,
        side,
        " + ".join(f"{s:.2f}" for s in seconds),
    )
    return seconds
