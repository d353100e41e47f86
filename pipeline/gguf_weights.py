"""Community GGUF transformer files (`--transformer-gguf PATH`): a FLUX.2 transformer quantized by the community
(Q8_0, Q4_K, ...), loaded in place of the diffusers folder's transformer through diffusers' single-file loader
(`Flux2Transformer2DModel.from_single_file` with `GGUFQuantizationConfig`), which converts the original BFL key
layout; the folder gives the transformer's config (read locally: nothing is fetched) and every other component.
The weights stay quantized in memory and are dequantized layer by layer as they run, in the compute dtype.

Checked at start, from the file's header alone: that it is a FLUX.2 transformer (its single-stream modulation
key) and that its block counts match the folder's transformer (a dev file next to a klein folder is refused)."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_FLUX2_KEY = "single_stream_modulation.lin.weight"
_BLOCK = re.compile(r"^(?:model\.diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.")


class GGUFError(ValueError):
    """A --transformer-gguf file that cannot be used with this model; the message says why."""


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    tensor_bytes: int  # the quantized weights' bytes (what they occupy in memory)
    largest_block_bytes: int
    double_blocks: int
    single_blocks: int


def read_gguf(path: Path) -> GGUFFile:
    """The file's header: its tensors' names and sizes. Raises GGUFError for a file that is not a FLUX.2
    transformer, or when the gguf package (the [quant] extra) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError('--transformer-gguf needs the gguf package: pip install -e ".[quant]"')
    if not path.is_file():
        raise GGUFError(f"--transformer-gguf: no file at {path}")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct errors, numpy errors for a file that is not GGUF
        raise GGUFError(f"--transformer-gguf: {path} is not a GGUF file ({exc})") from exc
    names = {tensor.name for tensor in reader.tensors}
    if not any(name.endswith(_FLUX2_KEY) for name in names):
        raise GGUFError(f"--transformer-gguf: {path} holds no FLUX.2 transformer (no {_FLUX2_KEY})")
    per_block: dict[tuple[str, int], int] = {}
    for tensor in reader.tensors:
        found = _BLOCK.match(tensor.name)
        if found:
            key = (found.group(1), int(found.group(2)))
            per_block[key] = per_block.get(key, 0) + int(tensor.n_bytes)
    return GGUFFile(
        path=path,
        tensor_bytes=sum(int(tensor.n_bytes) for tensor in reader.tensors),
        largest_block_bytes=max(per_block.values(), default=0),
        double_blocks=sum(1 for kind, _ in per_block if kind == "double_blocks"),
        single_blocks=sum(1 for kind, _ in per_block if kind == "single_blocks"),
    )


def check_gguf(file: GGUFFile, folder: Path) -> str:
    """Refuse a file whose blocks do not match the folder's transformer; the start-up log's line."""
    config = json.loads((folder / "transformer" / "config.json").read_text())
    expected = (int(config["num_layers"]), int(config["num_single_layers"]))
    if (file.double_blocks, file.single_blocks) != expected:
        raise GGUFError(
            f"--transformer-gguf: {file.path.name} has {file.double_blocks} double + {file.single_blocks} single "
            f"blocks, the transformer of {folder} has {expected[0]} + {expected[1]}: a file for another FLUX.2 model "
            "(dev: 8 + 48, klein 4B: 5 + 20, klein 9B: 8 + 24)?"
        )
    return (
        f"transformer: {file.path} (GGUF, {file.tensor_bytes / 1024**3:.2f} GiB quantized, dequantized layer by "
        "layer as it runs)"
    )


def load_gguf_transformer(path: Path, folder: Path, dtype: torch.dtype) -> Any:
    """The FLUX.2 transformer of the GGUF file at `path`, configured by `folder`'s transformer config."""
    from diffusers import Flux2Transformer2DModel, GGUFQuantizationConfig

    return Flux2Transformer2DModel.from_single_file(
        str(path),
        config=str(folder),
        subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        dtype=dtype,
        local_files_only=True,
    )
