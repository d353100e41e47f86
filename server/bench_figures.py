"""The figures of the full-size benchmark: each a served action (through the real app) and its plain-diffusers
equivalent on the same pipeline object, with a label for the table."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.architectures import Architecture
from pipeline.transformer_graphs import installed as installed_step_graphs

from .bench_harness import (
    DirectDiffusers,
    ImageClient,
    StepTimer,
    compile_text_encoder_layers,
    mask_images,
    reference_images,
    text_encode,
    transformer_step,
    vae_decode,
    vae_encode,
)

BATCH = 4  # images in the sequential, concurrent and n=N figures


@dataclass
class Figure:
    key: str
    label: str
    served: Callable[[], float | None] | None
    direct: Callable[[], float | None] | None
    direct_label: str = "the same call"
    prepare: Callable[[], object] | None = None  # run once, untimed, before the figure's runs
    before: Callable[[], object] | None = None  # run untimed before each served run (its counters not counted)
    cleanup: Callable[[], object] | None = None  # run once after the figure's runs (what it kept, given back)


def figures_for(
    arch: Architecture,
    pipe,
    client: ImageClient | None,
    direct: DirectDiffusers | None,
    steps: int,
    device: str,
    loaded=None,
    compiled: bool = False,
) -> list[Figure]:
    """`loaded`: the served model, to switch its reference cache on for the cached-edit figures (last, so that
    the figures before run as they always did). `compiled`: the pipeline was compiled (bench --compile)."""
    size, small, large = arch.size, arch.size // 2, arch.size * 2
    tags = itertools.count()

    def prompts(count: int = 1) -> list[str]:
        tag = next(tags)  # a new prompt every call: nothing comes from the server's prompt cache
        return [f"bench {tag}.{i}: a lighthouse on a cliff at dusk, waves, oil painting" for i in range(count)]

    references, reference_pils = reference_images(10, size) if client else ([], [])
    mask, plain_mask = mask_images(size) if client else (b"", None)

    def sequential() -> None:
        for prompt in prompts(BATCH):
            client.generate(prompt, size)

    def singles() -> None:
        for prompt in prompts(BATCH):
            direct.images([prompt], size)

    def concurrent() -> None:
        with ThreadPoolExecutor(BATCH) as pool:
            list(pool.map(lambda p: client.generate(p, size), prompts(BATCH)))

    def steps_served() -> float:
        timer = StepTimer(pipe.transformer, device)
        try:
            client.generate(prompts()[0], size)
        finally:
            seconds = timer.detach()
        return seconds

    def steps_direct() -> float:
        timer = StepTimer(pipe.transformer, device)
        try:
            direct.images(prompts(), size)
        finally:
            seconds = timer.detach()
        return seconds

    inpaint = None
    if arch.family == "klein" and pipe is not None:
        from diffusers import Flux2KleinInpaintPipeline
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # from_pipe's `to()` warns about modules it does not move
        try:
            # Shares the weights. from_pipe casts the shared modules to float32 unless told the dtype: that once
            # made every later figure of a GPU run ~5x slower.
            inpaint = Flux2KleinInpaintPipeline.from_pipe(pipe, dtype=pipe.transformer.dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        inpaint.set_progress_bar_config(disable=True)

    def masked_direct() -> None:
        direct.images(prompts(), size, pipe=inpaint, image=reference_pils[0], mask_image=plain_mask, strength=1.0)

    figures = [
        Figure(
            "one_image",
            f"one image {size}x{size}",
            lambda: client.generate(prompts()[0], size),
            lambda: direct.images(prompts(), size),
        ),
    ]
    switchable = loaded.adapters.adapters.switchable if loaded is not None and loaded.adapters is not None else ()
    if switchable:  # bench --loras N: one of them chosen, right after an image with none (every run switches)
        figures.append(
            Figure(
                "one_image_lora",
                f"one image {size}x{size}, 1 of {len(switchable)} LoRAs at 0.8, after one with none",
                lambda: client.generate(prompts()[0], size, loras=[{"name": switchable[0].name, "scale": 0.8}]),
                None,
                "no plain equivalent: the served switch",
                before=lambda: client.generate_unrecorded(prompts()[0], size),
            )
        )
    if arch.family == "klein":
        figures.append(
            Figure(
                f"one_image_{small}",
                f"one image {small}x{small}",
                lambda: client.generate(prompts()[0], small),
                lambda: direct.images(prompts(), small),
            )
        )
    figures += [
        Figure("sequential_4", f"{BATCH} requests one after another", sequential, singles, f"{BATCH} single calls"),
        Figure(
            "concurrent_4",
            f"{BATCH} concurrent requests",
            concurrent,
            lambda: direct.images(prompts(BATCH), size),
            f"one batch of {BATCH} prompts",
        ),
        Figure(
            "n_4",
            f"n={BATCH} in one request",
            lambda: client.generate(prompts()[0], size, n=BATCH),
            lambda: direct.images(prompts(), size, per_prompt=BATCH),
            f"num_images_per_prompt={BATCH}",
        ),
        Figure(
            "stream_2",
            "stream, partial_images=2",
            lambda: client.stream(prompts()[0], size, 2),
            lambda: direct.images(prompts(), size),
            "one image, no previews",
        ),
    ]
    for count in (1, 4, 10):
        figures.append(
            Figure(
                f"edit_{count}",
                f"edit, {count} reference{'s' if count > 1 else ''} {size}x{size}",
                lambda count=count: client.edit(prompts()[0], size, references[:count]),
                lambda count=count: direct.images(prompts(), size, image=reference_pils[:count]),
            )
        )
    # A generation, then an edit, as a server meets them mixed: under --compile on CUDA the generation's steps replay
    # their CUDA graphs and the edit's (another token count) run compiled and eager. Run 7's first image with the
    # graphs paused was 65 ms slower than the next (0.419 s, 0.354 s): is the switch paid at every edit after a
    # generation, or once? Against `edit_1`, whose runs follow other edits.
    figures.append(
        Figure(
            "edit_1_after_image",
            f"edit, 1 reference {size}x{size}, each right after a generation",
            lambda: client.edit(prompts()[0], size, references[:1]),
            None,
            "no plain equivalent: the served switch from a generation",
            before=lambda: client.generate_unrecorded(prompts()[0], size),
        )
    )
    figures += [
        Figure(
            "masked_edit",
            "masked edit",
            lambda: client.edit(prompts()[0], size, references[:1], mask),
            masked_direct if inpaint is not None else None,
            "Flux2KleinInpaintPipeline, strength 1" if inpaint is not None else "no plain equivalent",
        ),
        Figure(
            f"one_image_{large}",
            f"one image {large}x{large}",
            lambda: client.generate(prompts()[0], large),
            lambda: direct.images(prompts(), large),
        ),
        Figure(
            "pipeline_step",
            f"s/step in the pipeline, {size}x{size}",
            steps_served,
            steps_direct,
            "the same, timed by a hook",
        ),
        Figure(
            "transformer_step",
            f"s/step, transformer alone, {size}x{size}",
            None,
            lambda: transformer_step(pipe.transformer, size),
            "direct transformer call",
        ),
        Figure("vae_decode", f"final decode, {size}x{size}", None, lambda: vae_decode(pipe, size), "decode alone"),
        # The decoder in channels-last memory format (NHWC convolutions), for the next choice of a default: the
        # pipeline goes back to its own format after the figure.
        Figure(
            "vae_decode_channels_last",
            f"final decode, {size}x{size}, VAE channels-last",
            None,
            lambda: vae_decode(pipe, size),
            "decode alone, channels-last",
            prepare=lambda: pipe.vae.to(memory_format=torch.channels_last),
            cleanup=lambda: pipe.vae.to(memory_format=torch.contiguous_format),
        ),
        # One reference's VAE encode (every edit pays it per reference, 10 for a 10-reference edit): under --compile
        # its group norms are compiled (pipeline/compilation.py), and the next figure times it with them eager.
        Figure("vae_encode", f"reference encode, {size}x{size}", None, lambda: vae_encode(pipe, size), "encode alone"),
        # The text encode (44 ms of a served 1024² image on an H200, every prompt new), eager and with the
        # encoder's decoder layers compiled, for the choice of compiling it under --compile.
        Figure("text_encode", "text encode, one new prompt", None, lambda: text_encode(pipe), "encoder alone"),
        # As the server encodes: only the layers up to the deepest hidden state FLUX.2 reads, no logits
        # (pipeline/encoder_depth.py); the figure above is plain diffusers' whole encoder.
        Figure(
            "text_encode_read_depth",
            "text encode, one new prompt, up to the deepest layer read",
            None,
            lambda: text_encode(pipe, read_depth=True),
            "encoder alone, read depth",
        ),
        Figure(
            "text_encode_compiled",
            "text encode, one new prompt, layers compiled",
            None,
            lambda: text_encode(pipe),
            "encoder alone, layers compiled",
            prepare=lambda: compile_text_encoder_layers(pipe, True),
            cleanup=lambda: compile_text_encoder_layers(pipe, False),
        ),
        # cuDNN's autotuner on (torch.backends.cudnn.benchmark: the fastest convolution algorithm per shape, chosen
        # in the warm-up call), for the same choice; channels-last was slower on an H100 (0.148 s against 0.101 s).
        Figure(
            "vae_decode_cudnn_benchmark",
            f"final decode, {size}x{size}, cuDNN autotuner",
            None,
            lambda: vae_decode(pipe, size),
            "decode alone, cudnn.benchmark",
            prepare=lambda: _cudnn_benchmark(True),
            cleanup=lambda: _cudnn_benchmark(False),
        ),
    ]
    if compiled:
        figures.append(
            Figure(
                "vae_encode_eager_norms",
                f"reference encode, {size}x{size}, group norms eager",
                None,
                lambda: vae_encode(pipe, size),
                "encode alone, norms eager",
                prepare=lambda: _eager_encoder_norms(pipe, True),
                cleanup=lambda: _eager_encoder_norms(pipe, False),
            )
        )
    steps_graphed = installed_step_graphs(pipe.transformer) if pipe is not None and client is not None else None
    if steps_graphed is not None:
        # As bench --compile serves on CUDA: the default size's steps replay CUDA graphs
        # (pipeline/transformer_graphs.py); the same served image with them paused, for their worth in one run
        # (against `one_image`).
        figures.append(
            Figure(
                "one_image_steps_eager",
                f"one image {size}x{size}, steps without CUDA graphs",
                lambda: client.generate(prompts()[0], size),
                None,
                prepare=lambda: _pause_step_graphs(pipe, True),
                cleanup=lambda: _pause_step_graphs(pipe, False),
            )
        )
    if device == "cuda":
        # As the server encodes under --compile: the cut encode replayed from a CUDA graph (the encode is bound by
        # the host's launches). The graphs stay where the bench's --compile installed them, as a server's do.
        figures.append(
            Figure(
                "text_encode_graphed",
                "text encode, one new prompt, read depth, CUDA graph",
                None,
                lambda: text_encode(pipe, read_depth=True, graph=True),
                "encoder alone, read depth, graphed",
                prepare=lambda: _graphs(pipe, True),
                cleanup=lambda: _graphs(pipe, False),
            )
        )
    if loaded is not None:
        from .bench_references import reference_cache_figures

        figures += reference_cache_figures(
            arch.family, pipe, loaded, client, prompts, references, reference_pils, size, steps, compiled
        )
    return figures


def _graphs(pipe: Any, on: bool) -> None:
    """The text encoder's CUDA graphs for the graphed figure: installed for it when the bench's --compile has not
    installed them already (then they stay), and dropped after it when the figure installed them."""
    from pipeline.encoder_graphs import install, installed, uninstall

    if on and installed(pipe.text_encoder) is None:
        install(pipe.text_encoder)
        pipe._bench_installed_graphs = True
    elif not on and getattr(pipe, "_bench_installed_graphs", False):
        uninstall(pipe.text_encoder)
        del pipe._bench_installed_graphs


def _pause_step_graphs(pipe: Any, paused: bool) -> None:
    """The transformer's step graphs left aside (its steps run compiled, eager around the blocks) or back."""
    graphs = installed_step_graphs(pipe.transformer)
    if graphs is not None:
        graphs.paused = paused


def _eager_encoder_norms(pipe: Any, on: bool) -> None:
    """The VAE encoder's group norms back on their own (eager) forward for a figure, and their compiled forward
    (pipeline/compilation.py) back after it."""
    from pipeline.compilation import group_norms

    norms = group_norms(pipe.vae.encoder)
    if on:
        pipe._bench_compiled_norms = [vars(norm).pop("forward", None) for norm in norms]
        return
    for norm, forward in zip(norms, pipe._bench_compiled_norms, strict=True):
        if forward is not None:
            norm.forward = forward
    del pipe._bench_compiled_norms


def _cudnn_benchmark(on: bool) -> None:
    torch.backends.cudnn.benchmark = on
