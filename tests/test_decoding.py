"""pipeline/decoding.py: the decode chosen by the device's free memory (whole, one image at a time, tiled), and a
decode that runs out of memory done again in tiles. The tiles are shrunk on a private copy of the tiny VAE, so
tiling shows at test sizes (FLUX.2's VAE tiles at 1024² pixels)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from pipeline import decoding
from pipeline.decoding import decode, decode_way
from pipeline.loader import load_model
from pipeline.offload_plan import decode_bytes
from pipeline.placement import decide_placement
from pipeline.weights import inspect_model

SIDE = 256  # pixels: a 2 x 2 grid of 128-pixel tiles


@pytest.fixture(scope="module")
def model(tiny_klein):
    """The tiny klein model with its own VAE whose tiles are 128 pixels (16 latents) a side."""
    model = load_model(inspect_model(tiny_klein), decide_placement(weight_params=1))
    model.pipe.vae = copy.deepcopy(model.pipe.vae)
    model.pipe.vae.tile_sample_min_size, model.pipe.vae.tile_latent_min_size = 128, 16
    return model


@pytest.fixture(scope="module")
def pipe(model):
    return model.pipe


@pytest.fixture(scope="module")
def latents():
    return torch.randn((2, 32, SIDE // 8, SIDE // 8), generator=torch.Generator().manual_seed(3))


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture(scope="module")
def whole(pipe, latents):
    return pixels(decode(pipe, latents))  # on the CPU: no limit known, the batch at once


def test_the_way_follows_the_free_memory():
    one = decode_bytes(1024 * 1024, 2)
    assert one == pytest.approx(2.5 * 1024**3)  # ~2.4 GiB measured on an H200 for a 1024² bf16 decode
    assert decode_way(4, 1024 * 1024, 2, None) == "whole"  # nothing known (the CPU)
    assert decode_way(4, 1024 * 1024, 2, 4 * one) == "whole"
    assert decode_way(4, 1024 * 1024, 2, 4 * one - 1) == "per_image"
    assert decode_way(1, 1024 * 1024, 2, one) == "whole"
    assert decode_way(1, 4 * 1024 * 1024, 2, one) == "tiled"  # a 4 MP image where only 1 MP's decode fits
    assert decode_way(2, 4 * 1024 * 1024, 2, 0) == "tiled"


def test_one_image_at_a_time_gives_the_batch_decode(pipe, latents, whole):
    one = decode_bytes(SIDE * SIDE, 4)
    images = decode(pipe, latents, room=one)  # room for one image's decode, not two
    assert [image.size for image in images] == [(SIDE, SIDE)] * 2
    assert np.abs(pixels(images) - whole).max() <= 2  # float batch math only


def test_tiles_when_not_even_one_image_fits(pipe, latents, whole, caplog):
    calls = []
    real = pipe.vae.tiled_decode
    pipe.vae.tiled_decode = lambda *args, **kwargs: calls.append(args[0].shape) or real(*args, **kwargs)
    try:
        with caplog.at_level(logging.INFO, logger="flux2.decoding"):
            images = decode(pipe, latents, room=1024)
    finally:
        del pipe.vae.tiled_decode
    assert calls == [(1, 32, SIDE // 8, SIDE // 8)] * 2  # each image alone, in tiles
    assert not pipe.vae.use_tiling  # switched on for the decode only
    assert [image.size for image in images] == [(SIDE, SIDE)] * 2
    tiled = pixels(images)
    # diffusers' own tiled decode (enable_tiling) of the batch: the same, up to float batch math.
    pipe.vae.enable_tiling()
    try:
        theirs = pixels(decode(pipe, latents, room=None))
    finally:
        pipe.vae.disable_tiling()
    assert np.abs(tiled - theirs).max() <= 2
    # Against the whole decode: the same picture, not the same pixels (tiles lose the decoder's mid-block attention
    # over the whole image and are blended at their seams). Measured on these random weights with 128-pixel tiles:
    # correlation 0.91, mean difference 12.5/255 (6.1/255 with 192-pixel tiles); FLUX.2's tiles are 1024² pixels.
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.85


def test_a_decode_out_of_memory_is_done_again_in_tiles(pipe, latents, monkeypatch, caplog):
    import weakref

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    expected = pixels(decode(pipe, latents, room=0))  # tiled
    real = pipe.vae.decode
    held: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def whole_does_not_fit(*args, **kwargs):
        if pipe.vae.use_tiling:  # the retry: the failed attempt's feature maps must be gone by now
            alive_at_retry.append(held[0]() is not None)
            return real(*args, **kwargs)
        feature_maps = torch.ones(1024)  # what a decode holds when it runs out of memory
        held.append(weakref.ref(feature_maps))
        no_memory()

    monkeypatch.setattr(pipe.vae, "decode", whole_does_not_fit)
    with caplog.at_level(logging.WARNING, logger="flux2.decoding"):
        again = pixels(decode(pipe, latents))
    assert np.array_equal(again, expected)
    assert alive_at_retry == [False, False]  # one tiled decode per image, after the failed frames were released
    assert "out of device memory decoding whole; decoding again in tiles" in caplog.text
    monkeypatch.setattr(pipe.vae, "tiled_decode", no_memory)
    with pytest.raises(torch.OutOfMemoryError):  # tiles did not fit either: the engine's OOM handling takes over
        decode(pipe, latents)


def test_a_batch_decodes_by_what_the_device_has_free(model, monkeypatch):
    """The runner's decode reads the device's free memory: with room for one image's decode only, a batch of two is
    decoded one at a time; with none, each in tiles; each image still comes out at the size asked."""
    from engine_helpers import job

    from pipeline.batching import Slice
    from pipeline.runner import run_batch
    from pipeline.text_cache import PromptCache

    vae = model.pipe.vae
    calls: list[str] = []
    for name in ("decode", "tiled_decode"):
        real = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    two = job(size=SIDE, seeds=(1, 2), steps=2)
    tiled = ["decode", "tiled_decode"] * 2  # diffusers' decode, tiling on, hands each image to tiled_decode
    for room, expected in ((decode_bytes(SIDE * SIDE, 4), ["decode", "decode"]), (0, tiled)):
        calls.clear()
        monkeypatch.setattr(decoding, "free_device_bytes", lambda device, room=room: room)
        (result,) = run_batch(model, [Slice(two, two.seeds)], PromptCache(1 << 20))
        assert calls == expected
        assert [image.size for image in result.images] == [(SIDE, SIDE)] * 2


def test_kept_reference_sets_make_room_before_the_decode_goes_lighter(pipe, latents, monkeypatch):
    """With room for less than one image's decode, the decode first asks `make_room` for what it lacks (the runner
    passes the reference store's release), reads the free memory again and, given enough, decodes without tiles.
    With room for one image but not the batch it decodes one at a time and leaves the store alone."""
    one = decode_bytes(SIDE * SIDE, 4)
    asked = []

    def make_room(lacking):
        asked.append(lacking)
        monkeypatch.setattr(decoding, "free_device_bytes", lambda device: 2 * one)  # the sets' memory is free now
        return True

    calls = []
    real = pipe.vae.enable_tiling
    monkeypatch.setattr(pipe.vae, "enable_tiling", lambda: calls.append("tiling") or real())
    images = decode(pipe, latents, room=one // 2, make_room=make_room)
    assert asked == [one - one // 2] and calls == []  # whole (2 images' room now): no tiles
    assert [image.size for image in images] == [(SIDE, SIDE)] * 2
    asked.clear()
    decode(pipe, latents, room=one, make_room=make_room)
    assert asked == [] and calls == []  # one image fits: per image, the store is left alone


def test_free_device_bytes_counts_the_allocators_reserve_and_the_memory_fraction(monkeypatch):
    gib = 1024**3
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: 30 * gib)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device: 20 * gib)
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device: 1.0, raising=False)
    device = torch.device("cuda", 0)
    assert decoding.free_device_bytes(device) == 20 * gib  # 10 free on the card + 10 reserved, unused
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device: 0.3, raising=False)
    assert decoding.free_device_bytes(device) == int(0.3 * 80 * gib) - 20 * gib  # a 24 GiB cap, 20 allocated
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device: 0.2, raising=False)
    assert decoding.free_device_bytes(device) == 0  # allocated beyond the cap: nothing, never negative


def test_free_device_bytes_of_a_cuda_device_without_an_index(monkeypatch):
    """Under group offloading diffusers reports the execution device as `cuda`, without an index; torch 2.11's
    `mem_get_info` refused it on an H100 (both streamed plans failed their first image). The current device is
    asked instead; the fakes refuse an unindexed device the way torch 2.11 did."""
    gib = 1024**3
    cuda = torch.cuda

    def indexed(value):
        def call(device):
            if not isinstance(device, int) and torch.device(device).index is None:
                raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
            return value

        return call

    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "mem_get_info", indexed((10 * gib, 80 * gib)))
    monkeypatch.setattr(cuda, "memory_reserved", indexed(30 * gib))
    monkeypatch.setattr(cuda, "memory_allocated", indexed(20 * gib))
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", indexed(1.0), raising=False)
    assert decoding.free_device_bytes(torch.device("cuda")) == 20 * gib
    assert decoding.free_device_bytes("cuda") == 20 * gib


def test_free_device_bytes_is_none_on_the_cpu():
    assert decoding.free_device_bytes(torch.device("cpu")) is None


def test_a_vae_whose_weights_wait_on_the_meta_device_decodes_on_the_execution_device(tiny_klein, latents):
    """Under diffusers' sequential offload (accelerate's `cpu_offload`: the weights on the meta device until a
    hook brings each in) a model's `device` is "meta"; the decode sends the latents to the pipeline's execution
    device, where the hooks run the layers, and gets the resident VAE's pixels."""
    from accelerate import cpu_offload

    model = load_model(inspect_model(tiny_klein), decide_placement(weight_params=1))
    expected = pixels(decode(model.pipe, latents[:1]))
    cpu_offload(model.pipe.vae, execution_device=torch.device("cpu"))
    assert model.pipe.vae.device.type == "meta"
    assert np.abs(pixels(decode(model.pipe, latents[:1])) - expected).max() == 0
