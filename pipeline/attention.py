"""The transformer's attention kernel (`--attention`): torch's scaled-dot-product attention lets torch pick a kernel
for each call (`sdpa`, the default); the other choices pin one of torch's own kernels through diffusers' attention
dispatcher (each attention processor's backend, as `ModelMixin.set_attention_backend` sets it, but not as the
process-wide default it also sets), for every attention layer of the transformer, our reference-cache processors
included. No extra package: each is a kernel torch ships.

- `cudnn`: cuDNN's fused attention (CUDA; Hopper kernels in recent cuDNN releases);
- `flash`: torch's FlashAttention-2 (CUDA, Ampere or newer; no attention masks);
- `efficient`: torch's memory-efficient attention (CUDA);
- `math`: the unfused reference implementation (any device; slow, for checking).

Attention is most of a klein-4B edit's first pass over its references (16,384 tokens at 4 references of 1024²) and
about a fifth of a 1024² step. Measured on an H100 (run 11, klein-4B compiled, `.ci/gpu-checks` stage
`attention`), torch's pick stays the default: one image 0.367 s against 0.396 s with `cudnn` and 0.411 s with
`flash`, a step 62.8 / 61.2 / 71.0 ms, the first 4-reference edit's references pass 509 / 518 / 630 ms. A call
with an attention mask (the reference cache's batches whose rows have different references) goes to torch's own
pick whatever is asked for `cudnn` and `flash`, which may not take one."""

from __future__ import annotations

from typing import Any

from .internals import pin_attention_backend

ATTENTION_CHOICES = ("sdpa", "cudnn", "flash", "efficient", "math")
_BACKENDS = {
    "sdpa": "native",
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
}
_CUDA_ONLY = frozenset({"cudnn", "flash", "efficient"})
_WITHOUT_MASKS = frozenset({_BACKENDS["cudnn"], _BACKENDS["flash"]})


class AttentionError(ValueError):
    """An --attention value that cannot be used here; the message says why."""


def check_attention(name: str, device: str) -> str:
    """The start-up log line for `name` on `device` ("" for the default), or AttentionError saying why not."""
    if name not in ATTENTION_CHOICES:
        raise AttentionError(f"attention must be one of {ATTENTION_CHOICES}, got {name!r}")
    if name in _CUDA_ONLY and device != "cuda":
        raise AttentionError(f"attention {name} is a CUDA kernel: on the {device} use sdpa (or math)")
    if name == "sdpa":
        return ""
    return f"attention: {name} (asked: torch's {name} kernel for every attention layer of the transformer)"


def use_attention(transformer: Any, name: str) -> None:
    """Pin the attention kernel `name` on every attention layer of `transformer` (nothing for the default), and
    only there: not as the process's default (`internals.pin_attention_backend`)."""
    if name == "sdpa":
        return
    pin_attention_backend(transformer, _BACKENDS[name])


def backend_for(backend: Any, masked: bool) -> Any:
    """The dispatcher backend a call runs: `backend` as set on its processor, or torch's pick (None) for a masked
    call where `backend` takes no masks."""
    if masked and backend is not None and str(getattr(backend, "value", backend)) in _WITHOUT_MASKS:
        return None
    return backend
