"""LoRA adapters: the ones the operator preloads (`--lora NAME=PATH[:SCALE]`, `--fuse-lora NAME`), the choice a
request makes among them, and the switch to that choice on a loaded pipeline.

Adapters load once, when their model loads (before it is placed, so an offload plan moves or streams their
layers with the transformer's, and before its compile, so the compiled blocks hold them), through diffusers'
`load_lora_weights` (FLUX.2's LoRA loader: the diffusers/peft layout, kohya's `lora_unet_*` layout and the
BFL/ai-toolkit `diffusion_model.*` layout are converted by diffusers). They apply to the transformer only, so
cached prompt embeddings stay valid. Before a batch runs, `activate` switches to the batch's adapters with
`set_adapters` (names and scales, nothing reloaded), or turns LoRA off with `disable_lora` when the batch names
none: the base model's output is then exactly what it is without any adapter loaded. Under `--compile` every
adapter stays on and the switch writes their scales (`LoadedAdapters` says why). Jobs with different adapter sets
never share a batch (their `batch_key` differs).

A fused adapter (`--fuse-lora NAME`) is merged into the transformer's weights at its scale when the model loads
and its LoRA layers removed: it costs nothing per step, and it is always on (requests cannot turn it off or change
its scale)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

if TYPE_CHECKING:
    from .internals import Flux2Pipe
    from .loader import LoadedModel

log = logging.getLogger("flux2.adapters")

# The scales a request (or --lora) may give an adapter: beyond +-2 a LoRA only degrades the image.
MIN_SCALE, MAX_SCALE = -2.0, 2.0
MAX_PER_REQUEST = 8
# peft keeps adapters in a ModuleDict: a name may not hold a dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# The adapters a request runs with: (name, scale) pairs sorted by name, none at scale 0. () is the base model.
Selection = tuple[tuple[str, float], ...]


class AdapterError(ValueError):
    """An adapter that cannot be loaded or chosen; the message names it and says why."""


class UnknownAdapter(AdapterError):
    """A request named an adapter the model does not have."""


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path  # a local .safetensors file
    scale: float = 1.0  # the scale a request gets when it names the adapter without one (and a fused one's)
    fused: bool = False  # merged into the weights at load: always on, at `scale`


@dataclass(frozen=True)
class Adapters:
    """The adapters preloaded into one model."""

    items: tuple[Adapter, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def switchable(self) -> tuple[Adapter, ...]:
        return tuple(a for a in self.items if not a.fused)

    @property
    def fused(self) -> Adapter | None:
        return next((a for a in self.items if a.fused), None)

    def get(self, name: str) -> Adapter | None:
        return next((a for a in self.items if a.name == name), None)


def parse_adapter(text: str) -> Adapter:
    """ "NAME=PATH" or "NAME=PATH:SCALE" -> an Adapter whose file exists."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise AdapterError(f"--lora takes NAME=PATH[:SCALE], got {text!r}")
    if not _NAME.fullmatch(name):
        raise AdapterError(f"LoRA name {name!r}: use letters, digits, '-' and '_' (at most 64 characters)")
    path_text, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            path_text = head
        except ValueError:  # a colon inside the path itself
            pass
    check_scale(scale, f"LoRA {name!r}")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise AdapterError(f"LoRA {name!r}: no file at {path}")
    if path.suffix != ".safetensors":
        raise AdapterError(f"LoRA {name!r}: {path.name} is not a .safetensors file")
    return Adapter(name=name, path=path, scale=scale)


def adapters_from_options(loras: Sequence[str], fuse: str | None = None) -> Adapters:
    """The --lora values, with the one --fuse-lora names marked fused."""
    items = [parse_adapter(text) for text in loras]
    names = [a.name for a in items]
    for name in names:
        if names.count(name) > 1:
            raise AdapterError(f"two LoRAs are named {name!r}")
    if fuse:
        if fuse not in names:
            raise AdapterError(f"--fuse-lora {fuse!r} names no --lora (given: {', '.join(names) or 'none'})")
        items = [Adapter(a.name, a.path, a.scale, fused=True) if a.name == fuse else a for a in items]
    return Adapters(tuple(items))


def check_scale(scale: float, what: str) -> None:
    if not (math.isfinite(scale) and MIN_SCALE <= scale <= MAX_SCALE):
        raise AdapterError(f"{what}: scale must be between {MIN_SCALE:g} and {MAX_SCALE:g}, got {scale:g}")


def select(adapters: Adapters, asked: Sequence[tuple[str, float | None]]) -> Selection:
    """A request's (name, scale or None) list -> the Selection to run, or AdapterError naming the bad adapter.
    A fused adapter may be named at its own scale only (it is on anyway)."""
    if len(asked) > MAX_PER_REQUEST:
        raise AdapterError(f"at most {MAX_PER_REQUEST} LoRAs per request, got {len(asked)}")
    chosen: dict[str, float] = {}
    for name, scale in asked:
        adapter = adapters.get(name)
        if adapter is None:
            known = ", ".join(a.name for a in adapters.items) or "none"
            raise UnknownAdapter(f"The LoRA '{name}' does not exist. This model has: {known}.")
        if name in chosen:
            raise AdapterError(f"The LoRA '{name}' is named twice.")
        value = adapter.scale if scale is None else float(scale)
        check_scale(value, f"LoRA '{name}'")
        if adapter.fused:
            if value != adapter.scale:
                raise AdapterError(
                    f"The LoRA '{name}' is fused into the model at scale {adapter.scale:g}: it is always on at that "
                    "scale and cannot be changed per request."
                )
            continue
        chosen[name] = value
    return tuple(sorted((name, scale) for name, scale in chosen.items() if scale != 0))


class LoadedAdapters:
    """The adapters in one loaded pipeline, and which are active. Used on the engine's worker thread only.

    Two ways to switch. Eager (the default): peft's own, `set_adapters` with the batch's names and scales, or
    `disable_lora`: only the chosen adapters' layers run. Under `--compile` (`switch_by_scale`) that would recompile
    the transformer's blocks for every switch: the compiled graphs are guarded on which adapters are active, on the
    adapters' `requires_grad` (peft turns it on for the active ones) and on the scales themselves (Python floats,
    some of which Dynamo specializes), so a new choice cost a compile (a tiny klein on this project's CPU: two
    graphs, seconds, for each new set of adapters) and past the recompile limit the blocks ran eager. By scale,
    every adapter stays active and each one's scale is a tensor on the device (peft multiplies each adapter's output
    by `scaling[name]`, a float or a tensor alike), written in place at a switch: an adapter left out runs at scale
    0, which adds exact zeros, and one compiled graph serves every choice. The price: each step computes every
    loaded adapter's low-rank product (per adapter and layer about rank x (in + out) / (in x out) of the layer's
    work, ~2 % at rank 32 on klein-4B)."""

    def __init__(self, pipe: Flux2Pipe, model_name: str, adapters: Adapters):
        self.pipe = pipe
        self.adapters = adapters
        fused = adapters.fused
        if fused is not None:  # first, alone: unload_lora_weights removes every adapter's layers
            _load(pipe, model_name, fused)
            pipe.fuse_lora(components=["transformer"], lora_scale=fused.scale, adapter_names=[fused.name])
            pipe.unload_lora_weights()
            log.info("lora %s: fused into the transformer at scale %g (%s)", fused.name, fused.scale, fused.path)
        for adapter in adapters.switchable:
            _load(pipe, model_name, adapter)
            log.info("lora %s: loaded from %s (default scale %g)", adapter.name, adapter.path, adapter.scale)
        # By scale: per adapter, its scale tensors keyed by the scaling each holds at scale 1 (peft's alpha / rank).
        self.scales: dict[str, dict[float, torch.Tensor]] | None = None
        self.active: Selection | None = None  # unknown until the first switch
        self.activate(())

    def switch_by_scale(self, device: str | torch.device) -> None:
        """From now on switch by scale (before the compile; the scale tensors on `device`, where the transformer
        runs), starting with none of the adapters chosen."""
        if not self.adapters.switchable or self.scales is not None:
            return
        self.scales = _scale_tensors(self.pipe, [a.name for a in self.adapters.switchable], torch.device(device))
        self.active = None
        self.activate(())

    def activate(self, selection: Selection) -> None:
        """Switch to `selection` (cheap: no weights move); nothing to do when it is already active."""
        if selection == self.active:
            return
        known = {a.name for a in self.adapters.switchable}
        unknown = [name for name, _ in selection if name not in known]
        if unknown:
            raise AdapterError(f"no LoRA named {', '.join(unknown)} is loaded in this model")
        if self.scales is not None:
            chosen = dict(selection)
            for name, tensors in self.scales.items():
                for unit, tensor in tensors.items():
                    tensor.fill_(chosen.get(name, 0.0) * unit)
        elif known:  # with only a fused adapter there are no LoRA layers to switch
            if selection:
                self.pipe.enable_lora()
                self.pipe.set_adapters([name for name, _ in selection], [scale for _, scale in selection])
            else:
                self.pipe.disable_lora()
        self.active = selection


def _scale_tensors(pipe: Flux2Pipe, names: list[str], device: torch.device) -> dict[str, dict[float, torch.Tensor]]:
    """Every adapter active at scale 1, then each LoRA layer's `scaling[name]` replaced by a float32 scalar tensor on
    `device`, shared by the layers of one adapter that scale alike (one per adapter, unless its alpha or rank
    varies by layer); per adapter, those tensors keyed by their scaling at scale 1."""
    from peft.tuners.lora import LoraLayer

    pipe.enable_lora()
    pipe.set_adapters(names, [1.0] * len(names))
    scales: dict[str, dict[float, torch.Tensor]] = {name: {} for name in names}
    for module in pipe.transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in names:
            if name not in module.scaling:
                continue
            unit = float(module.scaling[name])
            if unit not in scales[name]:
                scales[name][unit] = torch.zeros((), dtype=torch.float32, device=device)
            module.scaling[name] = scales[name][unit]
    return scales


def _load(pipe: Flux2Pipe, model_name: str, adapter: Adapter) -> None:
    try:
        pipe.load_lora_weights(str(adapter.path), adapter_name=adapter.name)
    except (ValueError, KeyError, RuntimeError) as exc:  # a layout diffusers cannot convert, or shapes that differ
        where = f"LoRA {adapter.name!r} ({adapter.path})"
        raise AdapterError(f"{where} does not fit {model_name}: {exc}") from exc
    except (OSError, SafetensorError) as exc:  # an empty, truncated or unreadable file
        raise AdapterError(f"LoRA {adapter.name!r} ({adapter.path}) cannot be read: {exc}") from exc
    loaded = pipe.get_list_adapters().get("transformer", [])
    if adapter.name not in loaded:
        raise AdapterError(
            f"LoRA {adapter.name!r} ({adapter.path}) changed no layer of {model_name}'s transformer: "
            "is it a FLUX.2 LoRA?"
        )


def activate(model: LoadedModel, selection: Selection) -> None:
    """Before a batch: switch the model's adapters to the batch's (a model without adapters takes only ())."""
    if model.adapters is not None:
        model.adapters.activate(selection)
    elif selection:
        raise AdapterError(f"{model.spec.path.name} has no LoRA adapters loaded")
