"""The denoising steps replayed from CUDA graphs (with `--compile`, everything resident).

Compiled, a klein-4B step at 1024² took 59.8 ms of wall time for 53.7 ms of kernels on an H200 (the bench's
`profile`, run 6): for ~6 ms a step the card waits for the host, which launches each block's compiled kernels
(guards and launches, 25 blocks) and, between them, the eager parts of the forward (the timestep embedding, the
rotary embedding recomputed from the position ids at every step, the final norm). A CUDA graph launches a whole
step's kernels with one call. This is what `torch.compile(mode="reduce-overhead")` does; here the graph is taken
around the regionally compiled transformer, as the text encoder's is (`encoder_graphs.py`, `cuda_graphs.py`).

`install(transformer)` wraps the transformer's forward. Inside `graphed(pipe)` (the runner's denoise), on the
thread that entered it, a call of the form FLUX.2's pipelines make each step (the latents, the text embeddings,
the timestep, the position ids, dev's guidance; no attention arguments, which the reference cache and diffusers'
KV pipeline pass; `return_dict=False`; inference mode) replays the graph captured for its shapes, if there is one.
Graphs are captured only inside `graphed(pipe, capture=True)`, which the compile warm-up enters for the default
size (batches of one and two): a request never pays a capture, and the memory the graphs hold (each its own
activations' pool) is known at start. A capture needs room: a decode of the captured batch must still fit twice
over beside it (`cuda_graphs.room_wanted`), else that shape stays compiled and eager. Any other call runs as
before.

A graph reads the weights where they were at its capture and bakes in what the modules do: its key holds, besides
the inputs' shapes and types, the modules (with their attention processors, hooks and instance forwards) and the
weights' addresses, taken once per `graphed` scope. Only transformers that nothing changes between calls get
graphs (`placement.transformer_graphs`): not with the step cache (its hooks decide per step what runs), quantized
or GGUF weights, an offload plan, or LoRA adapters that requests switch (their scales change between calls;
pipeline/adapters.py). A fused adapter is merged into the weights before the warm-up captures."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import cuda_graphs
from .cuda_graphs import Capture, FreeBytes, GraphedForward, room_wanted
from .decoding import free_device_bytes
from .offload_plan import decode_bytes

log = logging.getLogger("flux2.transformer_graphs")

MAX_GRAPHS = 2  # the warm-up's batches of one and two at the default size
PIXELS_PER_TOKEN = 16 * 16  # an image token is 2x2 latents of 8x8 pixels
_TENSORS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")
_CALL = frozenset({*_TENSORS, "guidance", "joint_attention_kwargs", "return_dict"})


class TransformerGraphs(GraphedForward):
    """The graphs of one FLUX.2 transformer, and the wrapper its forward calls through."""

    what = "transformer"
    limit = MAX_GRAPHS

    def __init__(self, transformer: torch.nn.Module, capture: Capture | None = None, free: FreeBytes | None = None):
        super().__init__(transformer, log, capture)
        self.transformer = transformer
        self.free = free or free_device_bytes
        self.paused = False  # the bench's figure without graphs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.paused or not self._graphable(args, kwargs):
            return self.eager(*args, **kwargs)
        inputs = {name: kwargs[name] for name in _TENSORS}
        if kwargs.get("guidance") is not None:
            inputs["guidance"] = kwargs["guidance"]
        key = (self.scope_signature(), tuple((name, t.shape, t.dtype, t.device) for name, t in inputs.items()))
        output = self.replay(key, inputs, self._run)
        return output if output is not None else self.eager(*args, **kwargs)

    def _run(self, **inputs: torch.Tensor) -> Any:
        return self.eager(**{"guidance": None, **inputs}, joint_attention_kwargs=None, return_dict=False)

    def may_capture(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> str | None:
        if not self.capturing:
            return "captured only at the warm-up"
        hidden = inputs["hidden_states"]
        pixels = hidden.shape[0] * hidden.shape[1] * PIXELS_PER_TOKEN
        return room_wanted(self.free, hidden.device, decode_bytes(pixels, hidden.element_size()))

    def _graphable(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if args or not self.active or not torch.is_inference_mode_enabled():
            return False
        if not set(_TENSORS) <= set(kwargs) <= _CALL:
            return False
        if kwargs.get("return_dict", True) is not False or kwargs.get("joint_attention_kwargs"):
            return False
        guidance = kwargs.get("guidance")
        tensors = [kwargs[name] for name in _TENSORS] + ([guidance] if guidance is not None else [])
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            return False
        device = tensors[0].device
        return all(t.device == device for t in tensors) and tensors[0].ndim == 3 and tensors[0].shape[0] > 0


def install(
    transformer: torch.nn.Module, capture: Capture | None = None, free: FreeBytes | None = None
) -> TransformerGraphs:
    """Wrap `transformer`'s forward (once) with graphs; returns them."""
    return cuda_graphs.install(transformer, lambda: TransformerGraphs(transformer, capture, free))


def uninstall(transformer: torch.nn.Module) -> None:
    """The transformer's own forward back, its graphs (and their memory) dropped."""
    cuda_graphs.uninstall(transformer)


def installed(transformer: Any) -> TransformerGraphs | None:
    return cuda_graphs.installed(transformer, TransformerGraphs)


def graphed(pipe: Any, capture: bool = False) -> AbstractContextManager[None]:
    """Within it, this thread's denoising steps replay the transformer's graphs, where it has them; with
    `capture`, the steps' shapes that have none are captured (the warm-up)."""
    return cuda_graphs.enabled(installed(getattr(pipe, "transformer", None)), capture)
