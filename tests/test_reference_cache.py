"""--reference-cache on: the references' K/V computed once per batch, reused every step (pipeline/reference_cache.py).

Its semantics are diffusers' `Flux2KleinKVPipeline`'s (references at timestep 0, attending only to themselves), so
the cached edit is checked against that pipeline's output, to within rounding. Against the uncached edit it differs
by design; on these tiny random weights the references barely move the image at all (another set of references
moves it about as much as the cache does), so that comparison is a bound, not evidence of quality."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from engine_helpers import job
from imaging import decode_b64, pixels
from PIL import Image

from pipeline import reference_cache
from pipeline.batching import Slice
from pipeline.loader import load_model
from pipeline.placement import PlacementError, decide_placement
from pipeline.runner import run_batch
from pipeline.text_cache import PromptCache
from pipeline.weights import inspect_model

SIZE = 64
STEPS = 3


def reference(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def cached(tiny_klein):
    """The tiny klein model loaded with the reference cache on (its processors installed)."""
    placement = decide_placement(weight_params=1, reference_cache="on")
    return load_model(inspect_model(tiny_klein), placement)


@pytest.fixture(scope="module")
def uncached(cached):
    """The same pipeline object with the cache off: the runner passes the references to the pipeline, and our
    processors, given no cache, compute exactly what diffusers' own do."""
    return dataclasses.replace(cached, placement=dataclasses.replace(cached.placement, reference_cache=False))


@pytest.fixture(scope="module")
def kv_pipeline(tiny_klein):
    from diffusers import Flux2KleinKVPipeline

    pipe = Flux2KleinKVPipeline.from_pretrained(tiny_klein, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(model, *jobs):
    results = run_batch(model, [Slice(j, j.seeds) for j in jobs], PromptCache(1 << 20))
    return [pixels(image) for result in results for image in result.images]


def difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """Max abs pixel difference (0-255) and PSNR in dB."""
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return int(np.abs(a - b).max()), (float("inf") if mse == 0 else 10 * np.log10(255**2 / mse))


@pytest.mark.parametrize("count", [1, 4, 10])
def test_cached_edit_is_diffusers_kv_pipeline_and_stays_near_the_uncached_edit(count, cached, uncached, kv_pipeline):
    refs = tuple(reference(seed) for seed in range(count))
    edit = job(size=SIZE, seeds=(7,), steps=STEPS, references=refs)
    (ours,) = run(cached, edit)
    theirs = kv_pipeline(
        prompt=edit.prompt,
        image=list(refs),
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(7)],
    ).images[0]
    worst, psnr = difference(ours, pixels(theirs))
    assert worst <= 1 and psnr >= 55, (worst, psnr)  # the same computation up to float rounding and 8-bit rounding

    (plain,) = run(uncached, edit)
    worst, psnr = difference(ours, plain)
    # Measured on these weights: at most 1/255 (PSNR >= 58 dB) for 1, 4 and 10 references. A bound, not a promise
    # for real weights (see the module's docstring).
    assert worst <= 2 and psnr >= 50, (worst, psnr)


def test_reference_tokens_run_once_not_every_step(cached, uncached):
    """The transformer sees the reference tokens in one pass before the steps, then only the image's tokens."""
    refs = (reference(1), reference(2, 96))
    image_tokens = (SIZE // 16) ** 2
    reference_tokens = (SIZE // 16) ** 2 + (96 // 16) ** 2
    seen: list[int] = []
    hook = cached.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        run(cached, job(size=SIZE, seeds=(1,), steps=4, references=refs))
        with_cache = list(seen)
        seen.clear()
        run(uncached, job(size=SIZE, seeds=(1,), steps=4, references=refs))
    finally:
        hook.remove()
    assert with_cache == [reference_tokens] + [image_tokens] * 4
    assert seen == [image_tokens + reference_tokens] * 4


def test_rows_with_different_references_in_one_batch_each_get_their_own(cached):
    """Per-row caches: a batch of two rows with different references (one of them with more reference tokens, so
    the shorter row's padding is masked) gives each row the latents it gets alone. Compared on the latents, where the
    two rows' references make a clear difference (on these weights they barely move the 8-bit pixels)."""
    pipe = cached.pipe
    first, second = (reference(1),), (reference(2), reference(3, 96))

    def latents(rows):
        kv = reference_cache.prefill(pipe, rows, 1.0)
        return pipe(
            prompt_embeds=embeds.repeat(len(rows), 1, 1),
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            latents=noise.repeat(len(rows), 1, 1, 1),
            attention_kwargs={reference_cache.ATTENTION_KWARG: kv},
            output_type="latent",
        ).images

    with torch.inference_mode():
        embeds, _ = pipe.encode_prompt(prompt="a cat", device=torch.device("cpu"))
        noise = torch.randn((1, 128, SIZE // 16, SIZE // 16), generator=torch.Generator().manual_seed(5))
        alone = torch.cat([latents([first]), latents([second])])
        together = latents([first, second])
    apart = (alone[0] - alone[1]).abs().max().item()
    assert apart > 1e-3  # the two rows' references do make a difference
    assert (together - alone).abs().max().item() < apart / 1000


def test_a_served_batch_with_different_references_keeps_each_rows_image(cached):
    one = job(prompt="a cat", size=SIZE, seeds=(3,), steps=STEPS, references=(reference(1),))
    other = job(prompt="a dog", size=SIZE, seeds=(4,), steps=STEPS, references=(reference(2), reference(3)))
    together = run(cached, one, other)
    alone = run(cached, one) + run(cached, other)
    for batched, single in zip(together, alone, strict=True):
        assert np.abs(batched - single).max() <= 1


def test_masked_edit_with_the_cache_keeps_the_unmasked_pixels(cached, uncached):
    source = reference(9)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    edit = job(size=SIZE, seeds=(2,), steps=STEPS, references=(source, reference(4)), mask=mask)
    (ours,) = run(cached, edit)
    (plain,) = run(uncached, edit)
    outside = np.asarray(mask) == 0
    assert np.array_equal(ours[outside], pixels(source)[outside])
    worst, _ = difference(ours, plain)
    assert worst <= 2, worst


def test_the_cache_refuses_to_combine_with_step_caching():
    with pytest.raises(PlacementError, match="cannot be combined"):
        decide_placement(weight_params=1, reference_cache="on", cache="taylorseer")
    with pytest.raises(PlacementError, match="reference-cache must be one of"):
        decide_placement(weight_params=1, reference_cache="yes")


@pytest.fixture(scope="module")
def cached_server(tiny_klein, tmp_path_factory):
    """A real server on the tiny klein model with the reference cache on (the session's `server` has it off)."""
    from conftest import RunningServer

    with RunningServer(
        ["--model", str(tiny_klein), "--reference-cache", "on"], tmp_path_factory.mktemp("rc")
    ) as running:
        yield running


def test_served_edit_with_four_references_cache_on_and_off(cached_server, client, kv_pipeline):
    import io

    from openai import OpenAI

    on = OpenAI(base_url=f"{cached_server.base_url}/v1", api_key="k", max_retries=0, timeout=120)
    refs = [reference(seed) for seed in range(4)]
    uploads = []
    for image in refs:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uploads.append(("ref.png", buffer.getvalue(), "image/png"))
    params = dict(
        image=uploads,
        prompt="a cat",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": STEPS},
    )
    cached_image = pixels(decode_b64(on.images.edit(**params).data[0].b64_json))
    plain_image = pixels(decode_b64(client.images.edit(**params).data[0].b64_json))
    assert "reference-cache: on" in cached_server.log()
    theirs = kv_pipeline(
        prompt="a cat",
        image=refs,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(11)],
    ).images[0]
    worst, psnr = difference(cached_image, pixels(theirs))
    assert worst <= 1 and psnr >= 55, (worst, psnr)
    worst, psnr = difference(cached_image, plain_image)
    assert worst <= 2 and psnr >= 50, (worst, psnr)
