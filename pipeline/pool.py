"""The models an engine serves: configured up front, loaded on first use, evicted least-recently-used when the
device's memory would overflow (or beyond `max_loaded`). Only the engine's worker thread calls `get`."""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import Adapters
from .loader import LoadedModel, load_model
from .placement import Device, Placement
from .stream_warm_up import warm_up_streams
from .weights import ModelSpec

log = logging.getLogger("flux2.pool")

_GIB = 1024**3
_MARGIN_BYTES = 2 * _GIB


@dataclass(frozen=True)
class ModelConfig:
    name: str
    spec: ModelSpec
    placement: Placement
    weight_bytes: int  # in the dtype it will run in
    adapters: Adapters = field(default_factory=Adapters)  # LoRAs loaded with it


def free_memory_bytes(device: Device) -> int:
    """What can still be allocated on `device`: free CUDA memory, or available RAM for the CPU."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def settle_heap() -> None:
    """After a model is loaded and warmed up: collect, then move every object left into the permanent generation
    (`gc.freeze`), out of the cyclic collector's walks. With torch, diffusers and transformers imported and a model
    loaded, the heap holds about half a million objects (a tiny klein: ~500,000, a full collection of them 225 ms
    on this project's 2-core CPU; compiled, ~700,000 and 366 ms: Dynamo's guards and bytecode, Inductor's graphs).
    Python runs a full collection whenever enough new objects outlived the younger generations, inside whichever
    request is running then (on the CPU no full collection fell inside ~90 timed requests of a compiled tiny klein,
    frozen or not; the eighth GPU round's slow first image, first suspected, was slow again with the heap frozen in
    the ninth, and turned out to have run without its step graphs: the bench's doing). Frozen objects are still
    freed by their reference counts; only cycles among them wait for `release_device_memory`. vLLM freezes its
    start-up heap the same way."""
    gc.collect()
    gc.freeze()


def release_device_memory() -> None:
    """After a model is evicted (or a batch ran out of memory): the frozen heap thawed (the evicted model's cycles
    become collectable), collected, the survivors frozen again, and the CUDA cache emptied."""
    gc.unfreeze()
    settle_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelPool:
    def __init__(
        self,
        configs: list[ModelConfig],
        *,
        max_loaded: int = 0,
        load: Callable[[ModelSpec, Placement, Adapters], LoadedModel] = load_model,
        free_bytes: Callable[[Device], int] = free_memory_bytes,
    ):
        if not configs:
            raise ValueError("at least one model must be configured")
        self.configs = {config.name: config for config in configs}
        self.default = configs[0].name
        self.max_loaded = max_loaded
        self._load = load
        self._free_bytes = free_bytes
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self.on_evict: Callable[[str], None] | None = None

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def loaded_models(self) -> list[LoadedModel]:
        """The models in memory (the worker's view: call it on the worker)."""
        return list(self._loaded.values())

    def get(self, name: str | None = None) -> LoadedModel:
        name = name or self.default
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        config = self.configs[name]
        self._make_room(config)
        log.info("model %s: loading %s", name, config.spec.path)
        model = self._load(config.spec, config.placement, config.adapters)
        warm_up_streams(model)
        self._loaded[name] = model
        settle_heap()
        return model

    def _make_room(self, config: ModelConfig) -> None:
        while self._loaded:
            too_many = self.max_loaded and len(self._loaded) >= self.max_loaded
            needed = config.weight_bytes + _MARGIN_BYTES
            too_big = config.placement.offload == "resident" and needed > self._free_bytes(config.placement.device)
            if not (too_many or too_big):
                return
            evicted, _ = self._loaded.popitem(last=False)
            log.info("model %s: evicted (least recently used) to make room for %s", evicted, config.name)
            if self.on_evict is not None:
                self.on_evict(evicted)
            release_device_memory()
