"""Load a FLUX.2 diffusers folder onto its device, as decided by `placement`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from .compilation import compile_transformer, warm_up
from .internals import Flux2Pipe
from .placement import Placement
from .quantization import pipeline_quantization_config
from .reference_cache import install as install_reference_processors
from .step_cache import apply_cache
from .weights import ModelSpec

log = logging.getLogger("flux2.loader")


@dataclass
class LoadedModel:
    """A pipeline in memory, with what it is and where it runs."""

    spec: ModelSpec
    placement: Placement
    pipe: Flux2Pipe  # a diffusers Flux2Pipeline or Flux2KleinPipeline


def quiet_progress_bars() -> None:
    """Turn off diffusers' and transformers' tqdm bars (loading, saving): a server logs lines, not bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_model(spec: ModelSpec, placement: Placement) -> LoadedModel:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        spec.path, dtype=placement.dtype, quantization_config=pipeline_quantization_config(placement.quantization)
    )
    if type(pipe).__name__ != spec.pipeline_class:
        raise TypeError(f"{spec.path} loaded as {type(pipe).__name__}, expected {spec.pipeline_class}")
    if placement.device == "cuda":
        if placement.offload == "model":
            pipe.enable_model_cpu_offload()
        elif placement.offload == "sequential":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    apply_cache(pipe.transformer, placement.cache)
    if placement.reference_cache:
        install_reference_processors(pipe.transformer)
    if placement.compile:
        compile_transformer(pipe)
        warm_up(pipe)
    log.info(
        "model: %s loaded as %s (%s, defaults: %d steps, guidance %.1f)",
        spec.path,
        spec.pipeline_class,
        "distilled" if spec.is_distilled else "base" if spec.family == "klein" else "guidance-distilled",
        spec.defaults.steps,
        spec.defaults.guidance_scale,
    )
    # The class was checked above: a FLUX.2 pipeline, whatever `from_pretrained` is typed to return.
    return LoadedModel(spec=spec, placement=placement, pipe=cast(Flux2Pipe, pipe))
