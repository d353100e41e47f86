"""Streamed components run their first passes at load (pipeline/stream_warm_up.py): diffusers' group offloading
with streams learns the order its groups run in from the first forward pass, copying each group in the foreground
meanwhile, and only prefetches after it. A CPU has no streams: diffusers' stream backend, pinning and the copies
are faked here (tests/fake_streams.py), the hooks' bookkeeping runs for real."""

from __future__ import annotations

import logging

import pytest
import torch
from fake_streams import fake_streams
from test_encoder_depth import deep_encoder

from pipeline.architectures import build_pipeline, get_architecture, model_spec
from pipeline.loader import LoadedModel
from pipeline.placement import Placement
from pipeline.pool import ModelConfig, ModelPool
from pipeline.stream_warm_up import pending, warm_up_streams


def _placement(offload: str) -> Placement:
    return Placement(device="cpu", dtype=torch.float32, offload=offload, reasons=())  # type: ignore[arg-type]


def _streamed_model(monkeypatch) -> LoadedModel:
    """Tiny klein with Qwen3-4B's 36 encoder layers (FLUX.2 reads up to state 27), its text encoder streamed weight
    by weight and its transformer block by block, with (faked) streams, as `stream_blocks` does on a GPU."""
    import diffusers.hooks.group_offloading as group_offloading
    import diffusers.pipelines.flux2.pipeline_flux2_klein as klein_module

    fake_streams(monkeypatch)
    monkeypatch.setattr(group_offloading, "send_to_device", lambda value, *args, **kwargs: value)
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", lambda self: None)
    monkeypatch.setattr(group_offloading.ModuleGroup, "offload_", lambda self: None)
    monkeypatch.setattr(group_offloading, "_get_group_onload_device", lambda module: torch.device("cpu"))
    monkeypatch.setattr(klein_module, "get_module_execution_device", lambda module: torch.device("cpu"))
    arch = get_architecture("tiny")
    pipe = build_pipeline(arch, "cpu", torch.float32)
    pipe.text_encoder = deep_encoder(pipe.text_encoder, 36)
    pipe.set_progress_bar_config(disable=True)
    cuda = torch.device("cuda")
    group_offloading.apply_group_offloading(
        pipe.text_encoder, onload_device=cuda, offload_type="leaf_level", use_stream=True, low_cpu_mem_usage=False
    )
    group_offloading.apply_group_offloading(
        pipe.transformer, onload_device=cuda, offload_type="block_level", num_blocks_per_group=1, use_stream=True,
        low_cpu_mem_usage=False,
    )  # fmt: skip
    return LoadedModel(model_spec(arch), _placement("block-streaming"), pipe)


def _traced(module: torch.nn.Module) -> bool:
    """Whether `module`'s offloading group ran in the tracing pass (diffusers then switches it to non-blocking
    copies; a group the pass never reached keeps the blocking ones it was given for that pass)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    return module._diffusers_hook.get_hook(_GROUP_OFFLOADING).group.non_blocking


def test_a_streamed_model_runs_its_tracing_pass_at_load_through_the_requests_path(monkeypatch, caplog):
    """The pool loads a streamed model and, before it serves anything, runs two one-step images through the runner:
    after that no component has its prefetch order left to trace, the encoder's traced order is the one requests
    run (its layers up to the deepest state FLUX.2 reads, 27 of 36, not the whole encoder), every transformer block
    is in the chain, and the model's own prompt cache is untouched (the warm-up has its own)."""
    model = _streamed_model(monkeypatch)
    assert pending(model) == ["text_encoder", "transformer"]
    layers = model.pipe.text_encoder.get_decoder().layers
    runs: list[int] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: runs.append(1))
    config = ModelConfig(name="tiny", spec=model.spec, placement=model.placement, weight_bytes=0)
    pool = ModelPool([config], load=lambda spec, placement, adapters: model)
    with caplog.at_level(logging.INFO, logger="flux2.loader"):
        assert pool.get() is model
    assert pending(model) == []
    assert len(runs) == 2 * 27  # two passes, each cut at the deepest layer read
    for index, layer in enumerate(layers):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(_traced(m) is (index < 27) for m in linears), index
    blocks = [*model.pipe.transformer.transformer_blocks, *model.pipe.transformer.single_transformer_blocks]
    assert all(_traced(block) for block in blocks)
    line = next(r.getMessage() for r in caplog.records if "warmed up at load" in r.getMessage())
    assert "streamed text_encoder, transformer" in line and "2 one-step 1024x1024 images" in line
    assert warm_up_streams(model) == []  # traced: nothing left to warm up


def test_a_model_without_prefetching_streams_is_not_warmed_up(monkeypatch):
    """Resident (or swapped, or CPU-streamed without streams) components have nothing to trace: loading them runs
    no image."""
    import pipeline.stream_warm_up as stream_warm_up

    arch = get_architecture("tiny")
    model = LoadedModel(model_spec(arch), _placement("resident"), build_pipeline(arch, "cpu", torch.float32))
    monkeypatch.setattr(stream_warm_up, "run_batch", lambda *args, **kwargs: pytest.fail("nothing to warm up"))
    assert pending(model) == [] and warm_up_streams(model) == []


def test_a_failed_warm_up_is_logged_and_the_model_still_loads(monkeypatch, caplog):
    """A warm-up that runs out of memory (or fails otherwise) must not cost the model its load."""
    import pipeline.stream_warm_up as stream_warm_up

    model = _streamed_model(monkeypatch)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stream_warm_up, "run_batch", out_of_memory)
    config = ModelConfig(name="tiny", spec=model.spec, placement=model.placement, weight_bytes=0)
    with caplog.at_level(logging.WARNING, logger="flux2.loader"):
        assert ModelPool([config], load=lambda spec, placement, adapters: model).get() is model
    assert any("warm-up of streamed" in r.getMessage() and "OutOfMemoryError" in r.getMessage() for r in caplog.records)
