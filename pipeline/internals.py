"""Every use of diffusers' private pipeline API, in one place.

FLUX.2's pipelines keep a few helpers private (`_pack_latents`, `_unpatchify_latents`, `_encode_vae_image`,
`_execution_device`, `_interrupt`). We need them for previews, masks, our own final decode and stopping a batch;
the reference cache needs the transformer's `_get_qkv_projections` and the image processor's
`_resize_to_target_area`; `--attention`, the attention processors' `_attention_backend`; the warm-up of streamed
components, group offloading's name for its prefetch-order hook; block streaming, the group group offloading makes
of a module's parts outside its blocks.
`diffusers` is pinned to the range these were checked against (pyproject.toml); `tests/test_internals.py` fails,
naming the call, when an upgrade moves one of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

import torch
from PIL import Image

from .sizes import MODEL_MULTIPLE

REFERENCE_MAX_PIXELS = 1024 * 1024  # the pipelines resize each reference to at most this area

if TYPE_CHECKING:
    # The defining modules: the top-level `diffusers` namespace is lazy and type checkers see its dummy objects.
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler


class Flux2Pipe(Protocol):
    """What this package uses of a FLUX.2 pipeline: diffusers' `Flux2Pipeline` (dev) and `Flux2KleinPipeline`
    (klein) both match it. The private members are the ones `REQUIRED` lists."""

    vae: AutoencoderKLFlux2
    transformer: Flux2Transformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler
    image_processor: Flux2ImageProcessor
    text_encoder: torch.nn.Module  # Qwen3 (klein) or Mistral 3 (dev)
    tokenizer: Any  # klein: a Qwen2 tokenizer; dev: a PixtralProcessor, whose `.tokenizer` is the tokenizer
    system_message: str  # dev only
    vae_scale_factor: int
    _interrupt: bool
    _attention_kwargs: dict[str, Any] | None

    @property
    def _execution_device(self) -> torch.device: ...

    def _pack_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def _unpatchify_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    # `generator` may be None (diffusers annotates it torch.Generator only).
    def _encode_vae_image(self, image: torch.Tensor, generator: Any) -> torch.Tensor: ...

    def prepare_image_latents(
        self, images: list[torch.Tensor], batch_size: int, generator: Any, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_prompt(
        self, prompt: str | list[str], device: torch.device | None = None, num_images_per_prompt: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def set_progress_bar_config(self, **kwargs: Any) -> None: ...

    def to(self, *args: Any, **kwargs: Any) -> Self: ...

    # LoRA (diffusers' public Flux2LoraLoaderMixin; pipeline/adapters.py)
    def load_lora_weights(self, path: str, adapter_name: str | None = None, **kwargs: Any) -> None: ...

    def get_list_adapters(self) -> dict[str, list[str]]: ...

    def set_adapters(self, adapter_names: list[str], adapter_weights: list[float] | None = None) -> None: ...

    def enable_lora(self) -> None: ...

    def disable_lora(self) -> None: ...

    def fuse_lora(self, *, components: list[str], lora_scale: float, adapter_names: list[str] | None = None) -> Any: ...

    def unload_lora_weights(self) -> None: ...


# (pipeline class name, attribute) pairs this module relies on; the test checks each against installed diffusers.
REQUIRED = tuple(
    (cls, attr)
    for cls in ("Flux2Pipeline", "Flux2KleinPipeline")
    for attr in (
        "_pack_latents",
        "_unpatchify_latents",
        "_encode_vae_image",
        "_execution_device",
        "_interrupt",
        "encode_prompt",
        "image_processor",
        "vae",
        "transformer",
        "scheduler",
        "prepare_image_latents",
        "vae_scale_factor",
    )
)
# Private members of other diffusers objects: (dotted module or class, attribute), checked the same way.
REQUIRED_ELSEWHERE = (
    ("diffusers.models.transformers.transformer_flux2", "_get_qkv_projections"),
    ("diffusers.pipelines.flux2.image_processor.Flux2ImageProcessor", "_resize_to_target_area"),
    ("diffusers.hooks.group_offloading", "_LAZY_PREFETCH_GROUP_OFFLOADING"),
    ("diffusers.hooks.group_offloading", "_GROUP_OFFLOADING"),
    ("diffusers.hooks.group_offloading.ModuleGroup", "_offload_to_memory"),
)


def indexed_device(device: torch.device | str) -> torch.device:
    """`device` with its CUDA index: a bare `cuda` is the current device. diffusers reports an unindexed device as
    the execution device under group offloading, and torch 2.11's memory queries refuse it (on an H100: "Expected a
    torch.device with a specified index")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def prefetch_order_pending(module: torch.nn.Module | None) -> bool:
    """Whether `module` is streamed by diffusers' group offloading with prefetching and its first forward pass,
    which traces the order its groups run in (copying each in the foreground meanwhile), has not run yet."""
    from diffusers.hooks.group_offloading import _LAZY_PREFETCH_GROUP_OFFLOADING

    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(_LAZY_PREFETCH_GROUP_OFFLOADING) is not None


def diffusers_hook_names(module: torch.nn.Module) -> tuple[str, ...]:
    """The names of the hooks diffusers' hook registry holds on `module` (the step cache's, group offloading's...),
    in order; () for none."""
    registry = vars(module).get("_diffusers_hook")  # set on the instance: no nn.Module attribute lookup
    return tuple(getattr(registry, "hooks", {})) if registry is not None else ()


def top_level_offload_group(module: torch.nn.Module) -> Any:
    """The group diffusers' block-level group offloading makes of `module`'s parts outside its block lists (FLUX.2's
    embedders, modulations, final norm and projection; `_apply_group_offloading_block_level`'s "unmatched group"), or
    None. That group has no stream: it is copied synchronously from pageable host memory at every forward and back
    (newly allocated) at its end, whatever the blocks' groups use."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
    return hook.group if hook is not None else None


def offload_groups(module: torch.nn.Module) -> list[Any]:
    """Every group diffusers' group offloading made of `module` and its submodules (each registered on the module
    that leads it, under the same hook name)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    groups = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            groups.append(hook.group)
    return groups


def offload_buffers_too(group: Any) -> bool:
    """Make a streamed group's offload also point its modules' buffers back at their host copies. diffusers 0.42's
    group offloading with streams copies a group's modules' parameters and buffers to the device at onload, but its
    offload (`ModuleGroup._offload_to_memory`, the stream branch) points only the parameters back: the buffers stay
    on the device. True when the group needed it (a stream, and buffers among its modules)."""
    held = [buffer for member in group.modules for buffer in member.buffers()]
    if group.stream is None or not held or getattr(group, "offloads_buffers", False):
        return False
    group._offload_to_memory = partial(_offload_with_buffers, group._offload_to_memory, group, held)
    group.offloads_buffers = True
    return True


def _offload_with_buffers(offload: Callable[[], None], group: Any, held: list[torch.Tensor]) -> None:
    offload()
    for buffer in held:
        buffer.data = group.cpu_param_dict[buffer]


def empty_offload_group(group: Any) -> None:
    """Make a group offloading group move nothing (its onload and offload walk these lists)."""
    group.modules, group.parameters, group.buffers = [], [], []


@dataclass(frozen=True)
class Placed:
    """Where a placed pipeline runs: its execution device and its transformer's and VAE's dtypes."""

    device: torch.device
    transformer_dtype: torch.dtype
    vae_dtype: torch.dtype


_PLACED = "_flux2_placed"  # the pinned `Placed` record, in the pipeline's instance dictionary


def pin_placement(pipe: Flux2Pipe) -> Placed:
    """Once a pipeline is placed (its offloading applied, its components where they stay or where its offload plan
    moves them from), record where it runs, for `execution_device`, `transformer_dtype` and `vae_dtype`.

    diffusers answers each of these by walking every module of the components for offloading or casting hooks:
    `_execution_device` walks all three (klein-4B at full size: ~1,300 modules; ~4 ms a call on this project's
    2-core CPU, ~2 ms on the tiny weights), a model's `dtype` and `device` their own. The runner asked 4 times a
    batch at the stage boundaries, where the device waits for the host. The answers cannot change once placed: under
    this project's plans the VAE, diffusers' fallback, never moves and a streamed component's onload device is fixed;
    under diffusers' own offloads (`--offload model|sequential`) the answer is their hooks' fixed execution device;
    LoRA adapters and `torch.compile` change neither device nor dtype."""
    placed = Placed(pipe._execution_device, pipe.transformer.dtype, pipe.vae.dtype)
    vars(pipe)[_PLACED] = placed
    return placed


def execution_device(pipe: Flux2Pipe) -> torch.device:
    """The device a pipeline's inputs go to (pinned once placed: `pin_placement`)."""
    pinned: Placed | None = vars(pipe).get(_PLACED)
    return pinned.device if pinned is not None else pipe._execution_device


def transformer_dtype(pipe: Flux2Pipe) -> torch.dtype:
    pinned: Placed | None = vars(pipe).get(_PLACED)
    return pinned.transformer_dtype if pinned is not None else pipe.transformer.dtype


def vae_dtype(pipe: Flux2Pipe) -> torch.dtype:
    pinned: Placed | None = vars(pipe).get(_PLACED)
    return pinned.vae_dtype if pinned is not None else pipe.vae.dtype


def pack_latents(pipe: Flux2Pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H*W, C) tokens, row-major, as the transformer reads them."""
    return pipe._pack_latents(latents)


def encode_image_latents(pipe: Flux2Pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) -> the normalized, patchified latents the transformer sees."""
    return pipe._encode_vae_image(pixels, generator=None)


def stop_after_this_step(pipe: Flux2Pipe) -> None:
    """Inside `callback_on_step_end`: the pipeline skips its remaining steps."""
    pipe._interrupt = True


def forget_attention_kwargs(pipe: Flux2Pipe) -> None:
    """After a call: both pipelines keep the call's `attention_kwargs` on `self._attention_kwargs` until the next
    call, which would keep an edit's reference K/V (gigabytes on the device) alive between requests."""
    pipe._attention_kwargs = None


def vae_latents(pipe: Flux2Pipe, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed latent tokens (B, tokens, C) of a `width` x `height` image, row-major (as both pipelines lay out the
    generated image's tokens) -> what the VAE decodes: batch-norm statistics undone, 2x2 patches unfolded."""
    vae = pipe.vae
    batch, _, channels = packed.shape
    rows, cols = height // MODEL_MULTIPLE, width // MODEL_MULTIPLE  # one packed token covers 16 x 16 pixels
    latents = packed.reshape(batch, rows, cols, channels).permute(0, 3, 1, 2)
    running_mean, running_var = vae.bn.running_mean, vae.bn.running_var
    assert running_mean is not None and running_var is not None  # the VAE's batch norm tracks its statistics
    mean = running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(running_var.view(1, -1, 1, 1) + vae.config["batch_norm_eps"]).to(latents.device, latents.dtype)
    return pipe._unpatchify_latents(latents * std + mean)


def qkv_projections(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> Any:
    """A FLUX.2 double-stream attention layer's query, key and value projections (fused or not), image then text,
    as diffusers' own processor computes them."""
    from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


def rotary(tensor: torch.Tensor, frequencies: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """FLUX.2's rotary position embedding on (B, tokens, heads, head_dim)."""
    from diffusers.models.embeddings import apply_rotary_emb

    rotated = apply_rotary_emb(tensor, cast(Any, frequencies), sequence_dim=1)  # diffusers' annotation is too narrow
    return cast(torch.Tensor, rotated)


def attention_dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """diffusers' attention dispatcher (SDPA or the backend chosen with `set_attention_backend`)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, **kwargs)


def pin_attention_backend(module: torch.nn.Module, backend: str) -> int:
    """diffusers' attention `backend` (a name of `AttentionBackendName`) on the processor of every attention layer in
    `module`, as `ModelMixin.set_attention_backend` sets it, but without its last step: that also makes the backend
    the whole process's default (`_AttentionBackendRegistry.set_active_backend`), so every other model in the
    process, and every later one, would run it too. Returns how many processors were set."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = AttentionBackendName(backend)
    pinned = 0
    for layer in module.modules():
        processor = getattr(layer, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = name
            pinned += 1
    return pinned


def reference_tokens(pipe: Flux2Pipe, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed latent tokens (1, tokens, C) and position ids (1, tokens, 4) of reference `images`, exactly as the
    pipelines' `__call__` makes them (each resized to <= 1 MP, sides floored to 16, center-cropped, VAE-encoded;
    image i at time coordinate 10 * (i + 1))."""
    processor = pipe.image_processor
    multiple = pipe.vae_scale_factor * 2
    tensors = []
    for image in images:
        processor.check_image_input(image)
        if image.width * image.height > REFERENCE_MAX_PIXELS:
            image = processor._resize_to_target_area(image, REFERENCE_MAX_PIXELS)
        width, height = (image.width // multiple) * multiple, (image.height // multiple) * multiple
        tensors.append(processor.preprocess(image, height=height, width=width, resize_mode="crop"))
    latents, ids = pipe.prepare_image_latents(
        images=tensors, batch_size=1, generator=None, device=execution_device(pipe), dtype=vae_dtype(pipe)
    )
    return latents, ids
