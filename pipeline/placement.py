"""Where a model runs: device, dtype and CPU-offload policy, decided once at start from what was asked and what
the machine has. Pure decisions over measured numbers, so every branch is testable without a GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard, TypeVar, get_args

import torch

from .attention import AttentionError, check_attention
from .component_sizes import MeasuredSizes
from .offload_plan import COMPONENTS, PLAN_NAMES, Component, DoesNotFit, OffloadPlan, PlanName, plan_offload
from .quantization import Quantization, QuantizationError, check_quantization, parse_quantization
from .step_cache import CacheSpecError, StepCache, parse_cache
from .toolchain import compile_toolchain_missing, install_hint, lacking
from .weights import tensor_sizes

Device = Literal["cuda", "cpu"]
# The planner's plans (pipeline/offload_plan.py), then diffusers' own offloads, kept from before the planner:
# model (whole sub-models move in turn, accelerate hooks) and sequential (leaf by leaf).
Offload = Literal[
    "resident", "encoder-swapped", "encoder-streamed", "transformer-resident", "block-streaming", "model", "sequential"
]
DeviceChoice = Literal["auto", Device]
DtypeChoice = Literal["auto", "bfloat16", "float16", "float32"]
# "none" is the name `resident` had before the planner; it is kept as an alias.
OffloadChoice = Literal[
    "auto",
    "resident",
    "encoder-swapped",
    "encoder-streamed",
    "transformer-resident",
    "block-streaming",
    "none",
    "model",
    "sequential",
]

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
# --reference-memory auto: the reference store (pipeline/reference_cache.py) takes half the memory a resident
# placement leaves free, at most this much; on the CPU (host memory, tiny or test models) a fixed amount.
_REFERENCE_MEMORY_MAX = 16 * _GIB
_REFERENCE_MEMORY_CPU = 1 * _GIB


class PlacementError(Exception):
    """The requested placement cannot be honoured on this machine."""


@dataclass(frozen=True)
class Placement:
    device: Device
    dtype: torch.dtype
    offload: Offload
    reasons: tuple[str, ...]  # one line per decision, for the start-up log
    compile: bool = False  # torch.compile of the transformer's repeated blocks and the decoder's norms, warmed up
    encoder_graphs: bool = False  # the text encode replayed from CUDA graphs (pipeline/encoder_graphs.py)
    transformer_graphs: bool = False  # the denoising steps replayed from CUDA graphs (pipeline/transformer_graphs.py)
    cache: StepCache = StepCache()  # step caching hooks on the transformer (off by default)
    quantization: Quantization = Quantization()  # quantized components (none by default)
    transformer_file: Path | None = None  # a GGUF transformer loaded in place of the folder's (gguf_weights.py)
    plan: OffloadPlan | None = None  # where each component lives (None: diffusers' model/sequential offload, or CPU)
    reference_cache: bool = False  # edits: reference K/V computed once per batch (pipeline/reference_cache.py)
    reference_memory: int = 0  # bytes of recent reference sets' K/V kept across requests (with reference_cache)
    attention: str = "sdpa"  # the transformer's attention kernel (pipeline/attention.py)


def decide_placement(
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "auto",
    *,
    weight_params: int,
    cuda_available: bool | None = None,
    cuda_free_bytes: int | None = None,
    compile: bool | None = None,
    cache: str = "off",
    quantize: str = "none",
    reference_cache: str = "off",
    reference_memory: str = "auto",
    attention: str = "sdpa",
    cuda_capability: tuple[int, int] | None = None,
    components: MeasuredSizes | None = None,
    prompt_cache: bool = True,
    transformer_file: Path | None = None,
    toolchain_missing: str | None = None,
    switchable_adapters: bool = False,
) -> Placement:
    """Decide device, dtype and offload. `weight_params` counts the model's parameters; the CUDA facts default
    to the live machine's and are injectable for tests. The three choices are checked here, so any string may
    be passed (a CLI's or an environment variable's). With `components` (sizes read from the weights), auto and
    the plan names go through the offload planner; without, auto keeps everything resident when the weights fit
    with a margin, else uses diffusers' model offload. `toolchain_missing` says what `torch.compile` needs and the
    machine lacks ("" for nothing; None: looked up, only where a compile is considered: pipeline/toolchain.py).
    `switchable_adapters`: the model has LoRA adapters a request turns on and off (compiled, they switch by scale;
    no step graphs)."""
    if not one_of(device, DEVICE_CHOICES):
        raise PlacementError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if not one_of(dtype, DTYPE_CHOICES):
        raise PlacementError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if not one_of(offload, OFFLOAD_CHOICES):
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

    try:
        quantization = parse_quantization(quantize)
        if chosen_device == "cuda" and cuda_capability is None and quantization:
            cuda_capability = torch.cuda.get_device_capability()
        reasons += check_quantization(quantization, chosen_device, cuda_capability)
    except QuantizationError as exc:
        raise PlacementError(str(exc)) from exc
    quantized = tuple(component for component, _ in quantization.schemes if component in COMPONENTS)
    if transformer_file is not None:
        quantized = (*quantized, "transformer")
    weight_bytes = weight_params * _itemsize(chosen_dtype)
    asked: Offload | Literal["auto"] = "resident" if offload == "none" else offload
    chosen_offload: Offload
    plan = None
    spare = 0  # device memory a resident placement leaves free beyond its estimate (the reference store's room)
    if chosen_device == "cpu":
        if asked == "model" or asked == "sequential":
            raise PlacementError(f"offload {offload!r} moves weights to an accelerator; there is none on 'cpu'")
        if asked == "auto" or asked == "resident":
            chosen_offload = "resident"
            reasons.append(f"offload: none (CPU; weights {weight_bytes / _GIB:.2f} GiB in RAM)")
        else:
            chosen_offload = asked
            plan = _plan(asked, components, cuda_free_bytes or _available_ram(), prompt_cache, quantized)
            reasons.append(
                f"offload: {asked} (asked; on the CPU the plan's moves are simulated: host and device are the same "
                "memory, nothing is saved)"
            )
            reasons += plan.lines()
    elif asked == "model" or asked == "sequential":
        chosen_offload = asked
        reasons.append(f"offload: {asked} (asked; weights {weight_bytes / _GIB:.2f} GiB)")
    elif components is not None or asked != "auto":  # a forced plan needs the sizes: _plan refuses without
        if cuda_free_bytes is None:
            cuda_free_bytes = torch.cuda.mem_get_info()[0]
        plan = _plan(asked, components, cuda_free_bytes, prompt_cache, quantized)
        chosen_offload = plan.name
        reasons += plan.lines()
        if plan.name == "resident":
            spare = plan.free_bytes - plan.needed_bytes
    else:
        if cuda_free_bytes is None:
            cuda_free_bytes = torch.cuda.mem_get_info()[0]
        needed = weight_bytes + max(_MARGIN_BYTES, int(weight_bytes * _MARGIN_SHARE))
        chosen_offload = "resident" if needed <= cuda_free_bytes else "model"
        spare = cuda_free_bytes - needed
        verdict = "fits" if chosen_offload == "resident" else "does not fit"
        reasons.append(
            f"offload: {chosen_offload} (auto: weights {weight_bytes / _GIB:.2f} GiB + margin = "
            f"{needed / _GIB:.2f} GiB {verdict} in {cuda_free_bytes / _GIB:.2f} GiB free)"
        )
    try:
        step_cache = parse_cache(cache)
    except CacheSpecError as exc:
        raise PlacementError(str(exc)) from exc
    compile, compile_reason = _compile_choice(
        compile,
        chosen_device,
        chosen_offload,
        quantization,
        transformer_file,
        step_cache.kind != "off",
        lambda: toolchain_missing if toolchain_missing is not None else compile_toolchain_missing(chosen_device),
    )
    if compile_reason:
        reasons.append(compile_reason)
    encoder_graphs = encoder_graphs_fit(compile, chosen_device, chosen_offload)
    if encoder_graphs:
        reasons.append("encoder graphs: a new prompt's text encode replayed from a CUDA graph (with compile, resident)")
    transformer_graphs = transformer_graphs_fit(
        compile,
        chosen_device,
        chosen_offload,
        "transformer" in quantized,
        step_cache.kind != "off",
        switchable_adapters,
    )
    if transformer_graphs:
        reasons.append(
            "transformer graphs: the steps at the warm-up's size (batches of 1 and 2) replayed from CUDA graphs "
            "(with compile, resident)"
        )
    if step_cache.kind != "off":
        reasons.append(f"cache: {step_cache} (asked: steps reuse work; images differ slightly from uncached)")
    if reference_cache not in REFERENCE_CACHE_CHOICES:
        raise PlacementError(f"reference-cache must be one of {REFERENCE_CACHE_CHOICES}, got {reference_cache!r}")
    reference_bytes, reference_why = _reference_memory(reference_memory, reference_cache == "on", chosen_device, spare)
    if reference_cache == "on":
        if step_cache.kind != "off":
            raise PlacementError(
                "reference-cache on and cache "
                f"{step_cache} cannot be combined: the step cache's hooks would take the references' pass for a step"
            )
        reasons.append(
            "reference-cache: on (asked: edits compute the references' keys and values once, at timestep 0, "
            "references attending only to themselves: diffusers' KV semantics, images differ from uncached edits); "
            f"{reference_why}"
        )
    try:
        attention_line = check_attention(attention, chosen_device)
    except AttentionError as exc:
        raise PlacementError(str(exc)) from exc
    if attention_line:
        reasons.append(attention_line)
    return Placement(
        device=chosen_device,
        dtype=chosen_dtype,
        offload=chosen_offload,
        reasons=tuple(reasons),
        compile=compile,
        encoder_graphs=encoder_graphs,
        transformer_graphs=transformer_graphs,
        cache=step_cache,
        quantization=quantization,
        plan=plan,
        transformer_file=transformer_file,
        reference_cache=reference_cache == "on",
        reference_memory=reference_bytes,
        attention=attention,
    )


def _reference_memory(asked: str, cache_on: bool, device: Device, spare: int) -> tuple[int, str]:
    """Bytes for the reference store and the words for the log. auto: on CUDA half of `spare` (what a resident
    placement leaves free; 0 under an offload plan, which needs its room), at most 16 GiB; 1 GiB on the CPU."""
    if asked == "auto":
        if not cache_on:
            return 0, ""
        if device == "cpu":
            size, why = _REFERENCE_MEMORY_CPU, "auto: the CPU"
        else:
            size = min(_REFERENCE_MEMORY_MAX, max(0, spare) // 2)
            why = "auto: half the memory left free with everything resident, at most 16 GiB"
    else:
        try:
            gib = float(asked)
        except ValueError:
            gib = -1.0
        if not gib >= 0 or gib == float("inf"):  # also refuses nan
            raise PlacementError(f"reference-memory must be auto or a number of GiB (0 or more), got {asked!r}")
        if not cache_on:
            raise PlacementError(
                "reference-memory sizes the reference cache's store across requests: it needs --reference-cache on"
            )
        size, why = int(gib * _GIB), "asked"
    if not size:
        return 0, f"no reference sets kept across requests ({why})"
    return size, f"up to {size / _GIB:.2f} GiB of recent reference sets' K/V kept across requests ({why})"


def encoder_graphs_fit(compile: bool, device: str, offload: str) -> bool:
    """Whether a new prompt's text encode is replayed from CUDA graphs (pipeline/encoder_graphs.py): with the
    compile, on CUDA, everything resident (a graph reads the weights where they were at its capture; an encoder
    that streams or swaps moves them)."""
    return compile and device == "cuda" and offload == "resident"


def transformer_graphs_fit(
    compile: bool,
    device: str,
    offload: str,
    quantized_transformer: bool = False,
    step_cache: bool = False,
    switchable_adapters: bool = False,
) -> bool:
    """Whether the denoising steps are replayed from CUDA graphs (pipeline/transformer_graphs.py): as the encoder's,
    and only for a transformer nothing changes between calls: not quantized (or GGUF), without the step cache's
    hooks (which decide at each step what runs) and without LoRA adapters a request switches (a fused one is plain
    weights by then)."""
    return (
        encoder_graphs_fit(compile, device, offload)
        and not quantized_transformer
        and not step_cache
        and not switchable_adapters
    )


# Quantized components whose compile auto turns on: measured compiled on a GPU (the transformer: run 10, H200; the
# text encoder: run 11, H100, dev with both in fp8, its encode replayed from a CUDA graph).
_MEASURED_COMPILED = frozenset({("transformer", "fp8"), ("text_encoder", "fp8")})


def _compile_choice(
    asked: bool | None,
    device: Device,
    offload: Offload,
    quantization: Quantization,
    transformer_file: Path | None,
    step_cache: bool,
    toolchain_missing: Callable[[], str],
) -> tuple[bool, str]:
    """Whether to compile, and the log line ("" for none). Asked (--compile / --no-compile) is obeyed; auto
    compiles on CUDA when everything is resident and nothing else changes the transformer: measured on an H200
    (klein-4B, 1024², torch 2.11), a step takes 0.060 s instead of 0.082 s and a served image 0.35 s instead of
    0.65 s for plain diffusers (the decoder's norms compiled too), for ~50 s of compiling at start. Measured too
    (H200, run 10): fp8 transformer weights compiled, 0.33 s an image (eager fp8 is slower than eager bf16: its
    activations' quantization is not fused), and switchable LoRA adapters compiled by scale, 0.39 s against 0.51 s
    eager with none chosen and 0.58 s with one (peft's switch); and (H100, run 11) dev with its transformer and
    text encoder in fp8, 16.1 s for 50 steps compiled against 25.2 s eager. Offloaded, GGUF and step-cached
    transformers and the other quantizations stay eager until measured compiled. A machine that cannot build the
    compiled kernels (no C compiler or Python headers: `toolchain_missing`) stays eager under auto and refuses an
    asked compile."""
    if asked:
        missing = toolchain_missing()
        if missing:
            raise PlacementError(f"--compile {lacking(device, missing)}, or --no-compile")
    if asked is not None:
        what = "the transformer's repeated blocks and the VAE decoder's norms, compiled and warmed up at load"
        what = what if asked else "off"
        return asked, f"compile: {what} (asked)"
    if device != "cuda":  # the CPU: compiling costs more than it saves; no line, as for any default left alone
        return False, ""
    unmeasured = ",".join(f"{c}={q}" for c, q in quantization.schemes if (c, q) not in _MEASURED_COMPILED)
    held_back = [
        reason
        for reason, present in (
            (f"offload {offload}", offload != "resident"),
            (f"quantized weights ({unmeasured})", bool(unmeasured)),
            ("a GGUF transformer", transformer_file is not None),
            ("the step cache", step_cache),
        )
        if present
    ]
    if held_back:
        return False, f"compile: off (auto: not measured with {', '.join(held_back)}; --compile forces it)"
    missing = toolchain_missing()
    if missing:
        return False, f"compile: off (auto: this machine lacks {missing}; {install_hint(device)} for faster images)"
    return True, (
        "compile: the transformer's repeated blocks and the VAE decoder's norms (auto: CUDA, everything resident; "
        "compiled and warmed up at load, about 50 s; --no-compile skips it)"
    )


def _plan(
    asked: str,
    components: MeasuredSizes | None,
    free_bytes: int,
    prompt_cache: bool,
    quantized: tuple[Component, ...],
) -> OffloadPlan:
    if components is None:
        raise PlacementError(f"offload {asked!r} needs the components' sizes, which are not known for this model")
    force: PlanName | None = asked if one_of(asked, PLAN_NAMES) else None
    try:
        return plan_offload(
            components.sizes,
            components.working,
            free_bytes,
            prompt_cache=prompt_cache,
            transformer_blocks=components.transformer_blocks,
            text_encoder_layers=components.text_encoder_layers,
            force=force,
            quantized=quantized,
        )
    except DoesNotFit as exc:
        raise PlacementError(str(exc)) from exc


def count_weight_params(folder: Path) -> int:
    """Count the parameters in a diffusers folder's safetensors files, reading only their headers."""
    return sum(numel for file in sorted(folder.glob("*/*.safetensors")) for _, numel in tensor_sizes(file))


_Choice = TypeVar("_Choice", bound=str)


def one_of(value: str, choices: tuple[_Choice, ...]) -> TypeGuard[_Choice]:
    """Whether `value` is one of `choices` (a Literal's values), narrowing its type to that Literal."""
    return value in choices


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
