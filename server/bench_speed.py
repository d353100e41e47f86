"""The full-size bench's speed options: `--compile` and `--quantize` applied to the in-memory pipeline as
`serve --compile` / `--quantize` apply them to a loaded one, `--loras N` (N random LoRA adapters loaded into the
served model, as `serve --lora` loads files), `--attention KERNEL` (as serve's), and `--only` to measure a subset of
the figures.

With a speed option the bench first times plain diffusers on the eager bf16 pipeline (the eager baseline), then
changes the shared pipeline, so both columns of the table run the compiled/quantized modules (the serving tax
stays a like-for-like ratio) and the eager baseline says what the options buy against plain diffusers, all in one
run on one card."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.attention import ATTENTION_CHOICES
from pipeline.quantization import Quantization, parse_quantization

from .bench_harness import synchronize

MAX_LORAS = 8


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False
    quantization: Quantization = Quantization()
    only: frozenset[str] | None = None  # figure/check keys to measure; None = all
    loras: int = 0  # random LoRA adapters loaded into the served model (server/bench_fullsize.py)
    attention: str = "sdpa"  # the transformer's attention kernel (pipeline/attention.py)

    def __bool__(self) -> bool:
        """Whether the pipeline is changed (compiled, quantized, given adapters or another attention kernel) after
        the eager baseline."""
        return self.compile or bool(self.quantization) or self.loras > 0 or self.attention != "sdpa"

    def label(self) -> str:
        parts = (["--compile"] if self.compile else []) + (
            [f"--quantize {self.quantization}"] if self.quantization else []
        )
        parts += [f"--loras {self.loras}"] if self.loras else []
        return " ".join(parts + ([f"--attention {self.attention}"] if self.attention != "sdpa" else []))

    def wants(self, key: str) -> bool:
        return self.only is None or key in self.only


def parse_speed_options(
    compile: bool, quantize: str, only: str | None, loras: int = 0, attention: str = "sdpa"
) -> SpeedOptions:
    """ValueError (naming the option) for a bad --quantize, an empty --only, --loras out of 0-MAX_LORAS or an
    unknown --attention."""
    try:
        quantization = parse_quantization(quantize)
    except ValueError as exc:
        raise ValueError(f"--quantize: {exc}") from exc
    keys = None
    if only is not None:
        keys = frozenset(key.strip() for key in only.split(",") if key.strip())
        if not keys:
            raise ValueError("--only: name at least one figure key, e.g. one_image,pipeline_step")
    if not 0 <= loras <= MAX_LORAS:
        raise ValueError(f"--loras: from 0 to {MAX_LORAS}, got {loras}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"--attention: one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    return SpeedOptions(compile, quantization, keys, loras, attention)


def apply_speed_options(pipe: Any, speed: SpeedOptions, device: str, warm_up: Callable[[], Any]) -> float:
    """Pin the attention kernel, quantize, then compile (the transformer's repeated blocks and the VAE decoder's
    norms, as serve --compile), then `warm_up()`. Returns the seconds."""
    from pipeline.attention import use_attention
    from pipeline.compilation import compile_pipeline
    from pipeline.quantization import check_quantization, quantize_modules

    started = time.perf_counter()
    use_attention(pipe.transformer, speed.attention)
    if speed.quantization:
        check_quantization(speed.quantization, device, speed_capability(device))
        quantize_modules(pipe, speed.quantization)
    if speed.compile:
        compile_pipeline(pipe)
    warm_up()
    synchronize(device)
    return time.perf_counter() - started


def speed_capability(device: str) -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if device == "cuda" else None
