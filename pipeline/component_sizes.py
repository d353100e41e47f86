"""The sizes the offload planner needs, measured from a diffusers folder's safetensors headers (no weights read):
each component's bytes in the dtype it will run in (quantized components at their scheme's width), the largest
transformer block and text-encoder layer, how many there are, and the configs that size the working memory."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .offload_plan import ComponentSizes, Working, estimate_working
from .quantization import Quantization
from .weights import tensor_sizes

# Bytes per weight of each scheme, against 2 for bf16 (weights only; scales and non-linear layers ignored).
_SCHEME_BYTES = {"int8": 1.0, "fp8-weight": 1.0, "fp8": 1.0, "nf4": 0.55}
_TRANSFORMER_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_ENCODER_LAYER = re.compile(r"^(.*\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class MeasuredSizes:
    sizes: ComponentSizes
    transformer_blocks: int
    text_encoder_layers: int
    working: Working  # at 1024x1024, one image


def measure_folder(folder: Path, itemsize: int, quantization: Quantization = Quantization()) -> MeasuredSizes:
    """Sizes of `folder`'s transformer, text encoder and VAE if run with `itemsize`-byte weights."""
    transformer, blocks = _component(folder / "transformer", _TRANSFORMER_BLOCK, itemsize)
    encoder, layers = _component(folder / "text_encoder", _ENCODER_LAYER, itemsize)
    vae, _ = _component(folder / "vae", None, itemsize)
    schemes = dict(quantization.schemes)
    if "transformer" in schemes:
        transformer = _scaled(transformer, schemes["transformer"], itemsize)
    if "text_encoder" in schemes:
        encoder = _scaled(encoder, schemes["text_encoder"], itemsize)
    sizes = ComponentSizes(
        transformer=transformer.total,
        text_encoder=encoder.total,
        vae=vae.total,
        transformer_block=transformer.largest,
        text_encoder_layer=encoder.largest,
        transformer_blocks_bytes=transformer.blocks,
        transformer_block_sizes=transformer.each,
        text_encoder_layers_bytes=encoder.blocks,
    )
    return MeasuredSizes(sizes, blocks, layers, _working(folder, itemsize))


def measure_modules(
    transformer: Any, text_encoder: Any, vae: Any, itemsize: int, quantization: Quantization = Quantization()
) -> MeasuredSizes:
    """The same sizes from modules (on the meta device: no memory), for pipelines built in memory (the bench)."""
    parts = {
        "transformer": _module_bytes(transformer, _TRANSFORMER_BLOCK, itemsize),
        "text_encoder": _module_bytes(text_encoder, _ENCODER_LAYER, itemsize),
    }
    for component, scheme in quantization.schemes:
        size, count = parts[component]
        parts[component] = (_scaled(size, scheme, itemsize), count)
    (transformer_size, blocks), (encoder_size, layers) = parts["transformer"], parts["text_encoder"]
    sizes = ComponentSizes(
        transformer=transformer_size.total,
        text_encoder=encoder_size.total,
        vae=_module_bytes(vae, None, itemsize)[0].total,
        transformer_block=transformer_size.largest,
        text_encoder_layer=encoder_size.largest,
        transformer_blocks_bytes=transformer_size.blocks,
        transformer_block_sizes=transformer_size.each,
        text_encoder_layers_bytes=encoder_size.blocks,
    )
    config, text = dict(transformer.config), text_encoder.config
    text = getattr(text, "text_config", text)
    working = estimate_working(
        inner_dim=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
        text_hidden=int(text.hidden_size),
        text_layers=int(text.num_hidden_layers),
        vocab=int(text.vocab_size),
        itemsize=itemsize,
    )
    return MeasuredSizes(sizes, blocks, layers, working)


def _module_bytes(module: Any, block: re.Pattern[str] | None, itemsize: int) -> tuple[_Bytes, int]:
    total = 0
    per_block: defaultdict[str, int] = defaultdict(int)
    for name, param in module.named_parameters():
        total += param.numel() * itemsize
        found = block.match(name) if block is not None else None
        if found and "vision" not in name:
            per_block[found.group(0)] += param.numel() * itemsize
    return _counted(total, per_block)


@dataclass(frozen=True)
class _Bytes:
    total: int
    largest: int  # the largest block or layer
    blocks: int = 0  # all blocks or layers together
    each: tuple[int, ...] = ()  # every block's or layer's bytes, in the order they run


def _counted(total: int, per_block: dict[str, int]) -> tuple[_Bytes, int]:
    """The bytes of a component from its total and its blocks' (keyed by their name prefix), and the block count.
    FLUX.2's transformer runs its double-stream blocks (`transformer_blocks`) before its single-stream ones."""

    def run_order(prefix: str) -> tuple[int, int]:
        found = re.search(r"(\d+)\.$", prefix)
        return (1 if prefix.startswith("single_") else 0, int(found.group(1)) if found else 0)

    each = tuple(per_block[prefix] for prefix in sorted(per_block, key=run_order))
    return _Bytes(total, max(each, default=0), sum(each), each), len(each)


def _component(path: Path, block: re.Pattern[str] | None, itemsize: int) -> tuple[_Bytes, int]:
    """(bytes, largest block's bytes) and the number of blocks of one component folder's safetensors files."""
    total = 0
    per_block: defaultdict[str, int] = defaultdict(int)
    for file in sorted(path.glob("*.safetensors")):
        for name, numel in tensor_sizes(file):
            total += numel * itemsize
            found = block.match(name) if block is not None else None
            if found and "vision" not in name:  # dev's Pixtral vision tower is not streamed
                per_block[found.group(0)] += numel * itemsize
    return _counted(total, per_block)


def _scaled(size: _Bytes, scheme: str, itemsize: int) -> _Bytes:
    factor = _SCHEME_BYTES[scheme] / itemsize
    return _Bytes(
        int(size.total * factor),
        int(size.largest * factor),
        int(size.blocks * factor),
        tuple(int(block * factor) for block in size.each),
    )


def _working(folder: Path, itemsize: int) -> Working:
    transformer = _config(folder / "transformer")
    encoder = _config(folder / "text_encoder")
    text: dict[str, Any] = encoder.get("text_config", encoder)  # dev's Mistral 3 nests its language model's config
    return estimate_working(
        inner_dim=int(transformer.get("num_attention_heads", 24)) * int(transformer.get("attention_head_dim", 128)),
        text_hidden=int(text.get("hidden_size", 2560)),
        text_layers=int(text.get("num_hidden_layers", 36)),
        vocab=int(text.get("vocab_size", 151936)),
        itemsize=itemsize,
    )


def _config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        return {}
    loaded = json.loads(file.read_text())
    return loaded if isinstance(loaded, dict) else {}
