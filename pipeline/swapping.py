"""Carrying out an offload plan (`pipeline/offload_plan.py`): the components that move live in host memory
(pinned where CUDA is available, so copies run at full speed and asynchronously), move as whole tensors with
non-blocking copies on a side CUDA stream, and the next stage's component is prefetched, as much of it as the
room allows, while the current stage runs. Block streaming of a transformer (or text encoder) that does not fit
whole is diffusers' group offloading with streams (`stream_blocks`): block i+1 is prefetched while block i runs.

The runner calls `Swapper.enter(stage)` at its stage boundaries (text encode, denoise, decode), never inside the
denoise: previews, masks, reference encodes and the final decode use the VAE, which every plan keeps on the
device, so nothing evicts the transformer mid-denoise.

An evicted weight is an empty tensor on the device: any use of a component while it is out fails loudly instead
of computing on stale or host data. On a CPU the device and the host are the same memory; the moves still happen
(host copy <-> empty placeholder), so the order of moves is tested without a GPU."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .encoder_depth import decoder_owner
from .flat_weights import flatten_weights
from .internals import (
    empty_offload_group,
    indexed_device,
    offload_buffers_too,
    offload_groups,
    top_level_offload_group,
)
from .offload_plan import STAGE_NEEDS, STAGES, Component, OffloadPlan, Stage, spread

log = logging.getLogger("flux2.swapping")

# The swapped components each plan keeps on the device during each stage; a swapped component outside its
# stage's set is evicted when that stage is entered. A stage the runner skips (the text encode on a prompt-cache
# hit) moves nothing, so the transformer of `transformer-resident` stays from one batch to the next.
_RESIDENCY: dict[str, dict[Stage, frozenset[Component]]] = {
    "encoder-swapped": {"encode": frozenset({"text_encoder"}), "denoise": frozenset(), "decode": frozenset()},
    "transformer-resident": {
        "encode": frozenset({"text_encoder"}),
        "denoise": frozenset({"transformer"}),
        "decode": frozenset({"transformer"}),
    },
    "block-streaming": {"encode": frozenset({"text_encoder"}), "denoise": frozenset(), "decode": frozenset()},
}


@dataclass
class Moves:
    """What moved, for the log and the tests: one entry per move, "stage: action component (bytes)"."""

    events: list[str] = field(default_factory=list)
    loads: int = 0
    evictions: int = 0
    prefetched_bytes: int = 0
    loaded_bytes: int = 0

    def add(self, stage: Stage, action: str, component: Component, size: int) -> None:
        self.events.append(f"{stage}: {action} {component} ({size} bytes)")


class _Weights:
    """One swapped component's parameters: their host copies and which are on the device. Buffers (small: rotary
    tables, norms' statistics) stay on the device."""

    def __init__(self, module: torch.nn.Module, device: torch.device, pin: bool):
        self.module = module
        self.device = device
        for buffer_module in module.modules():
            for name, buffer in buffer_module.named_buffers(recurse=False):
                buffer_module._buffers[name] = buffer.to(device)
        self.params = _parameters(module)
        arena = HostArena(pin)
        self.host: list[torch.Tensor] = []
        for param in self.params:  # one at a time, so the host holds each weight once plus one arena's worth
            self.host.append(arena.copy_of(param.data))
            param.data = _placeholder(param.data, device)
        self.pinned_bytes, self.host_allocations = arena.allocated_bytes, arena.allocations
        self.on_device = [False] * len(self.params)
        self.sizes = [copy.numel() * copy.element_size() for copy in self.host]

    @property
    def loaded(self) -> bool:
        return all(self.on_device)

    @property
    def device_bytes(self) -> int:
        return sum(size for size, here in zip(self.sizes, self.on_device, strict=True) if here)

    def load(self, budget: int | None, stream: Any) -> int:
        """Copy parameters to the device in module order, all of them or up to `budget` bytes; the bytes moved."""
        moved = 0
        if stream is not None:  # the copies start after the compute stream's work so far (evictions included)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        for index, (param, host, size) in enumerate(zip(self.params, self.host, self.sizes, strict=True)):
            if self.on_device[index]:
                continue
            if budget is not None and moved + size > budget:
                break
            param.data = _to_device(host, self.device, stream)
            self.on_device[index] = True
            moved += size
        return moved

    def evict(self) -> int:
        freed = self.device_bytes
        for index, param in enumerate(self.params):
            if self.on_device[index]:
                param.data = _placeholder(param.data, self.device)
                self.on_device[index] = False
        return freed


class Swapper:
    """Moves a pipeline's swapped components at stage boundaries, as `plan` says; `moves` records every move."""

    def __init__(self, pipe: Any, plan: OffloadPlan, device: torch.device | str):
        self.plan = plan
        self.device = torch.device(device)
        self.working = plan.working
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        self.weights: dict[Component, _Weights] = {}
        for name in plan.swapped:
            started = time.perf_counter()
            weights = self.weights[name] = _Weights(getattr(pipe, name), self.device, pin=cuda)
            log.info(
                "swapper: %s in %s host memory, %.2f GiB in %d buffer(s), in %.1f s",
                name,
                "pinned" if cuda else "plain",
                weights.pinned_bytes / 1024**3,
                weights.host_allocations,
                time.perf_counter() - started,
            )
        self.residency = _RESIDENCY.get(plan.name, {stage: frozenset() for stage in STAGES})
        self.stage: Stage | None = None
        self.moves = Moves()
        self._device_bytes = {part.component: part.device_bytes for part in plan.components}

    def where(self, component: Component) -> str:
        """ "device", "partial" (part prefetched), "host" for a swapped component; else the plan's placement."""
        weights = self.weights.get(component)
        if weights is None:
            return self.plan.where(component)
        return "device" if weights.loaded else "partial" if weights.device_bytes else "host"

    def enter(self, stage: Stage) -> None:
        """Evict what `stage` does not keep, bring in what it needs (waiting for its copies), then prefetch what
        the next stage needs into the room left."""
        self.stage = stage
        keep = self.residency[stage]
        for name, weights in self.weights.items():
            if name not in keep and weights.device_bytes:
                freed = weights.evict()
                self.moves.evictions += 1
                self.moves.add(stage, "evict", name, freed)
        for name in STAGE_NEEDS[stage]:
            needed = self.weights.get(name)
            if needed is not None and not needed.loaded:
                moved = needed.load(None, self.stream)
                self.moves.loads += 1
                self.moves.loaded_bytes += moved
                self.moves.add(stage, "load", name, moved)
        self._wait_for_copies()
        self._prefetch(stage)

    def _prefetch(self, stage: Stage) -> None:
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else None
        if following is None:
            return
        for name in self.residency[following] - self.residency[stage]:
            weights = self.weights[name]
            room = self._room(stage)
            if weights.loaded or room <= 0:
                continue
            moved = weights.load(room, self.stream)
            if moved:
                self.moves.prefetched_bytes += moved
                self.moves.add(stage, "prefetch", name, moved)

    def _room(self, stage: Stage) -> int:
        """Bytes free on the device during `stage` by the plan's estimate: free memory less what is on the device
        and the stage's working memory."""
        if self.working is None:
            return 0
        working = {"encode": self.working.encode, "denoise": self.working.denoise, "decode": self.working.decode}
        fixed = sum(size for name, size in self._device_bytes.items() if name not in self.weights)
        moving = sum(weights.device_bytes for weights in self.weights.values())
        return self.plan.free_bytes - fixed - moving - working[stage]

    def _wait_for_copies(self) -> None:
        """The compute stream waits for every copy issued so far (a prefetch included) before using the weights."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def stream_blocks(
    module: torch.nn.Module,
    device: torch.device | str,
    *,
    text_encoder: bool = False,
    resident_blocks: int = 0,
    reach: int | None = None,
) -> None:
    """Streaming through diffusers' group offloading: the weights live in pinned host memory and are copied on a
    side stream, the next group prefetched while one runs. A transformer streams block by block (its
    ModuleLists), its other parts on the device for good (`_keep_outside_blocks`). A text encoder streams weight
    by weight (leaf level): its layers sit two levels down (Qwen3ForCausalLM.model.layers, Mistral3's
    model.language_model.layers), and diffusers' block level reaches them only through `block_modules`, whose
    recursion gives each level its own prefetch-order hook; with streams the outer one then registers its
    tracker on modules the inner one already tracks and fails ("Hook with name layer_execution_tracker already
    exists", on an H100 under an 8 GiB cap; `test_streaming_options_register_with_streams`). Leaf level has one
    such hook for the whole encoder, keeps a tied embedding and output head right (each its own group), and
    never brings in what the text encode does not run (dev's vision tower, the layers above the deepest one
    read). On a CPU the same hooks run without a stream (nothing to overlap). Quantized weights stream as their
    plain inner tensors (`flat_weights.flatten_weights`), rebuilt where the layers read them.

    `resident_blocks` of the blocks (of the encoder's layers: among its first `reach`, the ones the encode runs),
    spread evenly through their order (`spread`), go to the device for good instead and are left out of the
    offloading, so each pass copies only the others and each copy overlaps the resident ones that run before it
    is needed (diffusers' lazy prefetch chains the streamed groups in the order they run)."""
    from diffusers.hooks.group_offloading import apply_group_offloading

    device = indexed_device(device)  # diffusers reports the onload device as the execution device
    cuda = device.type == "cuda"
    held = flatten_weights(module)  # quantized weights as plain tensors: pipeline/flat_weights.py says why
    if held:
        log.info("offload: %s streams %d quantized weights as plain tensors", type(module).__name__, held)
    lists = _block_lists(module, text_encoder) if resident_blocks else []
    blocks = [block for _, _, blocks_of in lists for block in blocks_of]
    candidates = len(blocks) if reach is None else min(reach, len(blocks))
    staying = [blocks[index] for index in spread(candidates, resident_blocks)]
    for owner, name, blocks_of in lists:  # offloading sees only the streamed ones
        setattr(owner, name, torch.nn.ModuleList([b for b in blocks_of if not any(b is s for s in staying)]))
    try:
        # Packed into a few pinned buffers first: diffusers then finds each weight pinned and keeps it as its host
        # copy instead of pinning a copy of its own, weight by weight (HostArena says why that is slow and large).
        # (A transformer's parts outside its blocks stay on the device: `_keep_outside_blocks`, not packed.)
        streamed: list[torch.nn.Module] = [module] if text_encoder else [child for _, child in _lists_of(module)]
        arena = pack_on_host(streamed, pin=torch.cuda.is_available())
        log.info(
            "offload: %s streamed from %.2f GiB of %shost memory in %d buffer(s)",
            type(module).__name__,
            arena.allocated_bytes / 1024**3,
            "pinned " if arena.pin else "",
            arena.allocations,
        )
        apply_group_offloading(
            module,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level" if text_encoder else "block_level",
            num_blocks_per_group=None if text_encoder else 1,
            non_blocking=cuda,
            use_stream=cuda,
            record_stream=cuda,
            low_cpu_mem_usage=False,  # pin every weight once at start, not at every copy
        )
    finally:
        for owner, name, blocks_of in lists:
            setattr(owner, name, blocks_of)
    mended = return_buffers_at_offload(module)
    if mended:
        log.info("offload: %s: %d streamed groups hand their buffers back at offload", type(module).__name__, mended)
    for block in staying:
        block.to(device)
    if not text_encoder:
        kept = _keep_outside_blocks(module, device)
        log.info("offload: %s keeps %.2f GiB outside its blocks on the device", type(module).__name__, kept / 1024**3)


def return_buffers_at_offload(module: torch.nn.Module) -> int:
    """Each streamed group of `module` hands its buffers back to their host copies at offload, as its parameters
    (`internals.offload_buffers_too`: diffusers' stream branch leaves buffers on the device, each pass adding more).
    Streamed quantized weights are buffers (`flat_weights`), so dev under a 24 GiB cap (H200, fp8) filled the card
    with the text encoder's layers after 12 of them: 6.7 GiB of onloaded copies live at the first out-of-memory,
    12.3 GiB with 6 GiB more room. Returns the number of groups mended."""
    return sum(offload_buffers_too(group) for group in offload_groups(module))


def _keep_outside_blocks(module: torch.nn.Module, device: torch.device) -> int:
    """Block-level offloading puts the module's parts outside its block lists in a group of their own that diffusers
    copies without a stream, synchronously, from pageable memory at every forward, and back to newly allocated host
    memory at its end (`internals.top_level_offload_group`): for FLUX.2's transformer its embedders, modulations and
    final layers, 0.4 GB for klein-4B and 1.6 GB for dev, at every denoising step. They are on the device during
    every forward anyway (the planner counts them there: `offload_plan._streamed`), so they stay there instead:
    moved for good and the group emptied. Returns their bytes."""
    group = top_level_offload_group(module)
    if group is None:
        return 0
    modules: list[torch.nn.Module] = list(group.modules)
    tensors: list[torch.Tensor] = [*group.parameters, *group.buffers]
    size = sum(t.numel() * t.element_size() for t in [*tensors, *(t for m in modules for t in _tensors_of(m))])
    _settle(modules, tensors, device)
    empty_offload_group(group)
    return size


def _settle(modules: list[torch.nn.Module], tensors: list[torch.Tensor], device: torch.device) -> None:
    """Move `modules` (as modules: quantized weights move whole) and loose `tensors` to `device` for good."""
    for module in modules:
        module.to(device)
    for tensor in tensors:
        tensor.data = tensor.data.to(device)


def _block_lists(
    module: torch.nn.Module, text_encoder: bool
) -> list[tuple[torch.nn.Module, str, torch.nn.ModuleList | torch.nn.Sequential]]:
    """(owner, attribute, list) of the blocks that can stay: a transformer's lists of blocks, as diffusers'
    block-level offloading finds them (direct children), in order; a text encoder's decoder layers."""
    if text_encoder:
        found = decoder_owner(module)
        return [] if found is None else [(found[0], "layers", found[1])]
    return [(module, name, child) for name, child in _lists_of(module)]


def _lists_of(module: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList | torch.nn.Sequential]]:
    """A module's lists of blocks, as diffusers' block-level offloading finds them (direct children), in order."""
    return [
        (name, child)
        for name, child in module.named_children()
        if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential)
    ]


def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def pack_on_host(modules: list[torch.nn.Module], pin: bool) -> HostArena:
    """Every plain weight and buffer of `modules` moved into one `HostArena` (pinned with `pin`): each tensor's data
    becomes a view into the arena's buffers (tied weights stay tied: they are one parameter). Other tensor types
    are left where they are, to diffusers' own pinning; torchao's quantized weights are plain tensors by now
    (`stream_blocks`)."""
    arena = HostArena(pin)
    for tensor in dict.fromkeys(t for m in modules for t in _tensors_of(m)):
        if type(tensor.data) is torch.Tensor:
            tensor.data = arena.copy_of(tensor.data)  # one at a time: the old copy is freed as the next is made
    return arena


def _parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(module.parameters())  # tied parameters (embeddings = lm_head) once


class HostArena:
    """Host copies of weights packed into a few large (pinned) buffers instead of one allocation per weight.

    Pinning weight by weight (`tensor.pin_memory()`) makes one page-locked allocation per tensor through torch's
    caching host allocator, which rounds each up to a power of two: hundreds of slow cudaHostAlloc calls and up to
    twice the bytes for a component. Under a 12 GiB cap on an H200, placing klein-4B's two swapped components that
    way did not finish in 55 s. Here weights are copied into buffers of `CHUNK_BYTES` (or one weight's size, when
    larger), each weight a view at an aligned offset: a handful of allocations, the host holding at most one
    buffer's worth beyond the weights during the move."""

    CHUNK_BYTES = 1024**3
    ALIGN = 256  # bytes: every view starts aligned for any dtype and for fast copies

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self.used = 0
        self.allocated_bytes = 0
        self.allocations = 0

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` (same dtype and shape, contiguous) inside the arena."""
        size = tensor.numel() * tensor.element_size()
        if self.buffer is None or self.used + size > self.buffer.numel():
            length = max(self.CHUNK_BYTES, size)
            self.buffer = torch.empty(length, dtype=torch.uint8, pin_memory=self.pin)
            self.used = 0
            self.allocated_bytes += length
            self.allocations += 1
        view = self.buffer[self.used : self.used + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        self.used += -(-size // self.ALIGN) * self.ALIGN
        return view


def _placeholder(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=tensor.dtype, device=device)


def _to_device(host: torch.Tensor, device: torch.device, stream: Any) -> torch.Tensor:
    if stream is None:
        return host.to(device)  # a CPU: the host copy itself
    # Allocated on the compute stream (which frees it later), filled on the side stream; record_stream keeps the
    # allocator from reusing the block before the copy is done.
    target = torch.empty(host.shape, dtype=host.dtype, device=device)
    with torch.cuda.stream(stream):
        target.copy_(host, non_blocking=True)
    target.record_stream(stream)
    return target


def check_swappable(module: torch.nn.Module, component: Component) -> None:
    """Quantized weights are tensor subclasses whose data cannot be swapped tensor by tensor: refuse them here,
    with the way out, rather than fail mid-request."""
    for param in module.parameters():
        if type(param.data) is not torch.Tensor:
            raise ValueError(
                f"{component} has quantized weights ({type(param.data).__name__}), which the swapper cannot move "
                "tensor by tensor: keep it on the device (--offload encoder-swapped or resident) or stream it "
                "(--offload block-streaming)"
            )
