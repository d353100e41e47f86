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
from engine_helpers import failing_on_empty_inputs, job, transformer_inputs
from imaging import decode_b64, pixels
from PIL import Image

from pipeline import reference_cache
from pipeline.adapters import adapters_from_options
from pipeline.batching import Slice
from pipeline.loader import load_model
from pipeline.placement import PlacementError, decide_placement
from pipeline.reference_cache import ReferenceStore
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
    """The tiny klein model loaded with the reference cache on (its processors installed) and no reference store:
    every edit computes its references' K/V."""
    placement = decide_placement(weight_params=1, reference_cache="on", reference_memory="0")
    return load_model(inspect_model(tiny_klein), placement)


@pytest.fixture
def stored(cached):
    """The same model with a fresh 1 GiB reference store (each test its own)."""
    return dataclasses.replace(cached, reference_store=ReferenceStore(1 << 30))


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


# --- the reference store: sets kept across requests ---------------------------------------------------------------


def passes(model, *jobs) -> tuple[list[np.ndarray], list[int]]:
    """The images of `jobs` run as one batch, and the token counts of the transformer's reference passes (its calls
    without text) during it."""
    seen: list[int] = []

    def record(module, args, kwargs):
        if kwargs["encoder_hidden_states"].shape[1] == 0:
            seen.append(kwargs["hidden_states"].shape[1])

    hook = model.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return run(model, *jobs), seen
    finally:
        hook.remove()


def test_a_repeated_reference_set_comes_from_the_store_with_the_same_image(stored, cached):
    refs = (reference(21), reference(22, 96))
    tokens = (SIZE // 16) ** 2 + (96 // 16) ** 2
    edit = job(prompt="a fox", size=SIZE, seeds=(3,), steps=STEPS, references=refs)
    first, first_passes = passes(stored, edit)
    assert first_passes == [tokens]
    # Equal content, other image objects: the store is keyed by the pixels, not the upload.
    copies = tuple(image.copy() for image in refs)
    again, again_passes = passes(stored, job(prompt="a fox", size=SIZE, seeds=(3,), steps=STEPS, references=copies))
    assert again_passes == []
    assert np.array_equal(again[0], first[0])
    (fresh,) = run(cached, edit)  # a model with no store computes the same image
    assert np.array_equal(fresh, first[0])
    # Another prompt and seed with the same references: still from the store.
    _, other_passes = passes(stored, job(prompt="a bird", size=SIZE, seeds=(9,), steps=STEPS, references=copies))
    assert other_passes == []
    # The order of the references is part of the set (each gets its own position ids), and so is every pixel.
    _, swapped = passes(stored, job(size=SIZE, seeds=(3,), steps=STEPS, references=refs[::-1]))
    touched = refs[0].copy()
    touched.putpixel((0, 0), (0, 0, 0) if touched.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    _, changed = passes(stored, job(size=SIZE, seeds=(3,), steps=STEPS, references=(touched, refs[1])))
    assert swapped == [tokens] and changed == [tokens]
    store = stored.reference_store
    assert (store.hits, store.misses, len(store)) == (2, 3, 3)


def test_the_store_keeps_the_most_recent_sets_within_its_bytes(cached):
    one_set = ReferenceStore(1 << 30)
    run(dataclasses.replace(cached, reference_store=one_set), job(size=SIZE, references=(reference(30),)))
    set_bytes = one_set.size
    assert set_bytes > 0
    model = dataclasses.replace(cached, reference_store=ReferenceStore(int(1.5 * set_bytes)))
    a, b = (reference(31),), (reference(32),)
    order = [a, b, b, a, a]
    counts = [len(passes(model, job(size=SIZE, references=refs))[1]) for refs in order]
    assert counts == [1, 1, 0, 1, 0]  # b evicted a; a evicted b
    assert model.reference_store.size <= 1.5 * set_bytes and len(model.reference_store) == 1
    model.reference_store.clear()
    assert model.reference_store.size == 0 and len(passes(model, job(size=SIZE, references=a))[1]) == 1


def test_a_store_of_zero_bytes_keeps_nothing(cached):
    model = dataclasses.replace(cached, reference_store=ReferenceStore(0))
    refs = (reference(33),)
    counts = [len(passes(model, job(size=SIZE, references=refs))[1]) for _ in range(2)]
    assert counts == [1, 1] and len(model.reference_store) == 0


def test_the_store_keys_sets_by_the_active_lora_adapters(tiny_klein, tmp_path):
    """The adapters change the weights, so the K/V: a set seen without a LoRA is computed again with one, and each
    combination's entry gives back exactly the image its own pass gives."""
    from lora_files import make_lora

    placement = decide_placement(weight_params=1, reference_cache="on")
    style = make_lora(tiny_klein, tmp_path / "style.safetensors", seed=1, strength=0.6)
    model = load_model(inspect_model(tiny_klein), placement, adapters_from_options([f"style={style}"]))
    refs = (reference(34),)
    plain = job(size=SIZE, seeds=(5,), steps=STEPS, references=refs)
    styled = job(size=SIZE, seeds=(5,), steps=STEPS, references=refs, loras=(("style", 1.0),))
    runs = [passes(model, edit) for edit in (plain, styled, styled, plain)]
    assert [len(seen) for _, seen in runs] == [1, 1, 0, 0]
    assert np.array_equal(runs[1][0][0], runs[2][0][0]) and np.array_equal(runs[0][0][0], runs[3][0][0])
    sets = [layers for layers, _ in model.reference_store._entries.values()]
    key_plain, key_styled = (next(iter(layers.values()))[0] for layers in sets)
    assert not torch.equal(key_plain, key_styled)  # the LoRA did change the references' keys


def test_reference_memory_is_sized_from_what_is_free_and_checked():
    gib = 1024**3
    on = {"weight_params": 1, "reference_cache": "on"}
    assert decide_placement(**on).reference_memory == gib  # auto on the CPU
    assert decide_placement(**on, reference_memory="2.5").reference_memory == int(2.5 * gib)
    assert decide_placement(**on, reference_memory="0").reference_memory == 0
    assert decide_placement(weight_params=1).reference_memory == 0  # the cache is off: no store
    # CUDA, auto: half of what stays free beyond the weights and their margin, at most 16 GiB.
    cuda = {"device": "cuda", "cuda_available": True, "weight_params": 4 * gib // 2, "reference_cache": "on"}
    roomy = decide_placement(**cuda, cuda_free_bytes=80 * gib)
    assert roomy.offload == "resident" and roomy.reference_memory == 16 * gib
    snug = decide_placement(**cuda, cuda_free_bytes=10 * gib)
    assert snug.offload == "resident" and snug.reference_memory == (10 - 4 - 4) * gib // 2
    offloaded = decide_placement(**cuda, cuda_free_bytes=6 * gib)
    assert offloaded.offload == "model" and offloaded.reference_memory == 0
    assert any("reference sets' K/V kept across requests" in reason for reason in roomy.reasons)
    for bad in ("lots", "-1", "nan", "inf"):
        with pytest.raises(PlacementError, match="reference-memory must be auto or a number of GiB"):
            decide_placement(**on, reference_memory=bad)
    with pytest.raises(PlacementError, match="needs --reference-cache on"):
        decide_placement(weight_params=1, reference_memory="4")


def test_a_served_edit_that_repeats_its_references_is_timed_as_a_store_hit(cached_server):
    import io

    from openai import OpenAI

    from server.timing import parse_server_timing

    on = OpenAI(base_url=f"{cached_server.base_url}/v1", api_key="k", max_retries=0, timeout=120)
    uploads = []
    for seed in (41, 42):
        buffer = io.BytesIO()
        reference(seed).save(buffer, format="PNG")
        uploads.append(("ref.png", buffer.getvalue(), "image/png"))

    def edit(prompt: str, seed: int):
        raw = on.images.with_raw_response.edit(
            image=uploads,
            prompt=prompt,
            size="64x64",
            response_format="b64_json",
            extra_body={"seed": seed, "num_inference_steps": STEPS},
        )
        return parse_server_timing(raw.headers["server-timing"]), pixels(decode_b64(raw.parse().data[0].b64_json))

    def store_metrics() -> dict[str, float]:
        import httpx

        lines = httpx.get(f"{cached_server.base_url}/metrics").text.splitlines()
        return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("flux2_reference_store_")}

    before = store_metrics()
    (first_timing, first), (second_timing, _), (third_timing, third) = (
        edit("a cat", 11),
        edit("a dog", 12),
        edit("a cat", 11),
    )
    after = store_metrics()
    assert after["flux2_reference_store_hits"] - before["flux2_reference_store_hits"] == 2
    assert after["flux2_reference_store_misses"] - before["flux2_reference_store_misses"] == 1
    assert after["flux2_reference_store_bytes"] > before["flux2_reference_store_bytes"]
    assert first_timing["references"][1] == "computed" and first_timing["references"][0] > 0
    assert second_timing["references"][1] == "cache hit" and third_timing["references"][1] == "cache hit"
    assert np.array_equal(first, third)
    assert "reference sets' K/V kept across requests (auto: the CPU)" in cached_server.log()


def test_dev_keys_its_sets_by_the_guidance_it_embeds(tiny_dev):
    """dev's transformer embeds the guidance, so the references' K/V depend on it: a set seen at one guidance is
    computed again at another (klein's transformers do not embed it: there the guidance is not part of the key)."""
    model = load_model(inspect_model(tiny_dev), decide_placement(weight_params=1, reference_cache="on"))
    assert model.pipe.transformer.config["guidance_embeds"]
    refs = (reference(35),)
    counts = [
        len(passes(model, dataclasses.replace(job(size=SIZE, steps=2, references=refs), guidance_scale=scale))[1])
        for scale in (4.0, 4.0, 2.5, 4.0)
    ]
    assert counts == [1, 0, 1, 0]
    keys = list(model.reference_store._entries)  # least recently used first
    assert [guidance for _, guidance in keys] == [2.5, 4.0]


def test_an_edits_reference_kv_does_not_outlive_it(cached, monkeypatch):
    """Without a store nothing keeps the K/V after the call: not the runner, not the pipeline (diffusers keeps a
    call's attention_kwargs on the pipeline until the next call; the runner clears them)."""
    import weakref

    from pipeline import runner

    made: list[weakref.ref] = []
    real = runner.prefill

    def recorded(*args, **kwargs):
        kv = real(*args, **kwargs)
        made.append(weakref.ref(kv))
        return kv

    monkeypatch.setattr(runner, "prefill", recorded)
    run(cached, job(size=SIZE, steps=2, references=(reference(36),)))
    assert len(made) == 1 and made[0]() is None
    assert cached.pipe._attention_kwargs is None


def test_the_processors_hold_references_only_during_a_call_even_one_that_fails(cached):
    """The transformer's hooks hand a call's references to every attention processor before it and take them back
    after it, also when it fails: a call whose batch does not match the references' rows is refused, anything but
    a prefill's references is refused, and in every case no processor keeps a tensor afterwards."""
    from pipeline.reference_cache import _processors, prefill

    pipe = cached.pipe
    transformer = pipe.transformer
    processors = _processors(transformer)
    assert len(processors) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    with torch.inference_mode():
        kv = prefill(pipe, [(reference(40),), (reference(41), reference(42))], 1.0)  # two rows, two sets
    seen = []
    watch = transformer.single_transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.processor.reference)
    )
    inputs = transformer_inputs(transformer, batch=2)
    with torch.inference_mode():
        transformer(**inputs, joint_attention_kwargs={reference_cache.ATTENTION_KWARG: kv})
        assert kv.uses == 1
        keys, values, mask = seen[-1]
        assert len(keys) == len(values) == 2 and keys[0].shape[1] * 2 == keys[1].shape[1]  # each row its own set
        assert mask is not None and mask.shape == (2, 1, 1, keys[1].shape[1]) and not mask[0, 0, 0, -1]
        assert all(p.reference is None and not p.recording for p in processors)
        one_row = {name: value[:1] if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        with pytest.raises(ValueError, match="built for 2 rows, the step has 1"):
            transformer(**one_row, joint_attention_kwargs={reference_cache.ATTENTION_KWARG: kv})
        with pytest.raises(TypeError, match=r"must come from reference_cache\.prefill"):
            transformer(**inputs, joint_attention_kwargs={reference_cache.ATTENTION_KWARG: "not a cache"})
        broken = {**inputs, "img_ids": torch.zeros(2, 15, 4)}  # fails inside the blocks, references handed out
        with pytest.raises(RuntimeError):
            transformer(**broken, joint_attention_kwargs={reference_cache.ATTENTION_KWARG: kv})
    watch.remove()
    assert all(p.reference is None and not p.recording and p.recorded is None for p in processors)


def test_the_textless_reference_pass_runs_with_activation_quantized_layers(tiny_klein):
    """The reference pass carries no text tokens, so the text side of every double-stream block gets empty inputs;
    with fp8 weights (torchao scales each input by its largest value) every cached edit failed there (run 10, H200).
    `tolerate_empty_inputs` (applied with fp8) gives those layers an empty output and leaves every K/V unchanged."""
    from pipeline.quantization import tolerate_empty_inputs

    placement = decide_placement(weight_params=1, reference_cache="on", reference_memory="0")
    pipe = load_model(inspect_model(tiny_klein), placement).pipe  # its own: the layers' forwards are replaced
    rows = [(reference(50), reference(51))]
    with torch.inference_mode():
        plain = reference_cache.prefill(pipe, rows, 1.0).sets[0]
    linears = [module for module in pipe.transformer.modules() if isinstance(module, torch.nn.Linear)]
    failing_on_empty_inputs(pipe.transformer)
    with torch.inference_mode(), pytest.raises(IndexError, match="non-zero size"):
        reference_cache.prefill(pipe, rows, 1.0)
    assert tolerate_empty_inputs(pipe.transformer, "fp8") == len(linears)
    with torch.inference_mode():
        tolerant = reference_cache.prefill(pipe, rows, 1.0).sets[0]
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert plain.keys() == tolerant.keys() and len(plain) == blocks
    for layer, (keys, values) in plain.items():
        assert torch.equal(keys, tolerant[layer][0]) and torch.equal(values, tolerant[layer][1])
