"""The final decode replayed from a CUDA graph (pipeline/decoder_graphs.py), on a CPU, with the graph faked
(tests/fake_graphs.py): captured only inside the warm-up's scope, the latents reaching the graph (the replayed
decodes are of other latents than the captured one), which decodes replay (one image of the captured size, inside
`graphed`), the key, the room a capture needs, and the way back to eager. The CUDA capture itself runs on a GPU only
(`.ci/gpu-checks`)."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_helpers import job, served_images
from fake_graphs import corrupting_capture, fake_capture

from pipeline.decoder_graphs import MAX_GRAPHS, graphed, install, installed, uninstall
from pipeline.decoding import decode
from pipeline.tiny_weights import build_tiny_pipeline

SIDE = 64


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("klein")


@pytest.fixture
def graphs(pipe):
    graphs = install(pipe.vae.decoder, fake_capture, free=lambda device: None)
    yield graphs
    uninstall(pipe.vae.decoder)
    assert installed(pipe.vae.decoder) is None and "forward" not in vars(pipe.vae.decoder)


def vae_latents(seed: int, batch: int = 1, side: int = SIDE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 32, side // 8, side // 8, generator=generator)


def pixels(pipe, latents, *, graph: bool = True, capture: bool = False, room: int | None = None) -> list[bytes]:
    """`room`: the device's free bytes as the decode is told them (1: tiled)."""
    if not graph:
        return [image.tobytes() for image in decode(pipe, latents, room=room)]
    with graphed(pipe, capture=capture):
        return [image.tobytes() for image in decode(pipe, latents, room=room)]


def test_decodes_of_the_captured_shape_replay_with_their_own_latents(pipe, graphs):
    pixels(pipe, vae_latents(0))  # outside the warm-up's scope: nothing captured
    assert (graphs.captures, graphs.replays) == (0, 0)
    pixels(pipe, vae_latents(0), capture=True)
    assert (graphs.captures, graphs.replays) == (1, 1)
    for seed in (1, 2):
        assert pixels(pipe, vae_latents(seed)) == pixels(pipe, vae_latents(seed), graph=False)
    assert graphs.replays == 3
    # Another size, a batch and a tiled decode (its tiles): eager, the same pixels as without the graph.
    for latents in (vae_latents(3, side=SIDE + 16), vae_latents(4, batch=2)):
        assert pixels(pipe, latents) == pixels(pipe, latents, graph=False)
    sizes = pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = SIDE // 2, SIDE // 16
    try:
        tiled = pixels(pipe, vae_latents(5), room=1)
        assert tiled == pixels(pipe, vae_latents(5), graph=False, room=1) != pixels(pipe, vae_latents(5))
    finally:
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = sizes
    assert graphs.replays == 4 and graphs.captures == 1 == MAX_GRAPHS and not graphs.refused


def test_a_changed_decoder_runs_eager_and_a_capture_needs_room(pipe, caplog):
    graphs = install(pipe.vae.decoder, fake_capture, free=lambda device: 2**20)  # 1 MiB free: not enough
    try:
        with caplog.at_level(logging.DEBUG, logger="flux2.decoder_graphs"):
            pixels(pipe, vae_latents(0), capture=True)
        assert graphs.captures == 0 and "GiB wanted beside it" in caplog.text
        graphs.free = lambda device: None
        pixels(pipe, vae_latents(0), capture=True)
        norm = pipe.vae.decoder.conv_norm_out
        handle = norm.register_forward_hook(lambda module, args, output: None)
        try:
            assert pixels(pipe, vae_latents(1)) == pixels(pipe, vae_latents(1), graph=False)
            assert graphs.replays == 1  # the capture's own replay only
        finally:
            handle.remove()
        pixels(pipe, vae_latents(1))
        assert graphs.replays == 2
    finally:
        uninstall(pipe.vae.decoder)


def test_a_replay_unlike_the_eager_decode_leaves_it_eager(pipe, caplog):
    graphs = install(pipe.vae.decoder, corrupting_capture, free=lambda device: None)
    try:
        with caplog.at_level(logging.WARNING, logger="flux2.decoder_graphs"):
            assert pixels(pipe, vae_latents(0), capture=True) == pixels(pipe, vae_latents(0), graph=False)
        assert graphs.captures == 0 and "differs from the eager pass" in caplog.text
    finally:
        uninstall(pipe.vae.decoder)


def test_the_warm_up_captures_the_decode_and_the_engine_replays_it_with_the_same_images(tiny_klein, monkeypatch):
    from pipeline import cuda_graphs
    from pipeline.compilation import warm_up

    monkeypatch.setattr(cuda_graphs, "capture_cuda_graph", fake_capture)
    jobs = [
        job(prompt="a red kite", size=SIDE, seeds=(5,)),
        job(prompt="a red kite", size=SIDE, seeds=(5, 6)),  # a batch: eager
    ]
    installed_graphs = []

    def prepare(model):
        installed_graphs.append(install(model.pipe.vae.decoder, free=lambda device: None))
        warm_up(model.pipe, side=SIDE)
        assert (installed_graphs[0].captures, installed_graphs[0].replays) == (1, 1)

    assert served_images(tiny_klein, jobs, prepare) == served_images(tiny_klein, jobs)
    assert installed_graphs[0].replays == 2


def test_placement_gives_the_decoder_graphs_with_the_encoders():
    from pipeline.placement import decide_placement

    options = {"weight_params": 8_000_000_000, "cuda_available": True, "cuda_free_bytes": 79 * 2**30}
    on = decide_placement(**options, compile=True, quantize="transformer=fp8", cuda_capability=(9, 0))
    assert on.decoder_graphs and not on.transformer_graphs
    assert any(reason.startswith("decoder graphs:") for reason in on.reasons)
    for kwargs in ({"compile": False}, {"cuda_free_bytes": 16 * 2**30, "compile": True}):
        assert not decide_placement(**{**options, **kwargs}).decoder_graphs, kwargs
    assert not decide_placement(weight_params=1000, cuda_available=False, compile=True).decoder_graphs


def test_the_bench_times_the_graphed_decode_where_the_decoder_has_a_graph(pipe):
    from pipeline.architectures import ARCHITECTURES
    from server.bench_figures import figures_for

    arch = ARCHITECTURES["tiny"]
    assert "vae_decode_graphed" not in [f.key for f in figures_for(arch, pipe, None, None, 2, "cpu")]
    graphs = install(pipe.vae.decoder, fake_capture, free=lambda device: None)
    try:
        figure = next(f for f in figures_for(arch, pipe, None, None, 2, "cpu") if f.key == "vae_decode_graphed")
        pixels(pipe, vae_latents(0, side=arch.size), capture=True)
        assert figure.served is None and figure.direct() > 0
        assert graphs.replays == 1 + 4  # the capture's, the warm-up call's and three timed ones
        plain = next(f for f in figures_for(arch, pipe, None, None, 2, "cpu") if f.key == "vae_decode")
        assert plain.direct() > 0 and graphs.replays == 5  # the plain figure decodes compiled and eager
    finally:
        uninstall(pipe.vae.decoder)
