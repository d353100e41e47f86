"""The engine in-process on tiny weights: batching, equivalence, queue bound, cancellation, OOM recovery, cache."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from engine_helpers import job, make_engine, model_config

import pipeline.engine as engine_module
from pipeline.engine import Engine
from pipeline.jobs import JobCancelled, OutOfDeviceMemory, QueueFull
from pipeline.pool import ModelPool


def _array(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def engine(tiny_klein):
    reports = []
    engine = make_engine(tiny_klein, max_batch_images=4, batch_window=0.3, on_batch=reports.append)
    engine.reports = reports
    yield engine
    engine.stop(10)


def test_compatible_jobs_share_a_batch_and_match_their_solo_images(engine):
    handles = [engine.submit(job(prompt=f"prompt {i}", seeds=(i,))) for i in range(4)]
    batched = [h.future.result(60) for h in handles]
    assert [r.batch_images for r in batched] == [4, 4, 4, 4]
    assert engine.reports[-1].images == 4
    for i, result in enumerate(batched):
        alone = engine.submit(job(prompt=f"prompt {i}", seeds=(i,))).future.result(60)
        assert alone.batch_images == 1
        # Same prompt and seed: the same image alone or in a batch (fp32 batch math: at most 2/255 apart).
        assert np.abs(_array(result.images[0]) - _array(alone.images[0])).max() <= 2


def test_incompatible_jobs_run_apart(engine):
    a = engine.submit(job(size=64))
    b = engine.submit(job(size=96))
    assert a.future.result(60).batch_images == 1
    assert b.future.result(60).batch_images == 1
    assert b.future.result().images[0].size == (96, 96)


def test_queue_is_bounded(tiny_klein):
    engine = make_engine(tiny_klein, max_queue_images=2, max_batch_images=1, batch_window=0)
    try:
        running = engine.submit(job(steps=400, size=128))
        while engine.running_images == 0:
            time.sleep(0.01)
        queued = engine.submit(job(seeds=(1, 2)))
        with pytest.raises(QueueFull) as caught:
            engine.submit(job())
        assert caught.value.retry_after >= 1
        running.cancel("test")
        queued.cancel("test")
        with pytest.raises(JobCancelled):
            queued.future.result(30)
        assert engine.submit(job()).future.result(60).images  # recovered
    finally:
        engine.stop(10)


def test_cancel_stops_at_the_next_step_and_keeps_others(engine):
    long = engine.submit(job(steps=400, size=128))
    while long.steps_run < 2:
        time.sleep(0.01)
    long.cancel("client disconnected")
    with pytest.raises(JobCancelled, match="client disconnected"):
        long.future.result(30)
    assert 2 <= long.steps_run < 400
    assert engine.reports[-1].outcome == "cancelled"
    started = time.monotonic()
    assert engine.submit(job()).future.result(60).images
    assert time.monotonic() - started < 10


def test_cancelling_one_job_of_a_batch_keeps_the_others(engine):
    handles = [engine.submit(job(prompt=f"p{i}", seeds=(i,), steps=30)) for i in range(3)]
    handles[1].cancel("gone")
    assert handles[0].future.result(60).images and handles[2].future.result(60).images
    with pytest.raises(JobCancelled):
        handles[1].future.result(60)


def test_out_of_memory_splits_the_batch_then_fails_only_what_cannot_fit(engine, monkeypatch):
    real = engine_module.run_batch
    sizes = []

    def oom_above_one(model, slices, cache, on_step=None, on_preview=None, **options):
        images = sum(len(s.seeds) for s in slices)
        sizes.append(images)
        if images > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, slices, cache, on_step, on_preview, **options)

    monkeypatch.setattr(engine_module, "run_batch", oom_above_one)
    result = engine.submit(job(seeds=(5, 6, 7))).future.result(60)
    assert result.seeds == (5, 6, 7) and len(result.images) == 3
    assert sizes[:3] == [3, 1, 2]  # 3 -> 1 + 2 -> 1 + 1 + 1
    alone = engine.submit(job(seeds=(7,)))  # each image equals the one made alone with its seed
    assert np.abs(_array(result.images[2]) - _array(alone.future.result(60).images[0])).max() <= 2

    def always_oom(model, slices, cache, on_step=None, on_preview=None, **options):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine_module, "run_batch", always_oom)
    with pytest.raises(OutOfDeviceMemory):
        engine.submit(job(seeds=(1, 2))).future.result(60)
    monkeypatch.setattr(engine_module, "run_batch", real)
    assert engine.submit(job()).future.result(60).images  # the next request succeeds


def test_out_of_memory_drops_the_kept_reference_sets_and_retries_once(tiny_klein, monkeypatch):
    """With the reference cache on, sets kept from earlier edits hold device memory: a batch that runs out of it is
    retried once with the store emptied (not split, not failed); if it runs out again, it is split or fails as
    usual, without looping on a store it refills itself."""
    import weakref
    from dataclasses import replace

    from PIL import Image

    from pipeline.placement import decide_placement
    from pipeline.pool import ModelConfig

    config = model_config(tiny_klein)
    config = ModelConfig(
        name=config.name,
        spec=config.spec,
        placement=decide_placement(weight_params=1, reference_cache="on"),
        weight_bytes=1,
    )
    engine = Engine(ModelPool([config]), max_batch_images=1)
    engine.start()
    assert engine.wait_ready(60)
    try:
        store = engine.pool.get(None).reference_store
        first = job(references=(Image.new("RGB", (64, 64), (200, 10, 10)),))
        assert engine.submit(first).future.result(60).images and len(store) == 1
        real = engine_module.run_batch
        attempts = []

        held: list[weakref.ref] = []

        def oom_while_the_store_holds_sets(model, slices, cache, *args, **options):
            attempts.append(len(model.reference_store))
            if len(model.reference_store):
                activations = torch.ones(1024)  # what the failed call held: released before the retry
                held.append(weakref.ref(activations))
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            assert all(ref() is None for ref in held)
            return real(model, slices, cache, *args, **options)

        monkeypatch.setattr(engine_module, "run_batch", oom_while_the_store_holds_sets)
        second = replace(first, references=(Image.new("RGB", (64, 64), (10, 200, 10)),))
        assert engine.submit(second).future.result(60).images
        assert attempts == [1, 0] and len(store) == 1  # the retry kept the new set only

        def always_oom(model, slices, cache, *args, **options):
            attempts.append(len(model.reference_store))
            kv = torch.zeros(4)
            model.reference_store.put(("filled", "by the batch"), {"x": (kv, kv)})  # as a prefill before an OOM
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        attempts.clear()
        monkeypatch.setattr(engine_module, "run_batch", always_oom)
        with pytest.raises(OutOfDeviceMemory):
            engine.submit(first).future.result(60)
        assert attempts == [1, 0]  # one retry without the store, then the usual failure
        monkeypatch.setattr(engine_module, "run_batch", real)
        assert engine.submit(second).future.result(60).images  # and the engine goes on
    finally:
        engine.stop(10)


def test_prompt_embeddings_are_cached(engine):
    engine.submit(job(prompt="a fresh prompt")).future.result(60)
    misses = engine.prompt_cache.misses
    engine.submit(job(prompt="a fresh prompt", seeds=(9,))).future.result(60)
    assert engine.prompt_cache.misses == misses
    assert engine.prompt_cache.hits >= 1


def test_models_load_on_first_use_and_are_evicted_lru(tiny_klein, tiny_dev):
    """Models load on first use; beyond max_loaded the least recently used is evicted, and freed: nothing else (the
    worker's frame, which loaded the default model at start and lives as long as the engine) keeps its weights."""
    import weakref

    pool = ModelPool([model_config(tiny_klein, "klein"), model_config(tiny_dev, "dev")], max_loaded=1)
    engine = Engine(pool)
    engine.start()
    try:
        assert engine.wait_ready(60)
        assert pool.loaded == ["klein"]
        gone = weakref.ref(pool.loaded_models()[0].pipe.transformer)
        assert engine.submit(job(model="dev")).future.result(60).images
        assert pool.loaded == ["dev"]
        assert gone() is None
        assert engine.submit(job(model="klein")).future.result(60).images
        assert pool.loaded == ["klein"]
    finally:
        engine.stop(10)


def test_a_loaded_model_is_frozen_out_of_the_collectors_walks(tiny_klein):
    """After a load the heap is collected and frozen: the model's objects are out of every generation the cyclic
    collector walks, so a full collection inside a request walks only what requests made."""
    import gc

    engine = make_engine(tiny_klein)
    try:
        assert engine.wait_ready(60)
        pipe = engine.pool.loaded_models()[0].pipe
        assert gc.get_freeze_count() > 0
        tracked = {id(obj) for obj in gc.get_objects()}
        assert id(pipe) not in tracked and id(pipe.transformer) not in tracked
        assert gc.is_tracked(pipe.transformer)  # tracked, but frozen
    finally:
        engine.stop(10)


def test_releasing_device_memory_collects_cycles_that_were_frozen():
    """Frozen objects in a reference cycle are collected only after a thaw: an evicted model's cycles (hooks that
    refer back to their modules, say) must not stay frozen for the life of the server."""
    import gc
    import weakref

    from pipeline.pool import release_device_memory

    class Node:
        pass

    node = Node()
    node.itself = node
    gone = weakref.ref(node)
    gc.freeze()
    del node
    gc.collect()
    assert gone() is not None  # frozen: the collector does not walk it
    release_device_memory()
    assert gone() is None
    assert gc.get_freeze_count() > 0  # what survived is frozen again


def test_stop_finishes_queued_work_within_the_timeout(tiny_klein):
    engine = make_engine(tiny_klein)
    handle = engine.submit(job(steps=3))
    engine.stop(30)
    assert handle.future.result(1).images


def test_stop_cancels_what_outlasts_the_timeout(tiny_klein):
    engine = make_engine(tiny_klein)
    handle = engine.submit(job(steps=2000, size=128))
    while handle.steps_run < 1:
        time.sleep(0.01)
    stopper = threading.Thread(target=engine.stop, args=(0.5,))
    stopper.start()
    stopper.join(30)
    with pytest.raises(JobCancelled, match="shutting down"):
        handle.future.result(1)
    assert handle.steps_run < 2000


def test_long_jobs_log_their_progress_at_a_limited_rate(tiny_klein, caplog):
    import logging

    engine = make_engine(tiny_klein, progress_log_seconds=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="flux2.engine"):
            engine.submit(job(steps=5, request_id="req-7")).future.result(60)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
        assert lines[0].startswith("step 1/5, 1 images") and lines[-1].startswith("step 5/5")
    finally:
        engine.stop(10)
    quiet = make_engine(tiny_klein, progress_log_seconds=3600)
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flux2.engine"):
            quiet.submit(job(steps=5)).future.result(60)
        assert not [r for r in caplog.records if r.getMessage().startswith("step ")]
    finally:
        quiet.stop(10)


def _count_decodes(engine, monkeypatch) -> list[int]:
    """Rows decoded by the VAE, per call, on the engine's (only) model."""
    decoded: list[int] = []
    vae = engine.pool.get().pipe.vae
    real = vae.decode

    def counting(latents, *args, **kwargs):
        decoded.append(latents.shape[0])
        return real(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", counting)
    return decoded


def test_a_cancelled_batch_is_not_decoded(tiny_klein, monkeypatch):
    engine = make_engine(tiny_klein, max_batch_images=1, batch_window=0)
    try:
        decoded = _count_decodes(engine, monkeypatch)
        handle = engine.submit(job(steps=400, size=256))
        while handle.steps_run < 2:
            time.sleep(0.01)
        handle.cancel("the client disconnected")
        with pytest.raises(JobCancelled):
            handle.future.result(60)
        assert handle.steps_run < 400
        assert decoded == []  # diffusers would have decoded the half-denoised latents
        assert engine.submit(job()).future.result(60).images[0].size == (64, 64)
        assert decoded == [1]
    finally:
        engine.stop(10)


def test_only_the_wanted_jobs_of_a_batch_are_decoded(tiny_klein, monkeypatch):
    engine = make_engine(tiny_klein, max_batch_images=4, batch_window=0.5)
    try:
        decoded = _count_decodes(engine, monkeypatch)
        kept = engine.submit(job(prompt="kept", seeds=(1, 2), steps=200, size=128))
        dropped = engine.submit(job(prompt="dropped", seeds=(3,), steps=200, size=128))
        while kept.steps_run < 2:
            time.sleep(0.01)
        dropped.cancel("the client disconnected")
        assert len(kept.future.result(120).images) == 2
        with pytest.raises(JobCancelled):
            dropped.future.result(60)
        assert decoded == [2]  # the cancelled job's row was not decoded
    finally:
        engine.stop(10)


def test_a_lone_job_starts_at_once_and_arriving_requests_are_waited_for(tiny_klein):
    engine = make_engine(tiny_klein, max_batch_images=4, batch_window=1.0)
    try:
        alone = engine.submit(job())
        alone.future.result(60)
        assert alone.queue_seconds < 0.5  # no request on its way: the 1 s window is not waited
        with engine.arriving():  # the server is reading a second request (released once submitted)
            first = engine.submit(job(prompt="first"))
            time.sleep(0.2)
            second = engine.submit(job(prompt="second"))
        assert first.future.result(60).batch_images == 2 == second.future.result(60).batch_images
    finally:
        engine.stop(10)


def test_a_base_klein_with_guidance_is_plain_diffusers_cfg_image_encoded_or_cached(tiny_klein, tmp_path):
    """klein base (not distilled) with guidance > 1 runs classifier-free guidance against the empty prompt: the
    engine hands the pipeline both prompts' embeddings (new ones from the device, then from the prompt cache) and
    gets plain diffusers' image for the same prompt and seed, both times."""
    import json
    import shutil
    from dataclasses import replace

    from diffusers import DiffusionPipeline

    folder = tmp_path / "base-klein"
    shutil.copytree(tiny_klein, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a lantern in fog", height=64, width=64, num_inference_steps=2, guidance_scale=4.0)
    theirs = _array(pipe(**call, generator=torch.Generator().manual_seed(5)).images[0])
    unguided = _array(pipe(**{**call, "guidance_scale": 1.0}, generator=torch.Generator().manual_seed(5)).images[0])
    assert np.abs(theirs - unguided).max() > 8  # the guidance changes the image: the check below can fail
    engine = make_engine(folder, batch_window=0)
    try:
        assert not engine.pool.get().spec.is_distilled
        for _ in range(2):  # encoded, then both prompts from the cache
            misses = engine.prompt_cache.misses
            guided = replace(job("a lantern in fog", seeds=(5,)), guidance_scale=4.0)
            image = engine.submit(guided).future.result(60).images[0]
            assert np.abs(_array(image) - theirs).max() <= 1
        assert engine.prompt_cache.misses == misses
    finally:
        engine.stop(10)


def test_the_noise_is_drawn_while_the_text_encoder_runs(engine, monkeypatch):
    """The starting noise (~13 ms of CPU for a 1024² image) is drawn on another thread during the text encode,
    not after it: the encode waits (at most 10 s) for the draw to finish, which a draw after the encode never
    does. The image is the one its seed makes."""
    import pipeline.runner as runner_module

    drawn = threading.Event()
    threads = []
    real_noise = runner_module.initial_noise

    def noise(*args):
        threads.append(threading.current_thread().name)
        drawn.set()
        return real_noise(*args)

    pipe = engine.pool.get(None).pipe
    real_encode = pipe.encode_prompt
    waited = []

    def encode_prompt(*args, **kwargs):
        waited.append(drawn.wait(10))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(runner_module, "initial_noise", noise)
    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    drawn_job = job(prompt="drawn while encoding", seeds=(3,))
    image = engine.submit(drawn_job).future.result(60).images[0]
    assert waited[0] is True  # the encode of the new prompt saw the noise drawn meanwhile (then the pipeline's
    # own call, which only lays out the embeddings' ids)
    assert len(threads) == 1 and threads[0].startswith("flux2-noise")
    monkeypatch.undo()
    again = engine.submit(drawn_job).future.result(60).images[0]  # the prompt cached, the noise drawn unwatched
    assert np.array_equal(_array(image), _array(again))
