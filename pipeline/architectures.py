"""FLUX.2 architectures at their real sizes, built in memory with random weights, for benchmarks.

Random weights give noise images but the real shapes, memory and time. Nothing is downloaded or written: the
modules are constructed directly on the target device in the target dtype (their own initialisation runs there,
so 8 billion parameters take seconds on a GPU instead of minutes of CPU work). The tokenizers are the tiny
builder's: their ids index into the real-size embedding tables, and klein pads every prompt to 512 tokens, so the
text encoder sees real-length input.

Real configs: the transformers as `Flux2Transformer2DModel`'s defaults describe dev (8 double + 48 single blocks,
48 heads x 128, joint attention dim 15360, guidance embeddings) and klein as the released configs (4B: 5 + 20
blocks, 24 heads, joint dim 7680; 9B: 8 + 24 blocks, 32 heads, joint dim 12288), the text encoders as Qwen3-4B,
Qwen3-8B and Mistral-Small-3.1-24B (with its Pixtral vision tower), the VAE as `AutoencoderKLFlux2`'s defaults.
`tiny` is the tiny builder's klein pipeline, for running the benchmark code on a CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .component_sizes import MeasuredSizes, measure_modules
from .internals import Flux2Pipe
from .quantization import Quantization, quantize_module, quantize_modules
from .tiny_weights import Variant
from .weights import _DEV_DEFAULTS, _KLEIN_DISTILLED_DEFAULTS, ModelSpec

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration, PixtralProcessor, PreTrainedModel, Qwen3ForCausalLM

# Qwen3-4B and Qwen3-8B (klein's text encoders): transformers' Qwen3Config keywords.
_QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)
_QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)
# Mistral-Small-3.1-24B (dev's text encoder): the language model and the Pixtral vision tower.
_MISTRAL_SMALL_TEXT = dict(
    vocab_size=131072,
    hidden_size=5120,
    intermediate_size=32768,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    sliding_window=None,
    tie_word_embeddings=False,
)
_PIXTRAL_VISION: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    head_dim=64,
    image_size=1540,
    patch_size=14,
)


@dataclass(frozen=True)
class Architecture:
    name: str
    family: Variant  # "klein" | "dev"
    transformer: dict[str, Any] = field(default_factory=dict)  # Flux2Transformer2DModel keywords over defaults
    encoder: dict[str, Any] = field(default_factory=dict)  # the text encoder's (language model's) config keywords
    size_label: str | None = None  # served as flux.2-klein-4b / -9b
    size: int = 1024  # the side of the benchmark's base image (the tiny one runs smaller images)
    repeats: int = 3  # default runs per benchmark figure

    @property
    def tiny(self) -> bool:
        return self.name.startswith("tiny")


ARCHITECTURES: dict[str, Architecture] = {
    "klein-4b": Architecture(
        "klein-4b",
        "klein",
        dict(
            num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
        ),
        _QWEN3_4B,
        size_label="4b",
    ),
    "klein-9b": Architecture(
        "klein-9b",
        "klein",
        dict(
            num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False
        ),
        _QWEN3_8B,
        size_label="9b",
    ),
    # dev is Flux2Transformer2DModel's default config. One run per figure: a dev image costs ~10x a klein one.
    "dev": Architecture("dev", "dev", dict(guidance_embeds=True), _MISTRAL_SMALL_TEXT, repeats=1),
    # The tiny builder's pipelines, for running the benchmark's code on a CPU.
    "tiny": Architecture("tiny", "klein", size=128, repeats=1),
    "tiny-dev": Architecture("tiny-dev", "dev", size=128, repeats=1),
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def model_spec(arch: Architecture) -> ModelSpec:
    """What the server needs to know of the in-memory pipeline (it never reads `path`, only names things by it)."""
    is_dev = arch.family == "dev"
    return ModelSpec(
        path=Path(f"in-memory-{arch.name}"),
        pipeline_class="Flux2Pipeline" if is_dev else "Flux2KleinPipeline",
        family=arch.family,
        is_distilled=not is_dev,
        size_label=arch.size_label,
        defaults=_DEV_DEFAULTS if is_dev else _KLEIN_DISTILLED_DEFAULTS,
    )


@contextlib.contextmanager
def _building_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside are created (and initialised) on `device` in `dtype`, from a fixed seed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            yield
    finally:
        torch.set_default_dtype(previous)


_Module = TypeVar("_Module", bound=torch.nn.Module)


def _parked(module: _Module, park: bool, component: str, quantization: Quantization) -> _Module:
    """`module` quantized where it was built, if `quantization` names its `component`, then moved to the host (its
    device memory released) when `park`, else left where it is."""
    quantize_module(module, component, quantization)
    if park:
        module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return module


def _brought_back(modules: tuple[torch.nn.Module, ...], bring: bool, device: str) -> None:
    """The components a quantized build kept on the host while the text encoder was built, back on `device`."""
    if bring:
        for module in modules:
            module.to(device)


def _transformer(arch: Architecture) -> Flux2Transformer2DModel:
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

    # (diffusers' @register_to_config leaves its models' constructors untyped: the annotation types the result.)
    transformer: Flux2Transformer2DModel = Flux2Transformer2DModel(**arch.transformer)
    return transformer


def _vae() -> AutoencoderKLFlux2:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

    vae: AutoencoderKLFlux2 = AutoencoderKLFlux2()
    return vae


def _text_encoder(arch: Architecture, image_token_index: int = 10) -> PreTrainedModel:
    return _qwen3(arch) if arch.family == "klein" else _mistral3(arch, image_token_index)


def _qwen3(arch: Architecture) -> Qwen3ForCausalLM:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**arch.encoder))


def _mistral3(arch: Architecture, image_token_index: int) -> Mistral3ForConditionalGeneration:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    return Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=MistralConfig(**arch.encoder),
            vision_config=PixtralVisionConfig(**_PIXTRAL_VISION),
            image_token_index=image_token_index,
            spatial_merge_size=2,
            projector_hidden_act="gelu",
            multimodal_projector_bias=False,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    )


def build_pipeline(
    arch: Architecture,
    device: str,
    dtype: torch.dtype,
    park_on_host: bool = False,
    quantization: Quantization = Quantization(),
) -> Flux2Pipe:
    """The whole diffusers pipeline with random weights, on `device` in `dtype`, progress bars off.

    `park_on_host`: each component is initialised on `device` and moved to the host at once (one component on the
    card at a time), for runs that place the weights themselves: the random initialisation runs on the GPU in
    seconds, where the CPU's takes minutes (~40 s for klein-4B's 3.9 B-parameter transformer on 2 cores).
    `quantization`: the components it names are quantized where they were built, before parking, so the host
    holds them quantized (dev: ~56 GB with `transformer=fp8,text_encoder=fp8` instead of ~112 GB in bf16) and the
    GPU does the quantizing (torchao's fp8 refuses a CPU). Without `park_on_host`, a quantized build still keeps the
    components built first on the host while the text encoder (built last) is built, then brings them back: the
    card holds one component in bfloat16 at a time (dev in fp8 on an 80 GB H100: a peak of ~60 GiB, the transformer
    before its quantizing, instead of ~75 GiB, its fp8 weights beside the text encoder in bfloat16)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    from .tiny_weights import build_tiny_pipeline, flow_match_scheduler, klein_tokenizer

    pipe: Flux2Pipe
    park_first = park_on_host or bool(quantization)  # the components built before the text encoder
    if arch.tiny:
        pipe = build_tiny_pipeline(arch.family)
        if device != "cpu" or dtype != torch.float32:  # built on the CPU in float32 (`to` would only warn)
            pipe.to(device, dtype)
        quantize_modules(pipe, quantization)
    elif arch.family == "klein":
        tokenizer = klein_tokenizer()
        with _building_on(device, dtype):
            transformer = _parked(_transformer(arch), park_first, "transformer", quantization)
            vae = _parked(_vae(), park_first, "vae", quantization)
            qwen = _parked(_qwen3(arch), park_on_host, "text_encoder", quantization)
        _brought_back((transformer, vae), park_first and not park_on_host, device)
        # (diffusers annotates `scheduler` and dev's `tokenizer` with types its real arguments do not match: see
        # tiny_weights._build_klein.)
        pipe = Flux2KleinPipeline(
            scheduler=flow_match_scheduler(),  # type: ignore[arg-type]
            vae=vae,
            text_encoder=qwen,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=True,
        )
    else:
        processor = dev_text_processor()
        image_token = processor.tokenizer.convert_tokens_to_ids("[IMG]")
        with _building_on(device, dtype):
            transformer = _parked(_transformer(arch), park_first, "transformer", quantization)
            vae = _parked(_vae(), park_first, "vae", quantization)
            mistral = _parked(_mistral3(arch, image_token), park_on_host, "text_encoder", quantization)
        _brought_back((transformer, vae), park_first and not park_on_host, device)
        pipe = Flux2Pipeline(
            scheduler=flow_match_scheduler(),  # type: ignore[arg-type]
            vae=vae,
            text_encoder=mistral,
            tokenizer=processor,  # type: ignore[arg-type]
            transformer=transformer,
        )
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.eval()
    # (Ignored: mypy checks this call on the diffusers classes `pipe` was narrowed to, as a union, and its
    # untyped_calls_exclude setting does not reach calls on a union.)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe


class TextOnlyProcessor:
    """Stands in for dev's PixtralProcessor where transformers cannot build one (it needs torchvision): the
    pipeline and the server only use its chat template and its `.tokenizer` for text prompts."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs)


def dev_text_processor() -> PixtralProcessor | TextOnlyProcessor:
    """The tiny builder's PixtralProcessor, or the same tokenizer in a `TextOnlyProcessor` without torchvision.
    Its image settings do not match the real vision tower: fine for text prompts, all the benchmark sends
    (caption upsampling, which feeds images to the encoder, is not benchmarked)."""
    from .tiny_weights import dev_processor, dev_tokenizer

    try:
        return dev_processor()
    except ImportError:
        return TextOnlyProcessor(dev_tokenizer())


def build_transformer(arch: Architecture, device: str, dtype: torch.dtype) -> Flux2Transformer2DModel:
    """The transformer alone with random weights, on `device` in `dtype`."""
    if arch.tiny:
        return build_pipeline(arch, device, dtype).transformer
    with _building_on(device, dtype):
        return _transformer(arch).eval()


def measured_sizes(arch: Architecture, itemsize: int, quantization: Quantization = Quantization()) -> MeasuredSizes:
    """The offload planner's sizes of `arch` in `itemsize`-byte weights, measured on the meta device."""
    if arch.tiny:
        pipe = build_pipeline(arch, "cpu", torch.float32)
        return measure_modules(pipe.transformer, pipe.text_encoder, pipe.vae, itemsize, quantization)
    with torch.device("meta"):
        return measure_modules(_transformer(arch), _text_encoder(arch), _vae(), itemsize, quantization)


def parameter_counts(arch: Architecture) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no initialisation)."""
    if arch.tiny:
        pipe = build_pipeline(arch, "cpu", torch.float32)
        parts: dict[str, torch.nn.Module] = {
            "transformer": pipe.transformer,
            "text_encoder": pipe.text_encoder,
            "vae": pipe.vae,
        }
    else:
        with torch.device("meta"):
            parts = {"transformer": _transformer(arch), "text_encoder": _text_encoder(arch), "vae": _vae()}
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
