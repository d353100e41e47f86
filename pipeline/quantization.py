"""Quantized weights (`--quantize COMPONENT=SCHEME,...`) through diffusers' and transformers' quantization
configs, as an optional extra (`pip install -e ".[quant]"`):

- `int8`: torchao int8 weight-only (CPU and CUDA);
- `fp8-weight`: torchao float8 weight-only (CPU and CUDA);
- `fp8`: torchao float8 weights and activations (float8 matmuls; CUDA compute capability 8.9+: Ada, Hopper);
- `nf4`: bitsandbytes 4-bit NF4 (CUDA only).

Components: `transformer` and `text_encoder`. Impossible combinations are refused when the server starts, with a
message saying why (a scheme on a device it cannot run on, torchao or bitsandbytes not installed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

Scheme = Literal["int8", "fp8-weight", "fp8", "nf4"]
SCHEMES: tuple[Scheme, ...] = ("int8", "fp8-weight", "fp8", "nf4")
COMPONENTS = ("transformer", "text_encoder")
_NEEDS: dict[Scheme, str] = {"int8": "torchao", "fp8-weight": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
_FP8_CAPABILITY = (8, 9)


class QuantizationError(ValueError):
    """A --quantize value that cannot be used here; the message says why."""


@dataclass(frozen=True)
class Quantization:
    schemes: tuple[tuple[str, Scheme], ...] = ()  # (component, scheme), in the order given

    def __bool__(self) -> bool:
        return bool(self.schemes)

    def __str__(self) -> str:
        return ",".join(f"{component}={scheme}" for component, scheme in self.schemes) or "none"


def parse_quantization(text: str) -> Quantization:
    """ "" or "none" -> no quantization; "transformer=int8,text_encoder=fp8-weight" -> per component."""
    text = text.strip().lower()
    if text in ("", "none"):
        return Quantization()
    schemes: dict[str, Scheme] = {}
    for part in text.split(","):
        component, sep, scheme = (piece.strip() for piece in part.partition("="))
        if not sep or component not in COMPONENTS:
            raise QuantizationError(
                f"quantize takes COMPONENT=SCHEME pairs with COMPONENT one of "
                f"{', '.join(COMPONENTS)}, got {part.strip()!r}"
            )
        if scheme not in SCHEMES:
            raise QuantizationError(f"quantize scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        if component in schemes:
            raise QuantizationError(f"quantize names {component} twice")
        schemes[component] = scheme
    return Quantization(tuple(schemes.items()))


def check_quantization(quantization: Quantization, device: str, capability: tuple[int, int] | None = None) -> list[str]:
    """Refuse what cannot run on `device` (capability: the CUDA card's, for fp8); the start-up log's lines."""
    reasons = []
    for component, scheme in quantization.schemes:
        if scheme == "nf4" and device != "cuda":
            raise QuantizationError(
                f"{component}=nf4 needs a CUDA GPU (bitsandbytes quantizes on the GPU); on the "
                "CPU use int8 or fp8-weight"
            )
        if scheme == "fp8":
            if device != "cuda":
                raise QuantizationError(
                    f"{component}=fp8 runs float8 matmuls, which need a CUDA GPU of compute "
                    "capability 8.9+ (Ada, Hopper); on the CPU use fp8-weight or int8"
                )
            if capability is not None and capability < _FP8_CAPABILITY:
                raise QuantizationError(
                    f"{component}=fp8 needs compute capability 8.9+ (Ada, Hopper); this card "
                    f"has {capability[0]}.{capability[1]}: use fp8-weight or int8"
                )
        package = _NEEDS[scheme]
        if importlib.util.find_spec(package) is None:
            raise QuantizationError(f'{component}={scheme} needs the {package} package: pip install -e ".[quant]"')
        reasons.append(f"quantize: {component} {scheme} ({package})")
    return reasons


def pipeline_quantization_config(quantization: Quantization) -> Any:
    """diffusers' PipelineQuantizationConfig mapping each component to its library's config, or None."""
    if not quantization:
        return None
    from diffusers.quantizers.pipe_quant_config import PipelineQuantizationConfig

    mapping = {component: _config(component, scheme) for component, scheme in quantization.schemes}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def _config(component: str, scheme: Scheme) -> Any:
    diffusers_side = component == "transformer"  # the text encoder is a transformers model
    if scheme == "nf4":
        if diffusers_side:
            from diffusers import BitsAndBytesConfig
        else:
            from transformers import BitsAndBytesConfig  # type: ignore[assignment]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    torchao_config = _torchao_config(scheme)
    if diffusers_side:
        from diffusers import TorchAoConfig

        return TorchAoConfig(torchao_config)
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    return TransformersTorchAoConfig(torchao_config)


def _torchao_config(scheme: Scheme) -> Any:
    """torchao's config for `scheme`, with `set_inductor_config=False`: by default each of these configs, when applied,
    sets the Inductor options torchao recommends for quantized models, among them `coordinate_descent_tuning` with
    `coordinate_descent_check_all_directions`, which benchmark every Triton kernel's variants the first time it runs.
    torch keeps such settings per thread; the thread that loads (or, in the bench, builds) a model also compiles and
    warms it up. With `--compile` and fp8 (a quantize kernel beside each matmul) that tuning was where the warm-up
    spent its time: cut off after 355 s on an H200 (run 9), every stack dump inside Inductor's coordinate-descent
    tuner (the H100's cut-offs after 88 s and 295 s had no dumps)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )

    return {
        "int8": Int8WeightOnlyConfig,
        "fp8-weight": Float8WeightOnlyConfig,
        "fp8": Float8DynamicActivationFloat8WeightConfig,
    }[scheme](set_inductor_config=False)


def quantize_modules(pipe: Any, quantization: Quantization) -> None:
    """Quantize the components of a pipeline already in memory (the benchmark's random-weight pipelines, which
    are built, not loaded from files) with torchao's `quantize_`. nf4 (bitsandbytes) quantizes only while loading
    from files, so it is refused here."""
    for component, _ in quantization.schemes:
        quantize_module(getattr(pipe, component), component, quantization)


def quantize_module(module: Any, component: str, quantization: Quantization) -> None:
    """`module` (the pipeline's `component`) quantized in place as `quantization` says, or left as it is."""
    scheme = dict(quantization.schemes).get(component)
    if scheme is None:
        return
    if scheme == "nf4":
        raise QuantizationError(f"{component}=nf4 quantizes while loading from files: not for in-memory pipelines")
    from torchao.quantization import quantize_

    quantize_(module, _torchao_config(scheme))
    tolerate_empty_inputs(module, scheme)


_ACTIVATIONS_QUANTIZED: frozenset[Scheme] = frozenset({"fp8"})
_TOLERANT = "_flux2_tolerates_empty_inputs"


def tolerate_empty_inputs(module: Any, scheme: Scheme) -> int:
    """Make `module`'s linear layers return an empty output for an empty input when `scheme` quantizes activations
    (fp8): torchao's dynamic quantization scales an input by its largest value, and the largest value of an empty
    tensor is an error ("amax(): Expected reduction dim 1 to have non-zero size"). The reference cache's pass runs
    the references alone, with no text tokens (pipeline/reference_cache.py), through the text side of every
    double-stream block: with fp8 weights every edit under `--reference-cache on` failed there (run 10, H200). Any
    other input goes to the layer as before. Returns how many layers were changed (each at most once)."""
    if scheme not in _ACTIVATIONS_QUANTIZED:
        return 0
    import torch

    changed = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and not getattr(layer, _TOLERANT, False):
            layer.forward = _empty_tolerant(layer.forward, layer.out_features)  # type: ignore[method-assign]
            setattr(layer, _TOLERANT, True)
            changed += 1
    return changed


def tolerate_empty_inputs_in(pipe: Any, quantization: Quantization) -> None:
    """`tolerate_empty_inputs` for each component of a pipeline that `quantization` quantized while loading."""
    for component, scheme in quantization.schemes:
        tolerate_empty_inputs(getattr(pipe, component), scheme)


def _empty_tolerant(forward: Any, out_features: int) -> Any:
    def tolerant(input: Any) -> Any:
        if input.numel() == 0:
            return input.new_zeros((*input.shape[:-1], out_features))
        return forward(input)

    return tolerant
