"""Offload plans by what fits: where each component of a FLUX.2 pipeline lives, decided once at start from the
components' sizes and the device's free memory. A pure function over numbers (`plan_offload`), so every branch
is testable without a GPU; `pipeline/swapping.py` carries a plan out at the runner's stage boundaries.

The plans, from most memory to least (T transformer, E text encoder, V VAE; W the working memory of a stage):

- `resident`: everything on the device. Needs T + E + V + max(W).
- `encoder-swapped`: the transformer and the VAE stay; the text encoder lives in (pinned) host memory and comes
  in only for prompts missing from the prompt-embedding cache, and leaves when the denoise needs the room.
  Needs T + V + max(E + W_encode, W_denoise, W_decode).
- `encoder-streamed`: the transformer and the VAE stay; the text encoder lives in pinned host memory and streams
  through the device weight by weight on a side stream (the next weight prefetched while one runs) for prompts
  missing from the cache. A miss copies the encoder once and nothing else, where `transformer-resident` copies it
  and then the transformer back (on an H100 under 12 GiB, klein-4B: 0.75 s an image against 0.57 s resident).
  Needs T + V + max(E' + W_encode, W_denoise, W_decode), E' = the encoder outside its layers + two layers; the
  room left keeps encoder layers on the device (`resident_blocks`), as `block-streaming` keeps blocks.
- `transformer-resident`: the transformer is the one big component kept whole on the device for every denoise;
  the text encoder shares its room: on a cache miss the transformer steps out for the encoder and is back before
  the denoise starts, then stays through the denoise and the decode (previews, masks, references and the final
  decode use the VAE, which always stays). Needs V + max(E + W_encode, T + W_denoise, T + W_decode).
- `block-streaming`: the transformer does not fit whole: its blocks stream from pinned host memory with the next
  block prefetched on a side stream while one runs (diffusers' group offloading). The text encoder streams
  weight by weight too (swapped whole only when its layers are not known). Needs V + max(E' + W_encode,
  T' + W_denoise, W_decode), T' = the transformer outside its blocks + two blocks, E' likewise or E. The room
  left over keeps as many blocks as it holds on the device for good (`resident_blocks`, by each block's size),
  spread evenly through the blocks' order, so each step copies only the others and each copy
  overlaps the blocks that run before it is needed (klein-4B under 8 GiB on an H100 peaked at 2.6 GiB with every
  block streamed: 2.00 s an image against 0.51 s resident).

Auto picks the first plan that fits; a plan can be forced (with a warning when the estimate says it will not fit).
Nothing fitting at all is refused with the numbers (`DoesNotFit`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

PlanName = Literal["resident", "encoder-swapped", "encoder-streamed", "transformer-resident", "block-streaming"]
PLAN_NAMES: tuple[PlanName, ...] = get_args(PlanName)
Where = Literal["device", "swapped", "streamed"]
Component = Literal["text_encoder", "transformer", "vae"]
COMPONENTS: tuple[Component, ...] = get_args(Component)
Stage = Literal["encode", "denoise", "decode"]
STAGES: tuple[Stage, ...] = get_args(Stage)
# What each stage runs: the text encoder for prompts missing from the cache; the transformer, and the VAE for
# previews, masks and references, in the denoise; the VAE alone for the final decode.
STAGE_NEEDS: dict[Stage, tuple[Component, ...]] = {
    "encode": ("text_encoder",),
    "denoise": ("transformer", "vae"),
    "decode": ("vae",),
}

_GIB = 1024**3
CONTEXT_BYTES = _GIB  # the CUDA context, cuBLAS workspaces and allocator fragmentation, on top of every stage
# Full-resolution 128-channel maps the VAE decoder holds at its peak. Measured on an H200 (klein-4B, bf16, eager,
# docs/PERFORMANCE.md): the peak allocation beyond the 14.87 GiB of weights is 2.43 GiB for a 1024² image (memory
# cap 48 GiB), 9.6 GiB at 2048², 8.1 GiB for 4 images of 1024², 0.73 GiB at 512²: ~2.4 GiB per megapixel per
# image, the decode's (the transformer's activations at 1024² are ~0.1 GiB). The first estimate (4 maps, 1 GiB)
# was 2.4x short.
DECODE_MAPS = 10


class DoesNotFit(Exception):
    """No plan fits the device's free memory; the message gives the smallest plan's need and what is free."""


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of each component in the dtype (or quantization) it will run in, and of the pieces streaming moves."""

    transformer: int
    text_encoder: int
    vae: int
    transformer_block: int = 0  # the largest transformer block (streaming holds two: the running and the next)
    text_encoder_layer: int = 0  # the largest text-encoder layer
    transformer_blocks_bytes: int = 0  # all the blocks together (0: unknown, estimated from the largest)
    transformer_block_sizes: tuple[int, ...] = ()  # each block's bytes in the order they run (empty: unknown)
    text_encoder_layers_bytes: int = 0

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder + self.vae

    def of(self, component: Component) -> int:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}[component]

    def streamed_transformer(self, blocks: int) -> int:
        """Device bytes of the transformer streamed block by block: its parts outside the blocks + two blocks."""
        return _streamed(self.transformer, blocks, self.transformer_block, self.transformer_blocks_bytes)

    def streamed_text_encoder(self, layers: int) -> int:
        return _streamed(self.text_encoder, layers, self.text_encoder_layer, self.text_encoder_layers_bytes)


def _streamed(whole: int, count: int, largest: int, all_blocks: int) -> int:
    if not count:
        return whole
    outside = whole - all_blocks if all_blocks else whole - count * largest
    return max(0, outside) + 2 * largest


@dataclass(frozen=True)
class Working:
    """Working memory of each stage (activations, workspaces) at the size planned for, in bytes."""

    encode: int
    denoise: int
    decode: int


def estimate_working(
    pixels: int = 1024 * 1024,
    *,
    inner_dim: int = 3072,
    text_hidden: int = 2560,
    text_layers: int = 36,
    vocab: int = 151936,
    itemsize: int = 2,
    batch: int = 1,
    text_tokens: int = 512,
) -> Working:
    """Rough working memory of one batch of `batch` images of `pixels`: the transformer's peak activations
    (~16 hidden-sized tensors over the image and text tokens, 16x16 pixels a token), the text encoder's kept
    hidden states and logits, the VAE decoder's full-resolution feature maps (`DECODE_MAPS` of 128 channels);
    every stage adds `CONTEXT_BYTES`."""
    tokens = pixels // 256 + text_tokens
    return Working(
        encode=CONTEXT_BYTES + text_tokens * (text_hidden * (text_layers + 8) + vocab) * itemsize,
        denoise=CONTEXT_BYTES + batch * tokens * inner_dim * 16 * itemsize,
        decode=CONTEXT_BYTES + batch * decode_bytes(pixels, itemsize),
    )


def decode_bytes(pixels: int, itemsize: int) -> int:
    """The VAE decoder's working memory for one image of `pixels` (`DECODE_MAPS` full-resolution maps of 128
    channels): what the planner sizes the decode stage by and what the final decode checks against free memory."""
    return pixels * 128 * DECODE_MAPS * itemsize


@dataclass(frozen=True)
class ComponentPlan:
    component: Component
    where: Where
    device_bytes: int  # what it occupies on the device while it runs (streamed: its resident part + two blocks)
    why: str
    resident_blocks: int = 0  # streamed: its blocks or layers that stay on the device

    def line(self) -> str:
        return f"{self.component}: {self.where} ({self.device_bytes / _GIB:.2f} GiB on the device; {self.why})"


@dataclass(frozen=True)
class OffloadPlan:
    name: PlanName
    components: tuple[ComponentPlan, ...]
    needed_bytes: int  # the estimated peak on the device
    free_bytes: int
    forced: bool = False
    working: Working | None = None  # what the plan was sized for: the swapper's room for prefetches

    def where(self, component: Component) -> Where:
        return next(plan.where for plan in self.components if plan.component == component)

    @property
    def swapped(self) -> tuple[Component, ...]:
        return tuple(plan.component for plan in self.components if plan.where == "swapped")

    @property
    def streamed(self) -> tuple[Component, ...]:
        return tuple(plan.component for plan in self.components if plan.where == "streamed")

    def lines(self) -> list[str]:
        """The start-up log: the verdict, then one line per component (where it lives, bytes, why)."""
        verdict = "fits" if self.needed_bytes <= self.free_bytes else "MAY NOT FIT (forced)"
        how = "forced" if self.forced else "auto"
        head = (
            f"offload plan: {self.name} ({how}: needs ~{self.needed_bytes / _GIB:.2f} GiB, {verdict} in "
            f"{self.free_bytes / _GIB:.2f} GiB free)"
        )
        return [head, *(f"offload plan: {plan.line()}" for plan in self.components)]


def plan_offload(
    sizes: ComponentSizes,
    working: Working,
    free_bytes: int,
    *,
    prompt_cache: bool = True,
    transformer_blocks: int = 0,
    text_encoder_layers: int = 0,
    force: PlanName | None = None,
    quantized: tuple[Component, ...] = (),
) -> OffloadPlan:
    """The first plan that fits `free_bytes` (or the forced one). `transformer_blocks` and `text_encoder_layers`
    count the pieces block streaming moves (0: streaming unavailable). `quantized` components cannot be swapped
    whole (their weights are tensor subclasses): plans that would swap them are passed over. Raises DoesNotFit
    when nothing fits."""
    candidates = [
        _resident(sizes, working, free_bytes),
        _encoder_swapped(sizes, working, free_bytes, prompt_cache),
    ]
    if text_encoder_layers:
        candidates.append(_encoder_streamed(sizes, working, free_bytes, prompt_cache, text_encoder_layers))
    candidates.append(_transformer_resident(sizes, working, free_bytes, prompt_cache))
    if transformer_blocks:
        candidates.append(_block_streaming(sizes, working, free_bytes, transformer_blocks, text_encoder_layers))
    if force is not None:
        if force == "block-streaming" and not transformer_blocks:
            raise DoesNotFit("block-streaming needs the transformer's block count, which is not known here")
        if force == "encoder-streamed" and not text_encoder_layers:
            raise DoesNotFit("encoder-streamed needs the text encoder's layer count, which is not known here")
        chosen = next(plan for plan in candidates if plan.name == force)
        blocked = set(chosen.swapped) & set(quantized)
        if blocked:
            raise DoesNotFit(
                f"{force} swaps the {', '.join(sorted(blocked))}, whose quantized weights cannot be moved tensor by "
                "tensor: use resident, block-streaming, or a plan that keeps it on the device"
            )
        return replace(chosen, forced=True, working=working)
    candidates = [plan for plan in candidates if not set(plan.swapped) & set(quantized)]
    for plan in candidates:
        if plan.needed_bytes <= free_bytes:
            return replace(plan, working=working)
    smallest = min(candidates, key=lambda plan: plan.needed_bytes)
    raise DoesNotFit(
        f"does not fit: even {smallest.name} needs ~{smallest.needed_bytes / _GIB:.2f} GiB "
        f"(weights {sizes.total / _GIB:.2f} GiB; working memory at the planned size "
        f"{max(working.encode, working.denoise, working.decode) / _GIB:.2f} GiB) and "
        f"{free_bytes / _GIB:.2f} GiB is free: quantize the transformer or the text encoder (--quantize), or use "
        "a card with more memory"
    )


def _gib(value: int) -> str:
    return f"{value / _GIB:.2f} GiB"


def _cache_note(prompt_cache: bool) -> str:
    return (
        "only for prompts missing from the prompt-embedding cache"
        if prompt_cache
        else "for every batch: the prompt cache is off"
    )


def _resident(sizes: ComponentSizes, working: Working, free: int) -> OffloadPlan:
    peak = max(working.encode, working.denoise, working.decode)
    needed = sizes.total + peak
    why = f"all weights {_gib(sizes.total)} + working {_gib(peak)} fit"
    parts = tuple(ComponentPlan(c, "device", sizes.of(c), why) for c in COMPONENTS)
    return OffloadPlan("resident", parts, needed, free)


def _encoder_swapped(sizes: ComponentSizes, working: Working, free: int, prompt_cache: bool) -> OffloadPlan:
    needed = sizes.transformer + sizes.vae + max(sizes.text_encoder + working.encode, working.denoise, working.decode)
    stays = "stays: never moves"
    parts = (
        ComponentPlan(
            "text_encoder",
            "swapped",
            sizes.text_encoder,
            f"pinned host memory, brought in {_cache_note(prompt_cache)}; leaves when the denoise needs the room",
        ),
        ComponentPlan("transformer", "device", sizes.transformer, stays),
        ComponentPlan("vae", "device", sizes.vae, f"{stays} (previews, masks, references and decodes)"),
    )
    return OffloadPlan("encoder-swapped", parts, needed, free)


def _encoder_streamed(
    sizes: ComponentSizes, working: Working, free: int, prompt_cache: bool, layers: int
) -> OffloadPlan:
    encoder = sizes.streamed_text_encoder(layers)
    needed = sizes.transformer + sizes.vae + max(encoder + working.encode, working.denoise, working.decode)
    # The room left (less a 4 MP denoise's) keeps encoder layers on the device: fewer to copy on every miss.
    resident = resident_blocks(spare_room(free, needed, working), (sizes.text_encoder_layer,) * layers)
    kept = resident * sizes.text_encoder_layer
    stays = "stays: never moves"
    parts = (
        ComponentPlan(
            "text_encoder",
            "streamed",
            encoder + kept,
            (
                f"{resident} of its {layers} layers stay on the device (spread evenly through those the encode runs), "
                "the others in "
                if resident
                else ""
            )
            + f"pinned host memory, streamed weight by weight {_cache_note(prompt_cache)}, the next weight "
            "prefetched on a side stream while one runs",
            resident_blocks=resident,
        ),
        ComponentPlan("transformer", "device", sizes.transformer, stays),
        ComponentPlan("vae", "device", sizes.vae, f"{stays} (previews, masks, references and decodes)"),
    )
    return OffloadPlan("encoder-streamed", parts, needed + kept, free)


def _transformer_resident(sizes: ComponentSizes, working: Working, free: int, prompt_cache: bool) -> OffloadPlan:
    needed = sizes.vae + max(
        sizes.text_encoder + working.encode,
        sizes.transformer + working.denoise,
        sizes.transformer + working.decode,
    )
    parts = (
        ComponentPlan(
            "text_encoder",
            "swapped",
            sizes.text_encoder,
            f"pinned host memory, brought in {_cache_note(prompt_cache)}, in the transformer's room",
        ),
        ComponentPlan(
            "transformer",
            "swapped",
            sizes.transformer,
            "whole on the device for every denoise and decode; steps out only for the text encoder",
        ),
        ComponentPlan("vae", "device", sizes.vae, "stays, so previews, masks and decodes never evict the transformer"),
    )
    return OffloadPlan("transformer-resident", parts, needed, free)


def _block_streaming(sizes: ComponentSizes, working: Working, free: int, blocks: int, layers: int) -> OffloadPlan:
    transformer = sizes.streamed_transformer(blocks)
    # The encoder streams whenever its layers are known: a prompt-cache miss then copies only the layers the
    # encode runs (pipeline/encoder_depth.py) and never needs the encoder's whole size free, which leaves that room
    # to resident transformer blocks, used at every step.
    encoder_whole = not layers
    encoder = sizes.text_encoder if encoder_whole else sizes.streamed_text_encoder(layers)
    needed = sizes.vae + max(encoder + working.encode, transformer + working.denoise, working.decode)
    block_sizes = sizes.transformer_block_sizes
    if len(block_sizes) != blocks:  # unknown: each block counted at the largest's size
        block_sizes = (sizes.transformer_block,) * blocks
    resident = resident_blocks(spare_room(free, needed, working), block_sizes)
    resident_bytes = sum(block_sizes[index] for index in spread(blocks, resident))
    encoder_plan = (
        ComponentPlan(
            "text_encoder", "swapped", encoder, "pinned host memory, brought in whole for prompt-cache misses"
        )
        if encoder_whole
        else ComponentPlan(
            "text_encoder",
            "streamed",
            encoder,
            f"does not fit whole ({_gib(sizes.text_encoder)}): {layers} layers streamed from pinned host memory",
        )
    )
    parts = (
        encoder_plan,
        ComponentPlan(
            "transformer",
            "streamed",
            transformer + resident_bytes,
            f"does not fit whole ({_gib(sizes.transformer)}): "
            + (
                f"{resident} of its {blocks} blocks stay on the device (spread evenly), the other {blocks - resident}"
                if resident
                else f"{blocks} blocks"
            )
            + " streamed from pinned host memory, the next prefetched on a side stream while one runs",
            resident_blocks=resident,
        ),
        ComponentPlan("vae", "device", sizes.vae, "stays (previews, masks, references and decodes)"),
    )
    return OffloadPlan("block-streaming", parts, needed + resident_bytes, free)


def spare_room(free: int, needed: int, working: Working) -> int:
    """What a streamed plan needing `needed` of `free` bytes leaves for resident blocks or layers. The plans are
    sized at 1024²; a 4 MP image's denoise holds ~4x the tokens (its decode is tiled to the free memory at run
    time): that much stays free."""
    return free - needed - 3 * max(0, working.denoise - CONTEXT_BYTES)


def resident_blocks(room: int, block_sizes: tuple[int, ...]) -> int:
    """How many blocks or layers (`block_sizes`, in the order they run) stay on the device in `room` bytes left
    over by a streamed plan, chosen where `spread` puts them: the most whose bytes fit, at most all
    but two (streaming holds two anyway)."""
    count = len(block_sizes)
    if room <= 0 or count <= 2:
        return 0
    kept = 0
    for chosen in range(1, count - 1):
        if sum(block_sizes[index] for index in spread(count, chosen)) > room:
            break
        kept = chosen
    return kept


def spread(count: int, chosen: int) -> list[int]:
    """`chosen` of `count` positions, spread evenly (each in the middle of its share): 2 of 10 -> [2, 7]."""
    chosen = max(0, min(chosen, count))
    return [(2 * index + 1) * count // (2 * chosen) for index in range(chosen)]
