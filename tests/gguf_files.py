"""Writing a community-style GGUF transformer file from a diffusers FLUX.2 transformer, for tests: the keys in the
original BFL layout (what diffusers' FLUX.2 single-file converter reads back), linear weights as Q8_0 where their
rows are a multiple of 32 values (GGUF's block), the rest F32, as community conversions leave norms unquantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
_SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}


def bfl_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux2Transformer2DModel state dict in the original (BFL) key layout."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "transformer_blocks":
            block, rest = parts[1], ".".join(parts[2:])
            for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                if rest.removeprefix("attn.").removesuffix(".weight") in names:
                    slot = fused.setdefault(f"double_blocks.{block}.{side}_attn.qkv.weight", [None, None, None])
                    slot[names.index(rest.removeprefix("attn.").removesuffix(".weight"))] = value
                    break
            else:
                out[f"double_blocks.{block}.{_DOUBLE[rest]}"] = value
        elif parts[0] == "single_transformer_blocks":
            out[f"single_blocks.{parts[1]}.{_SINGLE['.'.join(parts[2:])]}"] = value
        elif key == "norm_out.linear.weight":  # diffusers keeps (scale, shift), BFL (shift, scale)
            scale, shift = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        else:
            for old, new in _RENAMES.items():
                key = key.replace(old, new)
            out[key] = value
    for key, pieces in fused.items():
        out[key] = torch.cat([piece for piece in pieces if piece is not None])
    return out


def write_gguf(transformer: torch.nn.Module, path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in bfl_state_dict(transformer.state_dict()).items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
