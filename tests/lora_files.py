"""Tiny LoRA adapter files for the tiny transformer, made with peft, in diffusers' layout and in kohya's."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from server.bench_harness import LORA_TARGETS

TARGETS = list(LORA_TARGETS)  # the attention projections the bench's random adapters adapt too
RANK = 4


def make_lora(model_folder: Path, out: Path, seed: int, strength: float = 0.3, alpha: float | None = None) -> Path:
    """A rank-4 LoRA on TARGETS: peft's layout for the tiny transformer, weights drawn from `seed` with a spread
    (`strength`) large enough to change the image visibly; saved as diffusers saves LoRAs. With `alpha` (else
    alpha = rank) its config goes into the file's metadata, and its layers scale their output by alpha / rank."""
    from diffusers import Flux2KleinPipeline
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = Flux2Transformer2DModel.from_pretrained(model_folder / "transformer")
    config = LoraConfig(r=RANK, lora_alpha=alpha or RANK, init_lora_weights=False, target_modules=TARGETS)
    transformer.add_adapter(config, adapter_name="made")
    layout = get_peft_model_state_dict(transformer, adapter_name="made")
    generator = torch.Generator().manual_seed(seed)
    weights = {key: torch.randn(value.shape, generator=generator) * strength for key, value in layout.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = None if alpha is None else {"r": RANK, "lora_alpha": alpha, "target_modules": TARGETS}
    Flux2KleinPipeline.save_lora_weights(
        out.parent, transformer_lora_layers=weights, weight_name=out.name, transformer_lora_adapter_metadata=metadata
    )
    return out


def to_kohya(diffusers_file: Path, out: Path) -> Path:
    """The same adapter in kohya's layout (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, ...), as
    diffusers' `_convert_kohya_flux2_lora_to_diffusers` reads it back: BFL's fused QKV projections hold the three
    LoRAs stacked (down) and block-diagonal (up), with alpha = rank so that the scale is 1."""
    state = load_file(diffusers_file)
    kohya: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        kohya[f"{name}.lora_down.weight"] = down.contiguous()
        kohya[f"{name}.lora_up.weight"] = up.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))

    def pair(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return state.pop(f"transformer.{module}.lora_A.weight"), state.pop(f"transformer.{module}.lora_B.weight")

    blocks = {int(key.split(".")[2]) for key in state if key.startswith("transformer.transformer_blocks.")}
    for i in sorted(blocks):
        attn = f"transformer_blocks.{i}.attn"
        for stream, projections, out_proj in (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out"),
        ):
            downs, ups = zip(*(pair(f"{attn}.{p}") for p in projections), strict=True)
            put(f"lora_unet_double_blocks_{i}_{stream}_attn_qkv", torch.cat(downs), torch.block_diag(*ups))
            put(f"lora_unet_double_blocks_{i}_{stream}_attn_proj", *pair(f"{attn}.{out_proj}"))
    singles = {int(key.split(".")[2]) for key in state if key.startswith("transformer.single_transformer_blocks.")}
    for i in sorted(singles):
        put(f"lora_unet_single_blocks_{i}_linear1", *pair(f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"))
    assert not state, f"keys left unconverted: {sorted(state)}"
    save_file(kohya, out)
    return out
