"""The text encode replayed from a CUDA graph (pipeline/encoder_graphs.py), on a CPU, with the graph faked
(tests/fake_graphs.py): which calls replay, that rows and outputs come out right and are not overwritten later, the
keys, and every way back to eager. The CUDA capture itself runs on a GPU only (`.ci/gpu-checks`)."""

from __future__ import annotations

import contextlib
import logging
import threading

import pytest
import torch
from engine_helpers import job, served_images
from fake_graphs import corrupting_capture, failing_capture, fake_capture

from pipeline.cuda_graphs import agree
from pipeline.encoder_depth import reading_depth
from pipeline.encoder_graphs import MAX_GRAPHS, graphed, install, installed, uninstall
from pipeline.tiny_weights import build_tiny_pipeline

PROMPTS = ["a red kite over the sea", "a lighthouse at dusk, oil painting", "three pears on a plate"]


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline("klein")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def graphs(pipe):
    graphs = install(pipe.text_encoder, fake_capture)
    yield graphs
    uninstall(pipe.text_encoder)  # back to the module's own forward for the other tests
    assert installed(pipe.text_encoder) is None and "forward" not in vars(pipe.text_encoder)


def encode(pipe, prompts, *, graph: bool = True, cut: bool = True) -> torch.Tensor:
    with (
        torch.inference_mode(),
        reading_depth(pipe) if cut else contextlib.nullcontext(),
        graphed(pipe) if graph else contextlib.nullcontext(),
    ):
        return pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1)[0]


def test_replayed_encodes_are_the_eager_ones_row_by_row_and_stay_as_returned(pipe, graphs):
    eager = [encode(pipe, [prompt], graph=False) for prompt in PROMPTS]
    first = encode(pipe, PROMPTS[:2])  # two rows: one graph of one row, replayed twice
    kept = first.clone()
    assert graphs.captures == 1 and graphs.replays == 2
    assert torch.equal(first[0:1], eager[0]) and torch.equal(first[1:2], eager[1])
    third = encode(pipe, PROMPTS[2:])
    assert graphs.captures == 1 and graphs.replays == 3
    assert torch.equal(third, eager[2])
    # The replay overwrote the graph's own output; what the first call returned is untouched (copied out).
    assert torch.equal(first, kept)


def test_only_calls_inside_graphed_on_its_thread_in_inference_mode_replay(pipe, graphs):
    encode(pipe, PROMPTS[:1], graph=False)
    assert (graphs.captures, graphs.replays) == (0, 0)
    with torch.no_grad(), reading_depth(pipe), graphed(pipe):  # no_grad is not inference mode
        pipe.encode_prompt(prompt=PROMPTS[:1], device="cpu", num_images_per_prompt=1)
    assert (graphs.captures, graphs.replays) == (0, 0)
    seen = []
    with torch.inference_mode(), reading_depth(pipe), graphed(pipe):
        other = threading.Thread(target=lambda: seen.append(graphs.active))
        other.start()
        other.join()
        assert graphs.active
    assert seen == [False] and not graphs.active
    # The encoder called as prompt enhancement calls it (generation, a cache): eager, even inside graphed.
    ids = torch.ones((1, 8), dtype=torch.long)
    with torch.inference_mode(), graphed(pipe):
        pipe.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    assert (graphs.captures, graphs.replays) == (0, 0)


def test_each_form_of_the_encoder_is_its_own_graph_and_past_the_limit_calls_run_eager(pipe, graphs, caplog):
    cut = encode(pipe, PROMPTS[:1])
    whole = encode(pipe, PROMPTS[:1], cut=False)  # the whole encoder: other modules run, another graph
    assert graphs.captures == 2 == MAX_GRAPHS
    assert torch.equal(cut, encode(pipe, PROMPTS[:1], graph=False))
    assert torch.equal(whole, encode(pipe, PROMPTS[:1], graph=False, cut=False))
    ids = torch.arange(16).reshape(1, 16)
    with caplog.at_level(logging.WARNING, logger="flux2.encoder_graphs"), torch.inference_mode(), graphed(pipe):
        short = pipe.text_encoder(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False
        )
        pipe.text_encoder(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False
        )
    assert graphs.captures == 2 and f"{MAX_GRAPHS} graphs are kept at most" in caplog.text
    assert caplog.text.count("runs eager") == 1  # refused once, then eager without a word
    with torch.inference_mode():
        eager = pipe.text_encoder(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False
        )
    assert all(torch.equal(a, b) for a, b in zip(short.hidden_states, eager.hidden_states, strict=True))


def test_a_moved_weight_makes_a_new_capture_rather_than_a_stale_read(pipe, graphs):
    encode(pipe, PROMPTS[:1])
    weight = pipe.text_encoder.get_decoder().layers[0].mlp.down_proj.weight
    original = weight.data
    try:
        weight.data = original.clone()  # same values, another address: a graph would read the old one
        encode(pipe, PROMPTS[:1])
        assert graphs.captures == 2
    finally:
        weight.data = original


def test_a_failed_capture_or_a_replay_unlike_the_eager_pass_leaves_the_encode_eager(pipe, caplog):
    eager = encode(pipe, PROMPTS[:1], graph=False)
    for capture, words in (
        (failing_capture, "the capture failed (RuntimeError"),
        (corrupting_capture, "differs from the eager pass"),
    ):
        graphs = install(pipe.text_encoder, capture)
        try:
            with caplog.at_level(logging.WARNING, logger="flux2.encoder_graphs"):
                caplog.clear()
                assert torch.equal(encode(pipe, PROMPTS[:1]), eager)
                assert torch.equal(encode(pipe, PROMPTS[1:2]), encode(pipe, PROMPTS[1:2], graph=False))
            assert (graphs.captures, graphs.replays) == (0, 0) and len(graphs.refused) == 1
            assert words in caplog.text and caplog.text.count("runs eager") == 1
        finally:
            uninstall(pipe.text_encoder)


def test_the_engine_encodes_through_the_graphs_and_makes_the_same_images(tiny_klein):
    """The runner's encode replays the graphs of a model that has them: the same images as without them, and a
    repeated prompt comes from the prompt cache (no replay)."""
    jobs = [job(prompt=prompt) for prompt in (*PROMPTS[:2], PROMPTS[0])]
    installed_graphs = []
    graphed_images = served_images(
        tiny_klein, jobs, lambda model: installed_graphs.append(install(model.pipe.text_encoder, fake_capture))
    )
    assert graphed_images == served_images(tiny_klein, jobs)
    (graphs,) = installed_graphs
    assert (graphs.captures, graphs.replays) == (1, 2)


def test_the_bench_figure_times_replayed_encodes_and_leaves_the_graphs_as_it_found_them(pipe):
    """`text_encode_graphed` (on CUDA only; here with the graph faked): its encodes replay, and it installs the
    graphs only where the bench's --compile has not, dropping only those it installed."""
    from server.bench_figures import _graphs
    from server.bench_harness import text_encode

    graphs = install(pipe.text_encoder, fake_capture)  # as the bench's --compile installs them
    try:
        _graphs(pipe, True)
        assert installed(pipe.text_encoder) is graphs
        assert text_encode(pipe, calls=2, read_depth=True, graph=True) > 0
        assert graphs.captures == 1 and graphs.replays == 3  # the warm-up call and the two timed ones
        _graphs(pipe, False)
        assert installed(pipe.text_encoder) is graphs  # the bench's own stay
    finally:
        uninstall(pipe.text_encoder)
    _graphs(pipe, True)  # not compiled: the figure installs them (the real capture: eager on a CPU) ...
    assert installed(pipe.text_encoder) is not None
    _graphs(pipe, False)  # ... and drops them after
    assert installed(pipe.text_encoder) is None


def test_the_self_check_takes_rounding_and_refuses_anything_more():
    eager = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0] * 7 + [300.0])
    rounded = eager.to(torch.bfloat16).float()  # bf16's rounding of every element
    assert agree((rounded, None), (eager, None)) is None
    for wrong in (eager + 0.1, eager.roll(1, dims=1), eager * float("nan"), eager[:1]):
        assert agree((wrong, None), (eager, None)) is not None
