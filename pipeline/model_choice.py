"""Which models to serve: what was asked for (`ModelChoice`: --model values, a name, a weights folder, the
placement) resolved into placed, named `ModelConfig`s, and which of them are tiny random-weight test models.

Without a --model the folder found in the weights folder is served, else tiny test weights are built there."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapters import AdapterError, Adapters, adapters_from_options
from .component_sizes import MeasuredSizes, measure_folder
from .gguf_weights import GGUFError, check_gguf, read_gguf
from .placement import PlacementError, count_weight_params, decide_placement
from .pool import ModelConfig
from .quantization import QuantizationError, parse_quantization
from .tiny_weights import build_tiny_weights
from .weights import TINY_DEFAULT_DIRNAME, WeightsError, find_local_weights, inspect_model, resolve_weights

# The start-up log's logger since before these lines moved out of the command line.
log = logging.getLogger("flux2")

# Below this many parameters a model can only be a test model (real FLUX.2 klein 4B has ~8 billion with its encoder).
TEST_MODEL_PARAMS = 50_000_000

TINY_WARNING = """
************************************************************************************************
  Serving TINY RANDOM-WEIGHT test model: {path}
  It exercises the whole API, but its images are NOISE. To serve real FLUX.2 weights:
    flux2-local serve --model black-forest-labs/FLUX.2-klein-4B        (hub id, needs internet once)
    flux2-local serve --model /models/FLUX.2-dev                       (a local diffusers folder)
  or put a diffusers folder under {weights_dir}/ and start again without --model.
************************************************************************************************"""


class ModelChoiceError(Exception):
    """A model asked for cannot be served: not found, not FLUX.2, not placeable, or its name is taken."""


@dataclass(frozen=True)
class ModelChoice:
    """The models asked for and where they run; the command line's defaults come from here."""

    sources: tuple[str, ...] = ()  # "PATH_OR_ID" or "NAME=PATH_OR_ID"; none: the folder in weights_dir
    first_name: str | None = None  # the id of the first model (default: its folder name or hub id)
    weights_dir: Path = Path("weights")  # searched when no source is given; tiny weights are built here
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"
    # Regional compilation of the transformer (torch.compile), warmed up at load; None: auto (on CUDA when
    # everything is resident and nothing else changes the transformer: placement._compile_choice).
    compile: bool | None = None
    cache: str = "off"  # step caching: off or taylorseer[:INTERVAL]
    quantize: str = "none"  # or COMPONENT=SCHEME,...: quantized weights (pipeline/quantization.py)
    reference_cache: str = "off"  # edits: "on" computes the references' K/V once per batch (reference_cache.py)
    reference_memory: str = "auto"  # GiB of reference K/V kept across requests with the reference cache, or auto
    attention: str = "sdpa"  # the transformer's attention kernel: sdpa (torch's pick), cudnn, flash, ... (attention.py)
    max_loaded: int = 0  # models kept in memory at once (0: as many as fit)
    transformer_gguf: Path | None = None  # a community GGUF transformer file for the (first) model
    prompt_cache: bool = True  # whether a prompt-embedding cache exists (the offload planner's notes)
    lora: tuple[str, ...] = ()  # "NAME=PATH[:SCALE]": LoRA adapters of the first model (pipeline/adapters.py)
    fuse_lora: str | None = None  # the name of one of them to fuse into the weights at load (always on)


@dataclass(frozen=True)
class ServedModels:
    configs: list[ModelConfig]  # the first is the default model
    test_models: tuple[str, ...]  # the names of those with tiny random test weights: their images are noise


def resolve_models(choice: ModelChoice) -> ServedModels:
    """One ModelConfig per source (or the default weights), each inspected, placed and named; logs what it
    decided. Raises ModelChoiceError for a model that cannot be served."""
    entries: list[tuple[str | None, str | None]] = [split_name(value) for value in choice.sources] or [(None, None)]
    adapters = first_model_adapters(choice)
    configs: list[ModelConfig] = []
    test_models: list[str] = []
    for index, (name, source) in enumerate(entries):
        try:
            folder = resolve_weights(source) if source else default_weights(choice.weights_dir)
            spec = inspect_model(folder)
            params = count_weight_params(spec.path)
            wide = choice.dtype == "float32" or (choice.dtype == "auto" and not torch.cuda.is_available())
            quantization = parse_quantization(choice.quantize)
            components = measure_folder(spec.path, 4 if wide else 2, quantization)
            gguf = choice.transformer_gguf if index == 0 else None
            gguf_line = None
            if gguf is not None:
                if "transformer" in dict(quantization.schemes):
                    raise QuantizationError(
                        "--transformer-gguf and --quantize transformer=... both quantize the transformer: choose one"
                    )
                file = read_gguf(gguf.expanduser())
                gguf_line = check_gguf(file, spec.path)
                components = _with_gguf(components, file.tensor_bytes, file.largest_block_bytes)
            placement = decide_placement(
                choice.device,
                choice.dtype,
                choice.offload,
                weight_params=params,
                compile=choice.compile,
                cache=choice.cache,
                quantize=choice.quantize,
                components=components,
                prompt_cache=choice.prompt_cache,
                transformer_file=gguf.expanduser() if gguf is not None else None,
                reference_cache=choice.reference_cache,
                reference_memory=choice.reference_memory,
                attention=choice.attention,
                switchable_adapters=index == 0 and bool(adapters.switchable),
            )
            if gguf_line is not None:
                placement = replace(placement, reasons=(*placement.reasons, gguf_line))
        except (WeightsError, PlacementError, QuantizationError, GGUFError) as exc:
            raise ModelChoiceError(str(exc)) from exc
        name = (
            name
            or (choice.first_name if index == 0 else None)
            or (source if source and not Path(source).expanduser().is_dir() else spec.path.name)
        )
        if any(c.name == name for c in configs):
            raise ModelChoiceError(f"two models are named {name!r}: name them with --model NAME=PATH")
        if params < TEST_MODEL_PARAMS:
            log.warning(TINY_WARNING.format(path=spec.path, weights_dir=choice.weights_dir))
            test_models.append(name)
        log.info(
            "model %s: %s (%s, %s, %.1fM parameters), aliases %s",
            name,
            spec.path,
            spec.pipeline_class,
            spec.family,
            params / 1e6,
            ", ".join(spec.aliases),
        )
        for reason in placement.reasons:
            log.info("model %s: %s", name, reason)
        configs.append(
            ModelConfig(
                name=name,
                spec=spec,
                placement=placement,
                weight_bytes=params * placement.dtype.itemsize,
                adapters=adapters if index == 0 else Adapters(),
            )
        )
    return ServedModels(configs=configs, test_models=tuple(test_models))


def _with_gguf(measured: MeasuredSizes, transformer_bytes: int, block_bytes: int) -> MeasuredSizes:
    """The folder's sizes with the GGUF file's transformer in place of the folder's."""
    sizes = replace(
        measured.sizes, transformer=transformer_bytes, transformer_block=block_bytes, transformer_block_sizes=()
    )
    return replace(measured, sizes=sizes)


def first_model_adapters(choice: ModelChoice) -> Adapters:
    """The --lora adapters (they belong to the first model), checked: files present, names distinct."""
    try:
        adapters = adapters_from_options(choice.lora, choice.fuse_lora)
    except AdapterError as exc:
        raise ModelChoiceError(str(exc)) from exc
    for adapter in adapters.items:
        fused = " (fused at start)" if adapter.fused else ""
        log.info("lora %s: %s, scale %g%s", adapter.name, adapter.path, adapter.scale, fused)
    return adapters


def split_name(value: str) -> tuple[str | None, str]:
    """ "NAME=PATH_OR_ID" -> (NAME, PATH_OR_ID); a plain path or hub id -> (None, value)."""
    name, sep, source = value.partition("=")
    if sep and name and "/" not in name and not Path(value).exists():
        return name, source
    return None, value


def default_weights(weights_dir: Path) -> Path:
    """The diffusers folder found in `weights_dir`, else tiny random test weights built there."""
    found = find_local_weights(weights_dir)
    if found is not None:
        log.info("model: no --model given; serving %s found in %s", found, weights_dir)
        return found
    target = weights_dir / TINY_DEFAULT_DIRNAME
    log.warning(
        "model: no --model given and no diffusers folder in %s: building tiny random test weights in %s",
        weights_dir,
        target,
    )
    # Build beside the target and rename, so an interrupted first start never leaves a half-written folder.
    partial = build_tiny_weights(weights_dir / f".{TINY_DEFAULT_DIRNAME}.partial", "klein")
    if target.exists():  # not a loadable model (find_local_weights passed it over): replace it
        log.warning("model: replacing %s, which is not a loadable diffusers folder", target)
        shutil.rmtree(target)
    partial.rename(target)
    return target
