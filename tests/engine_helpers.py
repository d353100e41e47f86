"""Building engines, jobs and transformer inputs on tiny weights for in-process tests."""

from __future__ import annotations

import torch

from pipeline.engine import Engine
from pipeline.jobs import GenerationJob
from pipeline.placement import decide_placement
from pipeline.pool import ModelConfig, ModelPool
from pipeline.weights import inspect_model


def failing_on_empty_inputs(module: torch.nn.Module) -> torch.nn.Module:
    """`module`'s linear layers made to fail on an empty input as torchao's fp8 (dynamic activation) layers do: each
    first takes its input's largest magnitude per feature, which on an empty input is torch's "Expected reduction
    dim ... non-zero size" (an IndexError)."""

    def failing(forward):
        def scaled(input):
            input.reshape(-1, input.shape[-1]).abs().amax(dim=0)
            return forward(input)

        return scaled

    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.forward = failing(layer.forward)
    return module


def model_config(folder, name="tiny", placement=None) -> ModelConfig:
    placement = placement if placement is not None else decide_placement(weight_params=1)
    return ModelConfig(name=name, spec=inspect_model(folder), placement=placement, weight_bytes=1)


def make_engine(folder, placement=None, **options) -> Engine:
    """A started engine serving `folder` (placed by `placement`, default: decide_placement's), ready."""
    engine = Engine(ModelPool([model_config(folder, placement=placement)]), **options)
    engine.start()
    assert engine.wait_ready(120), engine.load_error
    return engine


def job(prompt="a cat", size=64, seeds=(1,), steps=2, **fields) -> GenerationJob:
    return GenerationJob(
        prompt=prompt,
        width=size,
        height=size,
        run_width=size,
        run_height=size,
        seeds=tuple(seeds),
        steps=steps,
        guidance_scale=1.0,
        **fields,
    )


def transformer_inputs(transformer, batch: int = 1) -> dict:
    """Seeded inputs for one call of a tiny FLUX.2 transformer: `batch` rows of 16 image and 8 text tokens."""
    torch.manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, 16, transformer.config.in_channels),
        encoder_hidden_states=torch.randn(batch, 8, transformer.config.joint_attention_dim),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.zeros(batch, 16, 4),
        txt_ids=torch.zeros(batch, 8, 4),
        return_dict=False,
    )


def served_images(folder, jobs, prepare=None) -> list[bytes]:
    """The pixels of `jobs` (run one after another) from a fresh engine serving `folder`; `prepare(model)` first
    changes the loaded model (installs graphs, warms up...)."""
    engine = make_engine(folder)
    try:
        model = engine.pool.get()
        if prepare is not None:
            prepare(model)
        results = [engine.submit(one).future.result(60) for one in jobs]
        return [image.tobytes() for result in results for image in result.images]
    finally:
        engine.stop()
