"""Load a FLUX.2 diffusers folder onto its device, as decided by `placement`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from .adapters import Adapters, LoadedAdapters
from .attention import use_attention
from .compilation import WARM_UP_SIDE, compile_pipeline, uncompile_pipeline, warm_up
from .encoder_depth import read_layers
from .encoder_graphs import install as install_encoder_graphs
from .encoder_graphs import uninstall as uninstall_encoder_graphs
from .gguf_weights import load_gguf_transformer
from .internals import Flux2Pipe, pin_placement
from .offload_plan import Stage
from .placement import Placement
from .quantization import pipeline_quantization_config, tolerate_empty_inputs_in
from .reference_cache import ReferenceStore
from .reference_cache import install as install_reference_processors
from .step_cache import apply_cache
from .swapping import Swapper, check_swappable, stream_blocks
from .transformer_graphs import install as install_transformer_graphs
from .transformer_graphs import uninstall as uninstall_transformer_graphs
from .weights import ModelSpec, WeightsError

log = logging.getLogger("flux2.loader")


@dataclass
class LoadedModel:
    """A pipeline in memory, with what it is and where it runs."""

    spec: ModelSpec
    placement: Placement
    pipe: Flux2Pipe  # a diffusers Flux2Pipeline or Flux2KleinPipeline
    swapper: Swapper | None = None  # moves the swapped components at the runner's stage boundaries
    adapters: LoadedAdapters | None = None  # its LoRA adapters, when it has any (pipeline/adapters.py)
    # Recent reference sets' K/V, kept across requests (with the reference cache on; pipeline/reference_cache.py).
    reference_store: ReferenceStore | None = None

    def __post_init__(self) -> None:
        pin_placement(self.pipe)  # placed by now: where it runs is recorded once, not asked of diffusers per batch

    def enter(self, stage: Stage) -> None:
        """The runner's stage boundary (encode, denoise, decode): the offload plan's moves, if any."""
        if self.swapper is not None:
            self.swapper.enter(stage)


def quiet_progress_bars() -> None:
    """Turn off diffusers' and transformers' tqdm bars (loading, saving): a server logs lines, not bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_model(spec: ModelSpec, placement: Placement, adapters: Adapters | None = None) -> LoadedModel:
    """The pipeline from `spec`'s folder with `adapters` loaded, placed as `placement` says (an offload plan moves or
    streams the adapters' layers with the transformer's), then compiled and warmed up when the placement says so
    (the compiled blocks traced with the LoRA layers in them, `LoadedAdapters` switching them by scale so that one
    graph serves every choice)."""
    from diffusers import DiffusionPipeline

    components: dict[str, Any] = {}
    if placement.transformer_file is not None:
        components["transformer"] = load_gguf_transformer(placement.transformer_file, spec.path, placement.dtype)
    pipe = DiffusionPipeline.from_pretrained(
        spec.path,
        dtype=placement.dtype,
        quantization_config=pipeline_quantization_config(placement.quantization),
        **components,
    )
    if type(pipe).__name__ != spec.pipeline_class:
        raise TypeError(f"{spec.path} loaded as {type(pipe).__name__}, expected {spec.pipeline_class}")
    _check_all_weights_loaded(pipe, spec.path)
    tolerate_empty_inputs_in(pipe, placement.quantization)
    # Before placing: an offload plan then moves or streams the adapters' layers with the rest of the transformer.
    loaded_adapters = LoadedAdapters(cast(Flux2Pipe, pipe), spec.path.name, adapters) if adapters else None
    swapper = None
    if placement.plan is not None and placement.plan.name != "resident":
        swapper = apply_plan(pipe, placement)
    elif placement.device == "cuda":
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
    use_attention(pipe.transformer, placement.attention)
    if loaded_adapters is not None and placement.compile:
        loaded_adapters.switch_by_scale(placement.device)  # one compiled graph for every choice of adapters
    placement = compile_and_warm_up(pipe, placement)
    log.info(
        "model: %s loaded as %s (%s, defaults: %d steps, guidance %.1f)",
        spec.path,
        spec.pipeline_class,
        "distilled" if spec.is_distilled else "base" if spec.family == "klein" else "guidance-distilled",
        spec.defaults.steps,
        spec.defaults.guidance_scale,
    )
    # The class was checked above: a FLUX.2 pipeline, whatever `from_pretrained` is typed to return.
    return LoadedModel(
        spec=spec,
        placement=placement,
        pipe=cast(Flux2Pipe, pipe),
        swapper=swapper,
        adapters=loaded_adapters,
        reference_store=ReferenceStore(placement.reference_memory) if placement.reference_cache else None,
    )


def _check_all_weights_loaded(pipe: Any, folder: Path) -> None:
    """A WeightsError when a component's config names weights its files lack: diffusers leaves them unloaded (on
    the meta device) with a log line, and every request then failed."""
    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        missing = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
        if missing:
            raise WeightsError(
                f"{folder}: the {component}'s files lack {len(missing)} of the weights its config names (first: "
                f"{missing[0]}): the folder's weights do not match their configs"
            )


def compile_and_warm_up(pipe: Any, placement: Placement, side: int = WARM_UP_SIDE) -> Placement:
    """After placing, as `placement` says: the text encoder's and the transformer's CUDA graphs installed (the
    warm-up captures them), the transformer's blocks and the VAE decoder's norms compiled, and the warm-up at
    `side`x`side`. The placement as it came out: a compile that fails (a compiler missing or broken, an Inductor
    bug on this card: torch.compile builds at the warm-up) is undone, logged, and the model served eager."""
    if placement.encoder_graphs:
        install_encoder_graphs(pipe.text_encoder)
    if placement.transformer_graphs:
        install_transformer_graphs(pipe.transformer)
    if not placement.compile:
        return placement
    try:
        compile_pipeline(pipe)
        warm_up(pipe, side)
    except Exception as exc:  # whatever the compile raised, the eager model still serves
        why = f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"  # as cuda_graphs words a failure
        log.error("model: --compile failed at the warm-up (%s); serving uncompiled, without CUDA graphs", why)
        uninstall_encoder_graphs(pipe.text_encoder)
        uninstall_transformer_graphs(pipe.transformer)
        uncompile_pipeline(pipe)
        return replace(
            placement,
            compile=False,
            encoder_graphs=False,
            transformer_graphs=False,
            reasons=(*placement.reasons, f"compile: failed at load ({why}); off"),
        )
    return placement


def apply_plan(pipe: Any, placement: Placement) -> Swapper:
    """Streamed components get diffusers' group offloading, the rest of the fixed ones go to the device, and the
    swapped ones to the swapper (which keeps their weights in pinned host memory until a stage needs them)."""
    plan = placement.plan
    assert plan is not None
    device = placement.device
    for part in plan.components:
        if part.where == "streamed":
            encoder = part.component == "text_encoder"
            read = read_layers(pipe) if encoder else None
            stream_blocks(
                getattr(pipe, part.component),
                device,
                text_encoder=encoder,
                resident_blocks=part.resident_blocks,
                reach=max(read) if read else None,  # the encoder's resident layers among those it runs
            )
        elif part.where == "device":
            getattr(pipe, part.component).to(device)
        elif part.where == "swapped":
            check_swappable(getattr(pipe, part.component), part.component)
    swapper = Swapper(pipe, plan, device)
    log.info(
        "offload: %s carried out (swapped: %s; streamed: %s)",
        plan.name,
        plan.swapped or "none",
        plan.streamed or "none",
    )
    return swapper
