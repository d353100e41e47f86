"""Regional compilation: `torch.compile` on the transformer's repeated blocks only (diffusers'
`compile_repeated_blocks`), which compiles one block once and reuses it for all, so compiling takes seconds
instead of minutes. Shapes are marked dynamic and recompiles bounded, so a new image size costs at most one more
compile; a warm-up at load (one image, then a batch of two) makes the first request and the first batch fast.

Not `fullgraph=True`: with it, torch turns the recompile limit into a hard error (`FailOnRecompileLimitHit`), and
what the blocks see changes more than sizes do (attention processors swapped, the reference cache's per-batch
arguments), so a long-running server would eventually fail requests. Without it, a frame past the limit runs
eager. The blocks have no graph breaks, so the compiled graphs are the same.

The VAE decoder stays eager: compiling it (channels-last, dynamic shapes) never finished its warm-up within 230 s
on an H200 (klein-4B, torch 2.11, batches of 1 and 2, inference mode and no_grad), against ~20 s for the
transformer's blocks, for at most the decode's ~0.1 s of a 1024² image."""

from __future__ import annotations

import logging
import time

import torch

from .decoding import decode, latents_for_vae
from .internals import Flux2Pipe
from .step_cache import cache_context

log = logging.getLogger("flux2.loader")

MAX_RECOMPILES = 8  # per compiled block: new sizes beyond this run uncompiled (eager), never fail
WARM_UP_SIDE = 1024  # the default output size


def compile_transformer(pipe: Flux2Pipe) -> None:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_RECOMPILES)
    pipe.transformer.compile_repeated_blocks(fullgraph=False, dynamic=True)


def warm_up(pipe: Flux2Pipe, side: int = WARM_UP_SIDE) -> float:
    """Single-step generations at `side`x`side` with their decodes, one image then a batch of two: a batch of one
    compiles with the batch size fixed at 1 (torch specialises sizes of 1), the batch of two then compiles the
    graphs every larger batch reuses, so the engine's first batch does not stall on a compile. Returns seconds."""
    started = time.perf_counter()
    for batch in (1, 2):
        with torch.inference_mode(), cache_context(pipe.transformer):
            latents = pipe(
                prompt=[f"warm-up {index}" for index in range(batch)],
                height=side,
                width=side,
                num_inference_steps=1,
                output_type="latent",
            )[0]
        decode(pipe, latents_for_vae(pipe, latents, side, side))
    seconds = time.perf_counter() - started
    log.info("model: compiled and warmed up at %dx%d (batches of 1 and 2) in %.1f s", side, side, seconds)
    return seconds
