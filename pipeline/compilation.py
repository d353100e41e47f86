"""Regional compilation: `torch.compile` on the transformer's repeated blocks (diffusers'
`compile_repeated_blocks`), which compiles one block once and reuses it for all, so compiling takes seconds
instead of minutes, and on the VAE's group norms (below). Shapes are marked dynamic and recompiles
bounded, so a new image size costs at most one more compile; a warm-up at load (one image, then a batch of two)
makes the first request and the first batch fast.

Not `fullgraph=True`: with it, torch turns the recompile limit into a hard error (`FailOnRecompileLimitHit`), and
what the blocks see changes more than sizes do (attention processors swapped, the reference cache's per-batch
arguments), so a long-running server would eventually fail requests. Without it, a frame past the limit runs
eager. The blocks have no graph breaks, so the compiled graphs are the same.

The VAE decoder stays eager but for its group norms: compiling it whole (channels-last, dynamic shapes) never
finished its warm-up within 230 s on an H200 (klein-4B, torch 2.11, batches of 1 and 2, inference mode and
no_grad), against ~20 s for the transformer's blocks. Its 30 group norms, though, took half of a 1024² decode's
time (H200: 45 of 85 ms of kernels in PyTorch's moments kernel, which gives each of the 32 groups of an image one
thread block however large the group), and compiled alone (`compile_vae_norms`: Inductor splits each
group's reduction across the card) the decode took 49.7 ms instead of 86.5 ms. Its pixels are as close to a
float32 decode as the eager norms' (this project's CPU, 256², random weights: a mean error of 0.76 of 255 for
both); a rewrite with bf16 statistics and no compile was faster too (56.9 ms on the H200) but further off (0.90).
Served (run 5, H200), the decode went from 104.8 to 77.0 ms with the whole norm compiled, and to 74.5 ms (run 6)
with only the statistics compiled (`compile_vae_norms` says why); the decode alone (run 6's probe): eager 86.7 ms,
the whole norm compiled 59.9 ms, statistics compiled 50.4 ms. The encoder's norms, which every reference of an edit
runs through, are compiled the same way (their statistics only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from PIL import Image
from torch.nn import functional

from .decoding import decode, latents_for_vae
from .encoder_depth import reading_depth
from .encoder_graphs import graphed
from .internals import Flux2Pipe, forget_attention_kwargs
from .reference_cache import ATTENTION_KWARG, installed, prefill
from .references import prepare_reference
from .step_cache import cache_context
from .transformer_graphs import graphed as graphed_steps
from .transformer_graphs import installed as installed_step_graphs

log = logging.getLogger("flux2.loader")

MAX_RECOMPILES = 8  # per compiled block: new sizes beyond this run uncompiled (eager), never fail
WARM_UP_SIDE = 1024  # the default output size
WARM_UP_GUIDANCE = 4.0  # any value: dev's reference pass embeds it, the graphs do not depend on it


def compile_transformer(pipe: Flux2Pipe) -> None:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_RECOMPILES)
    pipe.transformer.compile_repeated_blocks(fullgraph=False, dynamic=True)


def compile_pipeline(pipe: Flux2Pipe) -> None:
    """What `--compile` compiles (the server's load and the bench's `--compile` alike): the transformer's repeated
    blocks and the VAE's group norms; the warm-up is the caller's."""
    compile_transformer(pipe)
    compile_vae_norms(pipe)


def uncompile_pipeline(pipe: Flux2Pipe) -> None:
    """`compile_pipeline` undone: the transformer's blocks and the VAE's norms run their own eager forwards again
    (their compiled code dropped with them; no `torch._dynamo.reset()`, which would throw away the compiled code of
    every other model this process serves)."""
    for module in pipe.transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:  # nn.Module.compile's (compile_repeated_blocks)
            module._compiled_call_impl = None
    for norm in group_norms(pipe.vae.decoder) + group_norms(pipe.vae.encoder):
        vars(norm).pop("forward", None)  # the instance's compiled forward (compile_vae_norms): the class's again


def compile_vae_norms(pipe: Flux2Pipe) -> int:
    """The VAE's group norms, decoder's and encoder's, compiled in two parts; the number of norms. Every input is
    handed over as a contiguous (batch, channels, positions) tensor, the feature maps and the mid-block attention's
    transposed 3-D input alike.

    The statistics (`_group_affine`: each channel's scale and shift) are compiled with dynamic sizes: two graphs at
    any image size, one for a batch of one (torch specialises a size of 1) and one for larger batches, shared by
    the decoder and the encoder.

    The decoder's pass over the values (`NormApply`) is compiled for each feature map's number of positions
    exactly, with only its rows (batch x channels) dynamic, so that its per-element index arithmetic divides by
    constants. With every size dynamic that pass took 17.1 of the decode's 56.8 ms of kernels on the H200 (run 5),
    where PyTorch's own apply pass had taken 4.6 ms; the decode alone (run 6's probe): 50.4 ms with an eager
    `addcmul` for it, 43.9 ms with it compiled for the exact sizes. A 1024² decode has 4 such sizes; past
    `STATIC_POSITIONS` sizes (a few image sizes' worth) the pass is the eager `addcmul`.

    The encoder (each edit's references, one at a time, and a masked edit's source) runs the same slow eager kernel
    over ~60 % of a decode's values at 1024² (its feature maps are the decoder's, with 2 resnets a level instead of
    3): its statistics take the shared graphs, its pass over the values is the eager `addcmul`, as references come
    in any size (an exact-size graph per reference shape would be compiled inside requests)."""
    statistics = torch.compile(_group_affine, dynamic=True)
    decoder, encoder = group_norms(pipe.vae.decoder), group_norms(pipe.vae.encoder)
    decoder_apply = NormApply()
    for norms, apply in ((decoder, decoder_apply), (encoder, eager_apply)):
        for norm in norms:
            norm.forward = partial(_compiled_norm, norm, statistics, apply)  # type: ignore[method-assign]
    return len(decoder) + len(encoder)


def group_norms(module: torch.nn.Module) -> list[torch.nn.GroupNorm]:
    """`module`'s group norms, in module order."""
    return [sub for sub in module.modules() if isinstance(sub, torch.nn.GroupNorm)]


def eager_apply(flat: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """normed = hidden * scale + shift over a (batch, channels, positions) tensor, per channel, by PyTorch's
    `addcmul` (float32 arithmetic, stored in the input's dtype)."""
    return torch.addcmul(shift[:, :, None], flat, scale[:, :, None], out=torch.empty_like(flat))


STATIC_POSITIONS = 6  # feature-map sizes (positions) whose apply pass gets a graph of its own; 1024² has 4


class NormApply:
    """normed = hidden * scale + shift over a (batch, channels, positions) tensor, per channel: float32 arithmetic,
    stored in the input's dtype (as PyTorch's group-norm kernel applies its statistics). Compiled per number of
    positions (up to `STATIC_POSITIONS` of them; the rows, batch x channels, are dynamic), eager beyond."""

    def __init__(self) -> None:
        self.compiled = torch.compile(_scale_shift, dynamic=False)
        self.positions: set[int] = set()

    def __call__(self, flat: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        positions = flat.shape[-1]
        if positions not in self.positions and len(self.positions) >= STATIC_POSITIONS:
            return eager_apply(flat, scale, shift)
        self.positions.add(positions)
        rows, scale, shift = flat.view(-1, positions), scale.reshape(-1, 1), shift.reshape(-1, 1)
        for tensor in (rows, scale, shift):  # batch x channels: never 1, so never specialised
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        normed: torch.Tensor = self.compiled(rows, scale, shift)
        return normed.view(flat.shape)


def _scale_shift(rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (rows.float() * scale + shift).to(rows.dtype)


def _compiled_norm(
    norm: torch.nn.GroupNorm, statistics: Any, apply: Callable[..., torch.Tensor], hidden: torch.Tensor
) -> torch.Tensor:
    if torch.is_grad_enabled():  # decodes run without autograd; anything else gets the module's own forward
        return functional.group_norm(hidden, norm.num_groups, norm.weight, norm.bias, norm.eps)
    batch, channels = hidden.shape[:2]
    flat = hidden.contiguous().view(batch, channels, -1)
    scale, shift = statistics(flat, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return apply(flat, scale, shift).view(hidden.shape)


def _warm_up_generation(pipe: Flux2Pipe, batch: int, side: int, capture_steps: bool = False) -> torch.Tensor:
    """A single-step generation of `batch` images at `side`x`side`, its latents; the text encode as requests run it
    (up to the deepest state read, from a CUDA graph where the encoder has them); with `capture_steps`, the step's
    CUDA graph captured where the transformer has graphs."""
    with (
        torch.inference_mode(),
        cache_context(pipe.transformer),
        reading_depth(pipe),
        graphed(pipe),
        graphed_steps(pipe, capture=capture_steps),
    ):
        latents: torch.Tensor = pipe(
            prompt=[f"warm-up {index}" for index in range(batch)],
            height=side,
            width=side,
            num_inference_steps=1,
            output_type="latent",
        )[0]
    return latents


def _group_affine(
    hidden: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`functional.group_norm` of a (batch, channels, positions) tensor as a per-channel `scale` and `shift`
    (normed = hidden * scale + shift), in float32 as PyTorch's kernel computes them (compiled, the upcast fuses
    into the reduction: nothing float32 the size of `hidden` is stored)."""
    batch, channels, _ = hidden.shape
    variance, mean = torch.var_mean(hidden.view(batch, groups, -1).float(), dim=-1, correction=0)
    per_group = channels // groups
    rstd = torch.rsqrt(variance + eps)[:, :, None].expand(batch, groups, per_group).reshape(batch, channels)
    mean = mean[:, :, None].expand(batch, groups, per_group).reshape(batch, channels)
    scale = rstd * weight.float()
    return scale, bias.float() - mean * scale


def warm_up(pipe: Flux2Pipe, side: int = WARM_UP_SIDE, references: bool | None = None) -> float:
    """Single-step generations at `side`x`side` with their decodes, one image then a batch of two: a batch of one
    compiles with the batch size fixed at 1 (torch specialises sizes of 1), the batch of two then compiles the
    graphs every larger batch reuses, so the engine's first batch does not stall on a compile. With the reference
    cache's processors installed (`references`, default: whether they are), the same for an edit with one cached
    reference: its prefill and its steps are graphs of their own (the attention's arguments differ), which the
    first edit would otherwise compile inside its request (on an H100 the bench's 4-reference warm-up took 37 s).
    Any number of references reuses them (the shapes are dynamic). Where the transformer has CUDA graphs
    (pipeline/transformer_graphs.py), the same two generations once more capture its steps' graphs, around the
    blocks compiled by then. Returns seconds."""
    started = time.perf_counter()
    edits = installed(pipe.transformer) if references is None else references
    # Not square: a token count equal to another dimension (a 1024² reference has 4096 tokens, klein-9B's hidden
    # size) would be specialised on by torch's duck sizing, and other reference sizes would compile again.
    reference = prepare_reference(Image.new("RGB", (side, side - 32), (128, 128, 128)))
    for batch in (1, 2):
        # The text encode as requests run it (the encoder's CUDA graph captured here, where it has graphs): a
        # streamed encoder (encoder-streamed with --compile) learns its prefetch order from this first pass.
        latents = _warm_up_generation(pipe, batch, side)
        if edits:
            with torch.inference_mode(), cache_context(pipe.transformer), reading_depth(pipe), graphed(pipe):
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
    # The steps' CUDA graphs, captured around the blocks the pass above compiled: the same generations once more.
    steps_graphs = installed_step_graphs(pipe.transformer)
    if steps_graphs is not None:
        for batch in (1, 2):
            _warm_up_generation(pipe, batch, side, capture_steps=True)
    seconds = time.perf_counter() - started
    log.info(
        "model: compiled and warmed up at %dx%d (batches of 1 and 2%s%s) in %.1f s",
        side,
        side,
        ", generations and cached-reference edits" if edits else "",
        f"; {steps_graphs.what} graphs captured: {steps_graphs.captures}" if steps_graphs is not None else "",
        seconds,
    )
    return seconds
