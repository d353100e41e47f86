"""The denoising steps replayed from CUDA graphs (pipeline/transformer_graphs.py), on a CPU, with the graph faked
(tests/fake_graphs.py): captures only inside the warm-up's scope, every input of a step reaching the graph (the
replayed steps run at other timesteps, prompts and noise than the captured one), which calls replay, the keys (what
the modules do and where the weights are), the limits, and every way back to eager. The CUDA capture itself runs on
a GPU only (`.ci/gpu-checks`)."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from engine_helpers import job, served_images
from fake_graphs import corrupting_capture, failing_capture, fake_capture
from PIL import Image

from pipeline.tiny_weights import build_tiny_pipeline
from pipeline.transformer_graphs import MAX_GRAPHS, graphed, install, installed, uninstall

SIDE = 64


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline("klein")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def graphs(pipe):
    graphs = install(pipe.transformer, fake_capture, free=lambda device: None)
    yield graphs
    uninstall(pipe.transformer)  # back to the module's own forward for the other tests
    assert installed(pipe.transformer) is None and "forward" not in vars(pipe.transformer)


def latents(pipe, prompts, *, seed=0, steps=2, side=SIDE, graph=True, capture=False, **options):
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(), graphed(pipe, capture=capture) if graph else contextlib.nullcontext():
        return pipe(prompt=prompts, height=side, width=side, num_inference_steps=steps, generator=generator,
                    output_type="latent", **options).images  # fmt: skip


def capture(pipe, batch=1, side=SIDE):
    """As the warm-up captures: one single-step generation of `batch` images inside `graphed(capture=True)`."""
    latents(pipe, [f"warm-up {index}" for index in range(batch)], steps=1, side=side, capture=True)


def test_steps_replay_the_warm_up_graphs_with_their_own_inputs_and_outputs_stay_as_returned(pipe, graphs):
    eager = latents(pipe, ["a red kite over the sea"], seed=3, steps=3, graph=False)
    capture(pipe)
    assert (graphs.captures, graphs.replays) == (1, 1)  # the capture's own call replays it
    replayed = latents(pipe, ["a red kite over the sea"], seed=3, steps=3)
    assert graphs.replays == 4 and graphs.captures == 1
    # Another prompt, noise and timesteps than the captured step's: each reached the graph.
    assert torch.equal(replayed, eager)
    kept = replayed.clone()
    other = latents(pipe, ["three pears on a plate"], seed=4, steps=2)
    assert graphs.replays == 6 and torch.equal(replayed, kept)
    assert torch.equal(other, latents(pipe, ["three pears on a plate"], seed=4, steps=2, graph=False))


def test_each_input_of_a_step_reaches_the_graph(pipe, graphs):
    """A direct call per input changed alone: the replay follows it (a stale captured input would not)."""
    capture(pipe)
    tokens = (SIDE // 16) ** 2
    generator = torch.Generator().manual_seed(0)
    base = {
        "hidden_states": torch.randn(1, tokens, pipe.transformer.config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 512, pipe.transformer.config.joint_attention_dim, generator=generator),
        "timestep": torch.tensor([0.7]),
        "img_ids": pipe._prepare_latent_ids(torch.zeros(1, 4 * 32, SIDE // 16, SIDE // 16)),
        "txt_ids": pipe._prepare_text_ids(torch.zeros(1, 512, 8)),
    }
    changed = {
        "hidden_states": base["hidden_states"] * 0.5,
        "encoder_hidden_states": base["encoder_hidden_states"].flip(1),
        "timestep": torch.tensor([0.2]),
        "img_ids": base["img_ids"].flip(1),
        "txt_ids": base["txt_ids"] + 3,
    }
    with torch.inference_mode():
        for name, value in changed.items():
            inputs = {**base, name: value}
            eager = pipe.transformer(**inputs, guidance=None, joint_attention_kwargs=None, return_dict=False)[0]
            before = graphs.replays
            with graphed(pipe):
                out = pipe.transformer(**inputs, guidance=None, joint_attention_kwargs=None, return_dict=False)[0]
            assert graphs.replays == before + 1, name
            assert torch.equal(out, eager), name


def test_only_steps_inside_graphed_in_inference_mode_of_a_captured_shape_replay(pipe, graphs):
    from pipeline.references import prepare_reference

    capture(pipe)
    latents(pipe, ["a cat"], graph=False)
    with torch.no_grad(), graphed(pipe):  # no_grad is not inference mode
        pipe(prompt=["a cat"], height=SIDE, width=SIDE, num_inference_steps=2, output_type="latent")
    assert graphs.replays == 1
    # An edit: its reference tokens make the steps longer (another shape, not captured outside the warm-up).
    reference = prepare_reference(Image.new("RGB", (SIDE, SIDE), (200, 30, 30)))
    edit = latents(pipe, ["make it blue"], image=[reference])
    assert graphs.replays == 1 and graphs.captures == 1 and not graphs.refused
    assert torch.equal(edit, latents(pipe, ["make it blue"], image=[reference], graph=False))


def test_steps_that_carry_the_reference_caches_keys_and_values_never_replay_a_generations_graph(pipe, graphs):
    """With the reference cache (its processors installed at load, before the warm-up's capture, as a server has
    them) an edit's steps keep a generation's shape but carry the references' K/V in their attention arguments:
    eager, never the generation's graph, which would drop the references."""
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

    from pipeline import reference_cache
    from pipeline.references import prepare_reference

    reference_cache.install(pipe.transformer)
    try:
        capture(pipe)
        latents(pipe, ["make it blue"])
        assert graphs.replays == 1 + 2  # a generation replays with the cache's processors in place
        reference_cache.install(pipe.transformer)  # again, as the bench does for each cached edit: the same ones
        latents(pipe, ["make it blue"])
        assert graphs.replays == 3 + 2
        reference = prepare_reference(Image.new("RGB", (SIDE, SIDE), (200, 30, 30)))
        kv = reference_cache.prefill(pipe, [(reference,)], 1.0)
        options = {"attention_kwargs": {reference_cache.ATTENTION_KWARG: kv}}
        cached = latents(pipe, ["make it blue"], **options)
        assert graphs.replays == 5
        assert torch.equal(cached, latents(pipe, ["make it blue"], graph=False, **options))
        assert not torch.equal(cached, latents(pipe, ["make it blue"]))
    finally:
        for block in pipe.transformer.transformer_blocks:
            block.attn.set_processor(Flux2AttnProcessor())
        for block in pipe.transformer.single_transformer_blocks:
            block.attn.set_processor(Flux2ParallelSelfAttnProcessor())


def test_what_the_modules_do_and_where_the_weights_are_is_part_of_the_key(pipe, graphs):
    """A graph bakes in the attention processors and hooks and reads the weights where they were: a change to any
    of them between two denoises makes the steps run eager (and the warm-up's graph is not captured again)."""
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

    capture(pipe)
    prompt = ["a lighthouse at dusk"]
    block = pipe.transformer.transformer_blocks[0]
    weight = pipe.transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight

    def processor_swapped():
        original = block.attn.processor
        block.attn.set_processor(Flux2AttnProcessor())
        return lambda: block.attn.set_processor(original)

    def hooked():
        return block.register_forward_hook(lambda module, args, output: None).remove

    def weight_moved():
        original = weight.data
        weight.data = original.clone()  # same values, another address: a graph would read the old one

        def restore():
            weight.data = original

        return restore

    for change in (processor_swapped, hooked, weight_moved):
        undo = change()
        try:
            before = graphs.replays
            assert torch.equal(latents(pipe, prompt), latents(pipe, prompt, graph=False))
            assert graphs.replays == before, change.__name__
        finally:
            undo()
        before = graphs.replays
        latents(pipe, prompt)  # as it was at the capture: replays again
        assert graphs.replays == before + 2, change.__name__
    assert graphs.captures == 1


def test_a_diffusers_hook_on_a_block_makes_the_steps_run_eager():
    """As the step cache hooks the blocks (diffusers' hook registry rewrites the block's forward): no replay. Last
    and on a pipeline of its own: taking the hook off leaves the block's forward set on the instance."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = build_tiny_pipeline("klein")
    pipe.set_progress_bar_config(disable=True)
    graphs = install(pipe.transformer, fake_capture, free=lambda device: None)
    capture(pipe)
    HookRegistry.check_if_exists_or_initialize(pipe.transformer.transformer_blocks[0]).register_hook(ModelHook(), "x")
    assert torch.equal(latents(pipe, ["a cat"]), latents(pipe, ["a cat"], graph=False))
    assert graphs.replays == 1


def test_captures_stop_at_the_limit_and_where_the_memory_would_not_leave_room(pipe, caplog):
    graphs = install(pipe.transformer, fake_capture, free=lambda device: 2**30)  # 1 GiB free
    try:
        capture(pipe, side=128)  # 2 x the decode of 128² fits in 1 GiB
        assert graphs.captures == 1
        graphs.free = lambda device: 2**20
        with caplog.at_level(logging.DEBUG, logger="flux2.transformer_graphs"):
            capture(pipe, side=SIDE)
        assert graphs.captures == 1 and "GiB wanted beside it" in caplog.text and not graphs.refused
        graphs.free = lambda device: None
        capture(pipe, side=SIDE)
        assert graphs.captures == 2 == MAX_GRAPHS
        with caplog.at_level(logging.WARNING, logger="flux2.transformer_graphs"):
            caplog.clear()
            capture(pipe, side=96)
            capture(pipe, side=96)
        assert graphs.captures == 2 and f"{MAX_GRAPHS} graphs are kept at most" in caplog.text
        assert caplog.text.count("runs eager") == 1  # refused once, then eager without a word
    finally:
        uninstall(pipe.transformer)


def test_a_failed_capture_or_a_replay_unlike_the_eager_pass_leaves_the_steps_eager(pipe, caplog):
    eager = latents(pipe, ["a cat"], graph=False)
    for capture_with, words in (
        (failing_capture, "the capture failed (RuntimeError"),
        (corrupting_capture, "differs from the eager pass"),
    ):
        graphs = install(pipe.transformer, capture_with, free=lambda device: None)
        try:
            with caplog.at_level(logging.WARNING, logger="flux2.transformer_graphs"):
                caplog.clear()
                capture(pipe)
                capture(pipe)
                assert torch.equal(latents(pipe, ["a cat"]), eager)
            assert (graphs.captures, graphs.replays) == (0, 0) and len(graphs.refused) == 1
            assert words in caplog.text and caplog.text.count("runs eager") == 1
        finally:
            uninstall(pipe.transformer)


def test_the_warm_up_captures_and_the_engine_replays_them_with_the_same_images(tiny_klein, monkeypatch):
    """The compile warm-up's capture pass (batches of one and two at its size) and the runner's denoise through the
    graphs: the same images as without them, for a lone request and for a batch of two."""
    from pipeline import cuda_graphs
    from pipeline.compilation import warm_up

    monkeypatch.setattr(cuda_graphs, "capture_cuda_graph", fake_capture)
    jobs = [
        job(prompt="a red kite", size=SIDE, seeds=(5,)),
        job(prompt="a red kite", size=SIDE, seeds=(5, 6)),
        job(prompt="a red kite", size=SIDE + 16, seeds=(5,)),  # not the warm-up's size: eager
    ]
    installed_graphs = []

    def prepare(model):
        installed_graphs.append(install(model.pipe.transformer, free=lambda device: None))
        warm_up(model.pipe, side=SIDE)
        assert (installed_graphs[0].captures, installed_graphs[0].replays) == (2, 2)

    assert served_images(tiny_klein, jobs, prepare) == served_images(tiny_klein, jobs)
    assert installed_graphs[0].replays == 2 + 2 + 2  # two steps each for the warm-up's two shapes


def test_the_bench_serves_one_image_with_the_graphs_paused_only_where_it_has_them(pipe):
    """`one_image_steps_eager` (bench --compile on CUDA, where the steps have graphs): the same served image with the
    graphs paused, then back; absent where the transformer has none."""
    from pipeline.architectures import ARCHITECTURES
    from server.bench_figures import _pause_step_graphs, figures_for

    client = object()  # the figures' actions are not run here
    keys = [figure.key for figure in figures_for(ARCHITECTURES["tiny"], pipe, client, None, 2, "cpu")]
    assert "one_image_steps_eager" not in keys
    graphs = install(pipe.transformer, fake_capture, free=lambda device: None)
    try:
        figure = next(
            f for f in figures_for(ARCHITECTURES["tiny"], pipe, client, None, 2, "cpu") if f.key.endswith("steps_eager")
        )
        assert figure.direct is None and "without CUDA graphs" in figure.label
        capture(pipe)
        figure.prepare()
        assert graphs.paused
        assert torch.equal(latents(pipe, ["a cat"]), latents(pipe, ["a cat"], graph=False)) and graphs.replays == 1
        figure.cleanup()
        latents(pipe, ["a cat"])
        assert not graphs.paused and graphs.replays == 3
        _pause_step_graphs(build_tiny_pipeline("klein"), True)  # a pipeline without graphs: nothing to pause
    finally:
        uninstall(pipe.transformer)
