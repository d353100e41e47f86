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
from PIL import Image

from .decoding import decode, latents_for_vae
from .encoder_depth import reading_depth
from .encoder_graphs import graphed
from .internals import Flux2Pipe, forget_attention_kwargs
from .reference_cache import ATTENTION_KWARG, installed, prefill
from .references import prepare_reference
from .step_cache import cache_context

log = logging.getLogger("flux2.loader")

MAX_RECOMPILES = 8  # per compiled block: new sizes beyond this run uncompiled (eager), never fail
WARM_UP_SIDE = 1024  # the default output size
WARM_UP_GUIDANCE = 4.0  # any value: dev's reference pass embeds it, the graphs do not depend on it


def compile_transformer(pipe: Flux2Pipe) -> None:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_RECOMPILES)
    pipe.transformer.compile_repeated_blocks(fullgraph=False, dynamic=True)


def warm_up(pipe: Flux2Pipe, side: int = WARM_UP_SIDE, references: bool | None = None) -> float:
    """Single-step generations at `side`x`side` with their decodes, one image then a batch of two: a batch of one
    compiles with the batch size fixed at 1 (torch specialises sizes of 1), the batch of two then compiles the
    graphs every larger batch reuses, so the engine's first batch does not stall on a compile. With the reference
    cache's processors installed (`references`, default: whether they are), the same for an edit with one cached
    reference: its prefill and its steps are graphs of their own (the attention's arguments differ), which the
    first edit would otherwise compile inside its request (on an H100 the bench's 4-reference warm-up took 37 s).
    Any number of references reuses them (the shapes are dynamic). Returns seconds."""
    started = time.perf_counter()
    edits = installed(pipe.transformer) if references is None else references
    # Not square: a token count equal to another dimension (a 1024² reference has 4096 tokens, klein-9B's hidden
    # size) would be specialised on by torch's duck sizing, and other reference sizes would compile again.
    reference = prepare_reference(Image.new("RGB", (side, side - 32), (128, 128, 128)))
    for batch in (1, 2):
        # The text encode as requests run it (up to the deepest state read, from a CUDA graph where the encoder has
        # them: captured here): a streamed encoder (encoder-streamed with --compile) learns its prefetch order from
        # this first pass.
        with torch.inference_mode(), cache_context(pipe.transformer), reading_depth(pipe), graphed(pipe):
            latents = pipe(
                prompt=[f"warm-up {index}" for index in range(batch)],
                height=side,
                width=side,
                num_inference_steps=1,
                output_type="latent",
            )[0]
            if edits:
                kv = prefill(pipe, [(reference,)] * batch, WARM_UP_GUIDANCE)
                try:
                    pipe(
                        prompt=[f"warm-up edit {index}" for index in range(batch)],
                        height=side,
                        width=side,
                        num_inference_steps=1,
                        guidance_scale=WARM_UP_GUIDANCE,
                        output_type="latent",
                        attention_kwargs={ATTENTION_KWARG: kv},
                    )
                finally:
                    del kv
                    forget_attention_kwargs(pipe)
        decode(pipe, latents_for_vae(pipe, latents, side, side))
    seconds = time.perf_counter() - started
    log.info(
        "model: compiled and warmed up at %dx%d (batches of 1 and 2%s) in %.1f s",
        side,
        side,
        ", generations and cached-reference edits" if edits else "",
        seconds,
    )
    return seconds
