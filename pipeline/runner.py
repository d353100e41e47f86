"""Run one batch on a loaded pipeline, in numbered stages like diffusers' own `__call__`.

A batch is a list of slices of compatible jobs (same model size, steps, guidance and references). Each image
keeps its own prompt and seed: the prompts are encoded one by one (and cached), the noise comes from one CPU
generator per image, so an image is the same whether it ran alone or in a batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .adapters import activate
from .batching import Slice, images_in
from .decoding import decode, latents_for_vae
from .encoder_depth import reading_depth
from .encoder_graphs import graphed
from .internals import execution_device, forget_attention_kwargs, pack_latents, stop_after_this_step, transformer_dtype
from .jobs import GenerationResult, StageTimes
from .loader import LoadedModel
from .masking import MaskBlend, composite, initial_noise
from .previews import decode_preview, predict_clean, preview_steps
from .prompt_enhancement import PromptEnhancer, Rewrite
from .prompts import PromptTokens, measure_prompt
from .reference_cache import ATTENTION_KWARG, prefill
from .references import prepare_reference
from .step_cache import cache_context
from .text_cache import EncodedPrompt, PromptCache
from .transformer_graphs import graphed as graphed_steps

# Called after every denoising step with (steps done, steps in total); returns True to stop the batch.
StepHook = Callable[[int, int], bool]
# Called with a slice, the preview's index and its images (one per image of the slice).
PreviewSink = Callable[[Slice, int, list[Image.Image]], None]

# Draws each batch's starting noise beside the text encode (threads made on demand: one per engine running).
_NOISE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flux2-noise")

# Whether a slice's images are still wanted when the denoising ends (False: its job was cancelled meanwhile).
Wanted = Callable[[Slice], bool]


def run_batch(
    model: LoadedModel,
    slices: list[Slice],
    cache: PromptCache,
    on_step: StepHook | None = None,
    on_preview: PreviewSink | None = None,
    wanted: Wanted | None = None,
    enhancer: PromptEnhancer | None = None,
) -> list[GenerationResult | None]:
    """One result per slice, None for a slice no longer wanted (nothing of it is decoded). A batch stopped by
    `on_step` returns None for every slice without decoding anything."""
    pipe = model.pipe
    first = slices[0].job
    device = execution_device(pipe)
    clock = _StageClock(device)

    # 0. LoRA: the batch's adapters switched on (or all off); every job of a batch names the same ones.
    activate(model, first.loras)
    # 0b. Prompt enhancement: the jobs that ask for it get their prompt rewritten (cached); the others keep theirs.
    rewrites = [enhancer.rewrite(model, s.job) if enhancer is not None else Rewrite(s.job.prompt) for s in slices]
    enhance = clock.lap() if any(s.job.enhance_prompt for s in slices) else 0.0

    # 1. Noise: one CPU generator per image, so image i depends on its seed alone (and is the same on any device),
    #    drawn on a worker thread while this one runs the text encode. Drawn here after the encode, it waited for
    #    the device (diffusers' encode_prompt ends with a copy from pageable memory, which synchronises): a 1024²
    #    image's noise took 12.8 ms of the served text encode's 28.7 (H200 profile, 2026-11-27).
    generators = [torch.Generator(device="cpu").manual_seed(seed) for s in slices for seed in s.seeds]
    drawing = _NOISE.submit(initial_noise, pipe, generators, first.run_width, first.run_height)

    # 2. Text: the distinct prompts not in the cache encoded in one call, then one row per image.
    misses = cache.misses
    encoded = _encode(model, cache, [r.prompt for r in rewrites])
    dtype = transformer_dtype(pipe)
    encoded.store(cache)  # the new prompts' host copies (each waits for the device's encode)
    noise = drawing.result()
    prompt_embeds = torch.cat(
        [encoded.rows[r.prompt].to(device, dtype) for s, r in zip(slices, rewrites, strict=True) for _ in s.seeds]
    )
    tokens = encoded.tokens
    del encoded  # its device rows: prompt_embeds holds the batch's copy
    extra: dict[str, Any] = {}
    if model.spec.family == "klein" and not model.spec.is_distilled and first.guidance_scale > 1:
        empty = _encode(model, cache, [""]).store(cache).rows[""]  # the klein base model's CFG: the empty prompt
        extra["negative_prompt_embeds"] = empty.to(device, dtype).repeat(images_in(slices), 1, 1)
    text_encode = clock.lap()
    prompt_cached = cache.misses == misses
    model.enter("denoise")  # the offload plan's boundary: the transformer in (the VAE never moves)

    # 3. Conditioning: every reference goes to the pipeline (it resizes each to <= 1 MP, sides floored to 16), or,
    #    with the reference cache, each row's references are run once here and every step reuses their K/V.
    #    The store keeps recent sets' K/V across requests, keyed by the references' content and the adapters.
    references, references_cached = 0.0, False
    if first.references:
        prepared = [tuple(prepare_reference(image) for image in s.job.references) for s in slices]
        if model.placement.reference_cache:
            per_row = [refs for refs, s in zip(prepared, slices, strict=True) for _ in s.seeds]
            keys = [(s.job.reference_digests, s.job.loras) for s in slices for _ in s.seeds]
            with torch.inference_mode():
                kv = prefill(pipe, per_row, first.guidance_scale, keys, model.reference_store)
            extra["attention_kwargs"] = {ATTENTION_KWARG: kv}
            references, references_cached = clock.lap(), kv.reused == len(kv.sets)
            del kv  # held by `extra` until the denoise ends, then freed (the store keeps its own reference)
        else:
            extra["image"] = list(prepared[0])

    # 4. The starting noise (drawn in 1 exactly as the pipeline would draw it, so that previews can predict the
    #    clean image from it). A masked edit (always alone in its batch) stays on the source image's trajectory
    #    outside the mask.
    extra["latents"] = noise
    blend = None
    if first.mask is not None:
        blend = MaskBlend(pipe, first.references[0], first.mask, noise, first.run_width, first.run_height)
    previews = _Previews(pipe, slices, noise, on_preview) if on_preview is not None else None
    step_callback = _StepCallback(first.steps, blend, previews, on_step)
    extra["callback_on_step_end"] = step_callback

    # 5. Denoise at the model's size; latents come back undecoded. `prompt` is not passed: the embeddings stand
    #    for it. Steps of the shapes the warm-up captured replay their CUDA graphs, where the transformer has them.
    try:
        with torch.inference_mode(), cache_context(pipe.transformer), graphed_steps(pipe):
            latents = pipe(
                prompt_embeds=prompt_embeds,
                height=first.run_height,
                width=first.run_width,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=generators,
                output_type="latent",
                **extra,
            ).images
    finally:  # the call's reference K/V must not outlive it (the decode needs the room; a failed call's retry too)
        extra.clear()
        forget_attention_kwargs(pipe)
    denoise = clock.lap()
    if step_callback.stopped:  # every job of the batch was cancelled: nothing to decode
        return [None] * len(slices)

    # 6. Decode the rows still wanted; deliver exactly the size asked for; a masked edit gets its unmasked pixels
    #    back from the source.
    model.enter("decode")
    latents = latents_for_vae(pipe, latents, first.run_width, first.run_height)
    keep = [wanted is None or wanted(piece) for piece in slices]
    rows = [
        row
        for piece, kept, start in zip(slices, keep, _starts(slices), strict=True)
        if kept
        for row in range(start, start + len(piece.seeds))
    ]
    # Kept reference sets give way to the decode before it is tiled: a request's pixels do not depend on what the
    # store holds, as far as the store can make room.
    store = model.reference_store
    make_room = store.release if store is not None else None
    images = iter(decode(pipe, latents[rows], make_room=make_room) if rows else [])
    stages = StageTimes(
        text_encode=text_encode,
        prompt_cached=prompt_cached,
        references=references,
        references_cached=references_cached,
        denoise=denoise,
        decode=clock.lap(),
        enhance=enhance,
    )
    results: list[GenerationResult | None] = []
    for piece, kept, rewrite in zip(slices, keep, rewrites, strict=True):
        if not kept:
            results.append(None)
            continue
        job = piece.job
        mine = [_to_size(next(images), job.width, job.height) for _ in piece.seeds]
        if job.mask is not None:
            mine = [composite(image, job.references[0], job.mask) for image in mine]
        results.append(
            GenerationResult(
                images=mine,
                seeds=piece.seeds,
                prompt=tokens[rewrite.prompt],
                batch_images=images_in(slices),
                stages=stages,
                warnings=rewrite.warnings,
            )
        )
    return results


class _StageClock:
    """Seconds between laps, with the device's queued work finished at each lap (CUDA runs asynchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def _starts(slices: list[Slice]) -> list[int]:
    """The first batch row of each slice."""
    starts, row = [], 0
    for piece in slices:
        starts.append(row)
        row += len(piece.seeds)
    return starts


@dataclass
class _Encoded:
    """Each distinct prompt's embeddings (1, sequence, dim) for one batch, and its measure: the prompts just
    encoded still on the device (their encode may still be running there), the others from the cache."""

    model: str
    rows: dict[str, torch.Tensor]
    tokens: dict[str, PromptTokens]
    fresh: list[str]

    def store(self, cache: PromptCache) -> _Encoded:
        """The fresh prompts' host copies into the cache (each copy waits for the device's encode)."""
        for prompt in self.fresh:
            cache.put(self.model, prompt, EncodedPrompt(embeds=self.rows[prompt].cpu(), tokens=self.tokens[prompt]))
        self.fresh = []
        return self


def _encode(model: LoadedModel, cache: PromptCache, prompts: list[str]) -> _Encoded:
    """Each distinct prompt's embeddings: from the cache, or encoded together in one batched encoder call (every
    prompt is padded to the same 512 tokens, so a row is the same as when encoded alone, up to batch math). The
    encoded rows stay on the device for the batch; `store` puts them in the cache."""
    name = str(model.spec.path)
    cached = {prompt: cache.get(name, prompt) for prompt in dict.fromkeys(prompts)}
    rows = {prompt: entry.embeds for prompt, entry in cached.items() if entry is not None}
    tokens = {prompt: entry.tokens for prompt, entry in cached.items() if entry is not None}
    missing = [prompt for prompt, entry in cached.items() if entry is None]
    if missing:
        model.enter("encode")  # the offload plan's boundary: the text encoder in, only on a cache miss
        # Only the layers FLUX.2 reads, no logits; replayed from a CUDA graph where the encoder has them.
        with torch.inference_mode(), reading_depth(model.pipe), graphed(model.pipe):
            embeds, _ = model.pipe.encode_prompt(
                prompt=missing, device=execution_device(model.pipe), num_images_per_prompt=1
            )
        # Counted on the CPU while the device still runs the encode.
        for row, prompt in enumerate(missing):
            rows[prompt] = embeds[row : row + 1]
            tokens[prompt] = measure_prompt(model.pipe, model.spec.family, prompt)
    return _Encoded(name, rows, tokens, missing)


class _StepCallback:
    """diffusers' `callback_on_step_end`: the mask blend, previews, progress and cancellation, after every step."""

    def __init__(self, total_steps: int, blend: MaskBlend | None, previews: _Previews | None, on_step: StepHook | None):
        self.total_steps = total_steps
        self.blend = blend
        self.previews = previews
        self.on_step = on_step
        self.stopped = False

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        out = self.blend(pipe, step, timestep, tensors) if self.blend is not None else {}
        if self.previews is not None:
            self.previews(step + 1, out.get("latents", tensors["latents"]))
        if self.on_step is not None and self.on_step(step + 1, self.total_steps):
            stop_after_this_step(pipe)  # diffusers skips the remaining steps; we skip the decode
            self.stopped = True
        return out


class _Previews:
    """Decodes the predicted clean image of the slices that asked for partial images, at their chosen steps."""

    def __init__(self, pipe: Any, slices: list[Slice], noise: torch.Tensor, sink: PreviewSink):
        self.pipe = pipe
        self.sink = sink
        self.noise = pack_latents(pipe, noise)  # (B, tokens, C), on the CPU
        self.plan = []  # (slice, first row, {step: preview index})
        row = 0
        for piece in slices:
            steps = preview_steps(piece.job.steps, piece.job.partial_images)
            if steps:
                self.plan.append((piece, row, {step: index for index, step in enumerate(steps)}))
            row += len(piece.seeds)

    def __call__(self, done: int, latents: torch.Tensor) -> None:
        sigma = float(self.pipe.scheduler.sigmas[done])  # the noise level the latents have reached
        for piece, row, steps in self.plan:
            if done in steps:
                rows = slice(row, row + len(piece.seeds))
                noise = self.noise[rows].to(latents.device, latents.dtype)
                clean = predict_clean(latents[rows], noise, sigma)
                images = decode_preview(self.pipe, clean, piece.job.run_width, piece.job.run_height)
                self.sink(piece, steps[done], images)


def _to_size(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
