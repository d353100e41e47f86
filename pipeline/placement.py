"""Where a model runs: device, dtype and CPU-offload policy, decided once at start from what was asked and what
the machine has. Pure decisions over measured numbers, so every branch is testable without a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard, TypeVar, get_args

import torch

from .quantization import Quantization, QuantizationError, check_quantization, parse_quantization
from .step_cache import CacheSpecError, StepCache, parse_cache

Device = Literal["cuda", "cpu"]
Offload = Literal["none", "model", "sequential"]
DeviceChoice = Literal["auto", Device]
DtypeChoice = Literal["auto", "bfloat16", "float16", "float32"]
OffloadChoice = Literal["auto", Offload]

# What the CLI offers, in this order: "auto" first.
DEVICE_CHOICES: tuple[DeviceChoice, ...] = get_args(DeviceChoice)
DTYPE_CHOICES: tuple[DtypeChoice, ...] = get_args(DtypeChoice)
OFFLOAD_CHOICES: tuple[OffloadChoice, ...] = get_args(OffloadChoice)
REFERENCE_CACHE_CHOICES = ("off", "on")

_GIB = 1024**3
# Room left on the GPU beyond the weights for activations, the VAE decode and the CUDA context: the larger of a
# fixed amount and a share of the weights.
_MARGIN_BYTES = 4 * _GIB
_MARGIN_SHARE = 0.15


class PlacementError(Exception):
    """The requested placement cannot be honoured on this machine."""


@dataclass(frozen=True)
class Placement:
    device: Device
    dtype: torch.dtype
    offload: Offload
    reasons: tuple[str, ...]  # one line per decision, for the start-up log
    compile: bool = False  # regional torch.compile of the transformer's repeated blocks, warmed up at load
    cache: StepCache = StepCache()  # step caching hooks on the transformer (off by default)
    quantization: Quantization = Quantization()  # quantized components (none by default)
    reference_cache: bool = False  # edits: reference K/V computed once per batch (pipeline/reference_cache.py)


def decide_placement(
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "auto",
    *,
    weight_params: int,
    cuda_available: bool | None = None,
    cuda_free_bytes: int | None = None,
    compile: bool = False,
    cache: str = "off",
    quantize: str = "none",
    reference_cache: str = "off",
    cuda_capability: tuple[int, int] | None = None,
) -> Placement:
    """Decide device, dtype and offload. `weight_params` counts the model's parameters; the CUDA facts default
    to the live machine's and are injectable for tests. The three choices are checked here, so any string may
    be passed (a CLI's or an environment variable's)."""
    if not _one_of(device, DEVICE_CHOICES):
        raise PlacementError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if not _one_of(dtype, DTYPE_CHOICES):
        raise PlacementError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if not _one_of(offload, OFFLOAD_CHOICES):
        raise PlacementError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()

    reasons = []
    chosen_device: Device
    if device == "auto":
        chosen_device = "cuda" if cuda_available else "cpu"
        reasons.append(f"device: {chosen_device} (auto: CUDA {'found' if cuda_available else 'not found'})")
    elif device == "cuda" and not cuda_available:
        raise PlacementError("device 'cuda' was asked for, but torch sees no CUDA device")
    else:
        chosen_device = device
        reasons.append(f"device: {chosen_device} (asked)")

    if dtype == "auto":
        chosen_dtype = torch.bfloat16 if chosen_device == "cuda" else torch.float32
        why = "bf16 on CUDA" if chosen_device == "cuda" else "fp32 on CPU"
        reasons.append(f"dtype: {_dtype_name(chosen_dtype)} (auto: {why})")
    else:
        chosen_dtype = getattr(torch, dtype)
        reasons.append(f"dtype: {dtype} (asked)")

    weight_bytes = weight_params * _itemsize(chosen_dtype)
    chosen_offload: Offload
    if chosen_device == "cpu":
        if offload not in ("auto", "none"):
            raise PlacementError(f"offload {offload!r} moves weights to an accelerator; there is none on 'cpu'")
        chosen_offload = "none"
        reasons.append(f"offload: none (CPU; weights {weight_bytes / _GIB:.2f} GiB in RAM)")
    elif offload != "auto":
        chosen_offload = offload
        reasons.append(f"offload: {offload} (asked; weights {weight_bytes / _GIB:.2f} GiB)")
    else:
        if cuda_free_bytes is None:
            cuda_free_bytes = torch.cuda.mem_get_info()[0]
        needed = weight_bytes + max(_MARGIN_BYTES, int(weight_bytes * _MARGIN_SHARE))
        chosen_offload = "none" if needed <= cuda_free_bytes else "model"
        verdict = "fits" if chosen_offload == "none" else "does not fit"
        reasons.append(
            f"offload: {chosen_offload} (auto: weights {weight_bytes / _GIB:.2f} GiB + margin = "
            f"{needed / _GIB:.2f} GiB {verdict} in {cuda_free_bytes / _GIB:.2f} GiB free)"
        )
    if compile:
        reasons.append("compile: the transformer's repeated blocks (asked; compiled and warmed up at load)")
    try:
        step_cache = parse_cache(cache)
    except CacheSpecError as exc:
        raise PlacementError(str(exc)) from exc
    if step_cache.kind != "off":
        reasons.append(f"cache: {step_cache} (asked: steps reuse work; images differ slightly from uncached)")
    if reference_cache not in REFERENCE_CACHE_CHOICES:
        raise PlacementError(f"reference-cache must be one of {REFERENCE_CACHE_CHOICES}, got {reference_cache!r}")
    if reference_cache == "on":
        if step_cache.kind != "off":
            raise PlacementError(
                "reference-cache on and cache "
                f"{step_cache} cannot be combined: the step cache's hooks would take the references' pass for a step"
            )
        reasons.append(
            "reference-cache: on (asked: edits compute the references' keys and values once, at timestep 0, "
            "references attending only to themselves: diffusers' KV semantics, images differ from uncached edits)"
        )
    try:
        quantization = parse_quantization(quantize)
        if chosen_device == "cuda" and cuda_capability is None and quantization:
            cuda_capability = torch.cuda.get_device_capability()
        reasons += check_quantization(quantization, chosen_device, cuda_capability)
    except QuantizationError as exc:
        raise PlacementError(str(exc)) from exc
    return Placement(
        device=chosen_device,
        dtype=chosen_dtype,
        offload=chosen_offload,
        reasons=tuple(reasons),
        compile=compile,
        cache=step_cache,
        quantization=quantization,
        reference_cache=reference_cache == "on",
    )


def count_weight_params(folder: Path) -> int:
    """Count the parameters in a diffusers folder's safetensors files, reading only their headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*/*.safetensors")):
        with safe_open(file, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
                numel = 1
                for dim in tensors.get_slice(name).get_shape():
                    numel *= dim
                total += numel
    return total


_Choice = TypeVar("_Choice", bound=str)


def _one_of(value: str, choices: tuple[_Choice, ...]) -> TypeGuard[_Choice]:
    return value in choices


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
