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
and values. Rows may have different references (per-row caches; rows with fewer reference tokens are masked).
One copy of each distinct set's K/V is kept for the batch: per layer, (reference tokens x heads x head_dim) keys
and values, about 5 GB for 4 references of 1024² on klein-4B in bf16 (diffusers' KV pipeline keeps one per row).

Across requests (`ReferenceStore`, `--reference-memory`): under these semantics a set's K/V depend only on its images
(in order), the weights with their active LoRA adapters and, for dev, the guidance; recent sets are kept on the
device, keyed by exactly that, so an edit that repeats a set skips its VAE encode and pass. A hit is the same
tensors a miss computes, so the images are identical."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from PIL import Image

from .internals import Flux2Pipe, attention_dispatch, execution_device, qkv_projections, reference_tokens, rotary
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
        self.uses = 0  # attention calls served from the cache (for tests)

    def keys_values(
        self, layer: str, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The step's keys and values with each row's references appended, and the attention mask (None when every
        row has as many reference tokens)."""
        self.uses += 1
        batch, tokens = key.shape[:2]
        if batch != len(self.rows):
            raise ValueError(f"reference cache built for {len(self.rows)} rows, the step has {batch}")
        longest = max(self.lengths)
        if len(set(self.rows)) == 1:  # one set for every row: a broadcast view, no copy
            ref_key, ref_value = self.sets[self.rows[0]][layer]
            ref_key, ref_value = ref_key.expand(batch, -1, -1, -1), ref_value.expand(batch, -1, -1, -1)
        else:
            ref_key, ref_value = (
                torch.cat([self._padded(index, layer, part, longest) for index in self.rows]) for part in (0, 1)
            )
        mask = None
        if min(self.lengths) != longest:  # rows with fewer reference tokens must not attend to the padding
            mask = torch.ones((batch, 1, 1, tokens + longest), dtype=torch.bool, device=key.device)
            for row, length in enumerate(self.lengths):
                mask[row, :, :, tokens + length :] = False
        return (
            torch.cat([key, ref_key.to(key.dtype)], dim=1),
            torch.cat([value, ref_value.to(value.dtype)], dim=1),
            mask,
        )

    def _padded(self, index: int, layer: str, part: int, length: int) -> torch.Tensor:
        tensor = self.sets[index][layer][part]
        missing = length - tensor.shape[1]
        if not missing:
            return tensor
        return torch.cat([tensor, tensor.new_zeros((1, missing, *tensor.shape[2:]))], dim=1)


class _Recorder:
    """Handed to the processors during the prefill: they store each layer's keys and values here."""

    def __init__(self) -> None:
        self.layers: Layers = {}


class _ReferenceAttention:
    """Shared by the two processors: attention with a recorded or cached reference K/V, else diffusers' own."""

    # Read and set by diffusers' `set_attention_backend` / context parallelism, as on its own processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: str):
        self.layer = layer

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        reference_kv: ReferenceKV | _Recorder | None,
    ) -> torch.Tensor:
        if reference_kv is None:  # a generation or an uncached edit: diffusers' own attention, compiled with the block
            return self._dispatch(query, key, value, attention_mask)
        return self._attend_with_references(query, key, value, attention_mask, reference_kv)  # type: ignore[no-any-return]

    # Outside torch.compile (a graph break under `--compile`; the rest of the block stays compiled): traced, the
    # per-layer keys (`self.layer`) and the recorder's growing dict became guards, so every layer of every block
    # needed its own graph and past the recompile limit the blocks ran eager (seen on an H200, klein-4B). Here the
    # projections, norms and RoPE around it stay compiled; the attention itself is one SDPA call either way.
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _attend_with_references(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        reference_kv: ReferenceKV | _Recorder,
    ) -> torch.Tensor:
        if isinstance(reference_kv, _Recorder):
            reference_kv.layers[self.layer] = (key.clone(), value.clone())  # the prefill has no text: all references
        elif isinstance(reference_kv, ReferenceKV):
            key, value, attention_mask = reference_kv.keys_values(self.layer, key, value)
        return self._dispatch(query, key, value, attention_mask)

    def _dispatch(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return attention_dispatch(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
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


def install(transformer: Any) -> None:
    """Our processors on every attention layer of a FLUX.2 transformer (at load, when the cache is on)."""
    for index, block in enumerate(transformer.transformer_blocks):
        block.attn.set_processor(ReferenceAttnProcessor(f"double.{index}"))
    for index, block in enumerate(transformer.single_transformer_blocks):
        block.attn.set_processor(ReferenceParallelAttnProcessor(f"single.{index}"))


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
    dtype = transformer.dtype
    latents, ids = reference_tokens(pipe, images)
    recorder = _Recorder()
    no_text = torch.zeros((1, 0, transformer.config["joint_attention_dim"]), device=device, dtype=dtype)
    guidance = None
    if guidance_scale is not None:
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
    transformer(
        hidden_states=latents.to(device, dtype),
        encoder_hidden_states=no_text,
        timestep=torch.zeros(1, device=device, dtype=dtype),
        img_ids=ids.to(device),
        txt_ids=torch.zeros((1, 0, ids.shape[-1]), device=device, dtype=ids.dtype),
        guidance=guidance,
        joint_attention_kwargs={ATTENTION_KWARG: recorder},
        return_dict=False,
    )
    return recorder.layers
