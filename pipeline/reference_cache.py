"""Reference K/V caching (`--reference-cache on`): the reference images' keys and values are computed once per
batch, in one transformer pass over the reference tokens alone, and every denoising step attends to them without
carrying the reference tokens through the blocks.

What this changes (docs/PERFORMANCE.md, "Reference tokens"): in FLUX.2's own edit path the reference tokens sit in
the image stream, are modulated with the current timestep and attend to the text and the noisy image, so their keys
and values change every step and nothing of them can be reused exactly. Caching them needs the semantics of
diffusers' `Flux2KleinKVPipeline` (the FLUX.2 klein KV checkpoints are trained for it): reference tokens modulated
at timestep 0 and attending only to themselves. Under those semantics their K/V depend on the reference images
alone, and this module reproduces that pipeline's output. For a checkpoint not trained that way the images differ
from the uncached edit by design.

How: `install` puts our attention processors on every block (once, at load; they behave as diffusers' own when no
cache is given). `prefill` runs each distinct reference set once through the transformer at timestep 0 with no text,
the processors recording every layer's post-RoPE keys and values. The pipeline is then called as for a generation,
with `attention_kwargs={"reference_kv": cache}`: each layer appends the batch rows' reference K/V to its own keys
and values. Hooks on the transformer hand each call's references to the processors as tensors and take them back
after it, so under `--compile` the blocks trace them like any input: one graph for every layer, no graph break
(a tiny klein's compile warm-up with the edit graphs: 10 graphs in 29 s on this project's CPU, 26 in 60 s with
the attention left outside the compiled blocks). Rows may have different references (per-row caches; rows with
fewer reference tokens are masked). One copy of each distinct set's K/V is kept for the batch: per layer,
(reference tokens x heads x head_dim) keys and values, about 5 GB for 4 references of 1024² on klein-4B in bf16
(diffusers' KV pipeline keeps one per row).

Across requests (`ReferenceStore`, `--reference-memory`): under these semantics a set's K/V depend only on its images
(in order), the weights with their active LoRA adapters and, for dev, the guidance; recent sets are kept on the
device, keyed by exactly that, so an edit that repeats a set skips its VAE encode and pass. A hit is the same
tensors a miss computes, so the images are identical."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from PIL import Image

from .attention import backend_for
from .internals import (
    Flux2Pipe,
    attention_dispatch,
    execution_device,
    qkv_projections,
    reference_tokens,
    rotary,
    transformer_dtype,
)
from .lru import LRU

ATTENTION_KWARG = "reference_kv"

# Per attention layer ("double.3", "single.17"), a reference set's post-RoPE keys and values, each
# (1, tokens, heads, head_dim).
Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ReferenceStore(LRU[Hashable, Layers]):
    """Recent reference sets' K/V, on the device, at most `capacity` bytes (0: none kept), least recently used
    evicted first. Keys: (the references' digests in order, the active adapters, the guidance when the transformer
    embeds it); the store belongs to one loaded model."""

    def __init__(self, capacity: int):
        super().__init__(capacity, _layers_bytes)

    def release(self, size: int) -> bool:
        """Drop the least recently used sets until `size` bytes are freed (for the decode); whether any was."""
        return self.evict(size) > 0

    def clear(self) -> int:
        """Forget every set (after running out of device memory: the memory goes back to the batch); the bytes
        they held."""
        held = self.size
        self.drop()
        return held


def _layers_bytes(layers: Layers) -> int:
    return sum(tensor.numel() * tensor.element_size() for pair in layers.values() for tensor in pair)


class ReferenceKV:
    """Per attention layer, the reference keys and values of each distinct reference set, and which set each batch
    row uses. One copy per set is kept (rows sharing a set share it); each attention appends its rows' references
    to the step's own keys and values."""

    def __init__(self, sets: list[Layers], rows: list[int], reused: int = 0):
        self.sets = sets  # per distinct reference set: layer -> (key, value)
        self.rows = rows  # the set of each batch row
        self.reused = reused  # how many of the sets came from a ReferenceStore instead of a pass
        self.lengths = [next(iter(sets[index].values()))[0].shape[1] for index in rows]
        self.uses = 0  # transformer calls that attended to these references (for tests)
        self._mask: torch.Tensor | None = None

    def layer(self, layer: str) -> LayerReference:
        """What layer `layer`'s attention appends in a step: the one set every row uses, or each row's (padded to the
        longest in the attention, with the mask of each row's real tokens when their lengths differ)."""
        if len(set(self.rows)) == 1:
            key, value = self.sets[self.rows[0]][layer]
            return (key,), (value,), None
        keys, values = zip(*(self.sets[index][layer] for index in self.rows), strict=True)
        longest = max(self.lengths)
        if self._mask is None and min(self.lengths) != longest:  # rows with fewer tokens must not attend to padding
            device = keys[0].device
            self._mask = torch.ones((len(self.rows), 1, 1, longest), dtype=torch.bool, device=device)
            for row, length in enumerate(self.lengths):
                self._mask[row, :, :, length:] = False
        return tuple(keys), tuple(values), self._mask


# One layer's references for a step, as the attention reads them (`ReferenceKV.layer`): the keys and values of
# one set for every row, or of each row (1, tokens, heads, head_dim), and each row's real reference tokens
# (batch, 1, 1, longest) when their lengths differ. Tensors only: traced under --compile, a layer's name or a
# dict keyed by it would be a guard, and every layer would need its own graph.
LayerReference = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor | None]


def with_references(
    key: torch.Tensor, value: torch.Tensor, reference: LayerReference
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The step's keys and values with each row's references appended, and the attention mask (None when every
    row has as many reference tokens)."""
    keys, values, tail = reference
    batch, tokens = key.shape[:2]
    if len(keys) == 1:  # one set for every row: a broadcast view, no copy
        ref_key, ref_value = keys[0].expand(batch, -1, -1, -1), values[0].expand(batch, -1, -1, -1)
    else:
        longest = max(part.shape[1] for part in keys)
        ref_key = torch.cat([_padded(part, longest) for part in keys])
        ref_value = torch.cat([_padded(part, longest) for part in values])
    mask = None
    if tail is not None:
        mask = torch.cat([tail.new_ones((batch, 1, 1, tokens)), tail], dim=-1)
    return torch.cat([key, ref_key.to(key.dtype)], dim=1), torch.cat([value, ref_value.to(value.dtype)], dim=1), mask


def _padded(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[1]
    if not missing:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((1, missing, *tensor.shape[2:]))], dim=1)


class _Recorder:
    """Handed to the processors during the prefill: each keeps its layer's keys and values, collected after."""


class _ReferenceAttention:
    """Shared by the two processors: attention with recorded or cached reference K/V, else diffusers' own.

    The references reach each processor as tensors on itself (`reference`, `recorded`), set and cleared around
    every transformer call by the hooks `install` puts on the transformer: traced under --compile, the processor's
    per-layer name or a dict keyed by it would be a guard, so every layer would need its own graph (past the
    recompile limit, the blocks ran eager: seen on an H200); tensors are guarded by their shapes, and one graph
    serves every layer."""

    # Read and set by diffusers' `set_attention_backend` / context parallelism, as on its own processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: str):
        self.layer = layer
        self.reference: LayerReference | None = None  # during an edit step's transformer call
        self.recording = False  # during a prefill's transformer call
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        reference_kv: ReferenceKV | _Recorder | None,
    ) -> torch.Tensor:
        if self.recording:  # the prefill has no text: all the tokens are references
            self.recorded = (key.clone(), value.clone())
        elif self.reference is not None:
            key, value, attention_mask = with_references(key, value, self.reference)
        return self._dispatch(query, key, value, attention_mask)

    def _dispatch(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return attention_dispatch(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=backend_for(self._attention_backend, attention_mask is not None),
            parallel_config=self._parallel_config,
        )


class ReferenceAttnProcessor(_ReferenceAttention):
    """diffusers' `Flux2AttnProcessor` (double-stream blocks) with the reference K/V."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_kv: ReferenceKV | _Recorder | None = None,
    ) -> Any:
        query, key, value, encoder_query, encoder_key, encoder_value = qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            assert encoder_hidden_states is not None  # the double-stream blocks always carry the text
            query = torch.cat([attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            query = rotary(query, image_rotary_emb)
            key = rotary(key, image_rotary_emb)
        hidden_states = self.attend(query, key, value, attention_mask, reference_kv)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden_states))
        text, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        return attn.to_out[1](attn.to_out[0](hidden_states)), attn.to_add_out(text)


class ReferenceParallelAttnProcessor(_ReferenceAttention):
    """diffusers' `Flux2ParallelSelfAttnProcessor` (single-stream blocks) with the reference K/V."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_kv: ReferenceKV | _Recorder | None = None,
    ) -> torch.Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (
            part.unflatten(-1, (-1, attn.head_dim))  # type: ignore[no-untyped-call]
            for part in qkv.chunk(3, dim=-1)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = rotary(query, image_rotary_emb)
            key = rotary(key, image_rotary_emb)
        attended = self.attend(query, key, value, attention_mask, reference_kv).flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([attended, attn.mlp_act_fn(mlp)], dim=-1))  # type: ignore[no-any-return]


_HOOKED = "_flux2_reference_hooks"  # set on a transformer once its hooks are registered


def install(transformer: Any) -> None:
    """Our processors on every attention layer of a FLUX.2 transformer (at load, when the cache is on), and the
    hooks that hand them a call's references (`attention_kwargs={"reference_kv": ...}`) before it and take them
    back after it, even when it fails. A layer that has ours already keeps it: the step graphs' key holds the
    processors' identity (pipeline/transformer_graphs.py), so new ones would leave every later step without its
    graph (the bench switches the cache on for each cached edit; its generations after one ran ungraphed)."""
    for index, block in enumerate(transformer.transformer_blocks):
        if not isinstance(block.attn.processor, ReferenceAttnProcessor):
            _replace(block.attn, ReferenceAttnProcessor(f"double.{index}"))
    for index, block in enumerate(transformer.single_transformer_blocks):
        if not isinstance(block.attn.processor, ReferenceParallelAttnProcessor):
            _replace(block.attn, ReferenceParallelAttnProcessor(f"single.{index}"))
    if not getattr(transformer, _HOOKED, False):
        transformer.register_forward_pre_hook(_hand_out, with_kwargs=True)
        transformer.register_forward_hook(_take_back, always_call=True)
        setattr(transformer, _HOOKED, True)


def _replace(attention: Any, processor: _ReferenceAttention) -> None:
    """`processor` on `attention` in place of diffusers' own, with the attention kernel pinned on it (--attention,
    pipeline/attention.py), whichever of the two was set first."""
    processor._attention_backend = getattr(attention.processor, "_attention_backend", None)
    attention.set_processor(processor)


def _processors(transformer: Any) -> list[_ReferenceAttention]:
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    return [block.attn.processor for block in blocks if isinstance(block.attn.processor, _ReferenceAttention)]


def _hand_out(transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before a transformer call: its `reference_kv` (a prefill's recorder or an edit's references) onto the
    processors, as tensors."""
    given = (kwargs.get("joint_attention_kwargs") or {}).get(ATTENTION_KWARG)
    if given is None:
        return
    processors = _processors(transformer)
    if isinstance(given, _Recorder):
        for processor in processors:
            processor.recording = True
        return
    if not isinstance(given, ReferenceKV):
        raise TypeError(f"{ATTENTION_KWARG} must come from reference_cache.prefill, got {type(given).__name__}")
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(hidden, torch.Tensor) and hidden.shape[0] != len(given.rows):
        raise ValueError(f"reference cache built for {len(given.rows)} rows, the step has {hidden.shape[0]}")
    given.uses += 1
    for processor in processors:
        processor.reference = given.layer(processor.layer)


def _take_back(transformer: Any, args: tuple[Any, ...], output: Any) -> None:
    """After a transformer call, whatever its end: no processor keeps a call's references."""
    for processor in _processors(transformer):
        processor.reference = None
        processor.recording = False


def installed(transformer: Any) -> bool:
    return all(isinstance(block.attn.processor, _ReferenceAttention) for block in transformer.transformer_blocks)


def prefill(
    pipe: Flux2Pipe,
    rows: list[tuple[Image.Image, ...]],
    guidance_scale: float,
    keys: Sequence[Hashable] | None = None,
    store: ReferenceStore | None = None,
) -> ReferenceKV:
    """The reference K/V of each batch row (`rows`: each row's references, as the pipeline would take them). Each
    distinct set runs once: one transformer pass over its tokens alone, at timestep 0, with no text. `keys` name
    each row's set by content (rows with equal keys share a set; without keys, rows holding the same image objects
    do); with a `store`, sets it holds are taken from it and the others kept in it (keys required)."""
    transformer = pipe.transformer
    if not installed(transformer):
        raise RuntimeError("the reference cache's attention processors are not installed on this transformer")
    if store is not None and keys is None:
        raise ValueError("a reference store needs the sets' content keys")
    names: Sequence[Hashable] = keys if keys is not None else [tuple(id(image) for image in images) for images in rows]
    distinct: dict[Hashable, int] = {}
    row_sets = [distinct.setdefault(name, len(distinct)) for name in names]
    guidance = guidance_scale if transformer.config["guidance_embeds"] else None
    sets: list[Layers] = []
    reused = 0
    for name in distinct:
        stored = store.get((name, guidance)) if store is not None else None
        if stored is None:
            stored = _reference_pass(pipe, list(rows[names.index(name)]), guidance)
            if store is not None:
                store.put((name, guidance), stored)
        else:
            reused += 1
        sets.append(stored)
    return ReferenceKV(sets, row_sets, reused)


def _reference_pass(pipe: Flux2Pipe, images: list[Image.Image], guidance_scale: float | None) -> Layers:
    """One set's K/V: its tokens alone through the transformer at timestep 0, with no text."""
    transformer = pipe.transformer
    device = execution_device(pipe)
    dtype = transformer_dtype(pipe)
    latents, ids = reference_tokens(pipe, images)
    no_text = torch.zeros((1, 0, transformer.config["joint_attention_dim"]), device=device, dtype=dtype)
    guidance = None
    if guidance_scale is not None:
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
    layers: Layers = {}
    try:
        transformer(
            hidden_states=latents.to(device, dtype),
            encoder_hidden_states=no_text,
            timestep=torch.zeros(1, device=device, dtype=dtype),
            img_ids=ids.to(device),
            txt_ids=torch.zeros((1, 0, ids.shape[-1]), device=device, dtype=ids.dtype),
            guidance=guidance,
            joint_attention_kwargs={ATTENTION_KWARG: _Recorder()},
            return_dict=False,
        )
        for processor in _processors(transformer):
            if processor.recorded is not None:
                layers[processor.layer] = processor.recorded
    finally:
        for processor in _processors(transformer):
            processor.recorded = None
    return layers
