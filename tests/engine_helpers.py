"""Building engines on tiny weights for in-process tests."""

from __future__ import annotations

from pipeline.engine import Engine
from pipeline.jobs import GenerationJob
from pipeline.placement import decide_placement
from pipeline.pool import ModelConfig, ModelPool
from pipeline.weights import inspect_model


def model_config(folder, name="tiny") -> ModelConfig:
    return ModelConfig(
        name=name, spec=inspect_model(folder), placement=decide_placement(weight_params=1), weight_bytes=1
    )


def make_engine(folder, **options) -> Engine:
    engine = Engine(ModelPool([model_config(folder)]), **options)
    engine.start()
    assert engine.wait_ready(60)
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
