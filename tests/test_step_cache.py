"""`--cache`: step caching hooks on the transformer (TaylorSeer), in-process on tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import serve_refused
from engine_helpers import job

from pipeline.engine import Engine
from pipeline.placement import decide_placement
from pipeline.pool import ModelConfig, ModelPool
from pipeline.step_cache import CacheSpecError, StepCache, parse_cache
from pipeline.weights import inspect_model


@pytest.mark.parametrize(
    ("text", "expected"),
    [("off", StepCache()), ("taylorseer", StepCache("taylorseer", 5)), ("TaylorSeer:3", StepCache("taylorseer", 3))],
)
def test_cache_specs(text, expected):
    assert parse_cache(text) == expected


@pytest.mark.parametrize("text", ["on", "taylorseer:1", "taylorseer:2.5", "taylorseer:x", "off:1", "first-block"])
def test_bad_cache_specs_say_what_is_accepted(text):
    with pytest.raises(CacheSpecError):
        parse_cache(text)


def test_first_block_cache_really_fails_on_flux2_in_this_diffusers(tiny_klein):
    """Why --cache first-block is refused: diffusers' own hooks break on FLUX.2's blocks. When an upgrade fixes
    them, this fails: then offer it."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

    pipe = DiffusionPipeline.from_pretrained(tiny_klein, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(TypeError):
        pipe(prompt="x", height=32, width=32, num_inference_steps=3, output_type="latent")


def test_the_server_refuses_a_bad_cache_at_start(tiny_klein):
    assert "cache must be one of off, taylorseer" in serve_refused("--model", str(tiny_klein), "--cache", "on")


def _engine(folder, cache: str) -> Engine:
    placement = decide_placement(weight_params=1, cache=cache)
    config = ModelConfig(name="tiny", spec=inspect_model(folder), placement=placement, weight_bytes=1)
    engine = Engine(ModelPool([config]))
    engine.start()
    assert engine.wait_ready(60)
    return engine


def _attention_calls(engine: Engine) -> list[int]:
    """Counts the last block's attention computations (its processor runs only when not predicted)."""
    calls: list[int] = []
    attention = engine.pool.get().pipe.transformer.single_transformer_blocks[-1].attn
    real = attention.processor

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    attention.processor = counting
    return calls


def test_taylorseer_skips_attention_work_and_stays_deterministic(tiny_klein):
    plain, cached = _engine(tiny_klein, "off"), _engine(tiny_klein, "taylorseer:3")
    try:
        plain_calls, cached_calls = _attention_calls(plain), _attention_calls(cached)
        request = job(prompt="a lighthouse", size=64, seeds=(5,), steps=12)
        reference = np.asarray(plain.submit(request).future.result(120).images[0], dtype=np.int16)
        first = np.asarray(cached.submit(request).future.result(120).images[0], dtype=np.int16)
        again = np.asarray(cached.submit(request).future.result(120).images[0], dtype=np.int16)
        assert len(plain_calls) == 12
        assert len(cached_calls) < 2 * 12  # the two cached runs predicted some steps instead of computing them
        assert np.array_equal(first, again)  # the cache's state is reset between requests
        assert first.shape == reference.shape == (64, 64, 3)
    finally:
        plain.stop(10)
        cached.stop(10)


def test_a_cached_dev_model_generates(tiny_dev):
    """dev's pipeline opens no cache context of its own: the runner opens one (else: "No cache context is set")."""
    engine = _engine(tiny_dev, "taylorseer:2")
    try:
        image = engine.submit(job(prompt="a lighthouse", size=48, seeds=(1,), steps=6)).future.result(120).images[0]
        assert image.size == (48, 48)
    finally:
        engine.stop(10)
