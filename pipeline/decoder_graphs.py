"""The final decode replayed from a CUDA graph (with `--compile`, everything resident).

Compiled norms and all, a 1024² decode took 65.2 ms of wall time for 48.3 ms of kernels on an H200 (the bench's
`profile`, run 6): the VAE decoder launches a few hundred kernels (among them 30 norm applies, 65 of cuDNN's layout
conversions and 44 other elementwise kernels, by that profile), many of them shorter than the host's time to launch
them. A CUDA graph launches them all with one call.

`install(decoder)` wraps the VAE decoder's forward (`vae.decoder`, which `vae.decode` calls after its
`post_quant_conv`). Inside `graphed(pipe)` (the runner's final decode), on the thread that entered it, a call of
the form `vae.decode` makes (one latent tensor, inference mode) replays the graph captured for its shape, if there
is one. The graph is captured only inside `graphed(pipe, capture=True)`: the compile warm-up's decode of one image
at the default size, if a decode of that size still fits twice over beside it (its pool holds a decode's working
memory for good, ~2.4 GiB per megapixel in bf16). Batches, other sizes, tiles of another size and the previews
decode as before. The key holds the decoder's modules (the compiled norms are instance forwards) and its weights'
addresses (`cuda_graphs.module_signature`)."""

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

log = logging.getLogger("flux2.decoder_graphs")

MAX_GRAPHS = 1  # one image at the warm-up's size
LATENT_SCALE = 8  # pixels per latent row and column of FLUX.2's VAE


class DecoderGraphs(GraphedForward):
    """The graph of one VAE decoder, and the wrapper its forward calls through."""

    what = "VAE decoder"
    limit = MAX_GRAPHS

    def __init__(self, decoder: torch.nn.Module, capture: Capture | None = None, free: FreeBytes | None = None):
        super().__init__(decoder, log, capture)
        self.free = free or free_device_bytes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sample = self._sample(args, kwargs)
        if sample is None:
            return self.eager(*args, **kwargs)
        key = (self.scope_signature(), sample.shape, sample.dtype, sample.device)
        output = self.replay(key, {"sample": sample}, self._run)
        return output if output is not None else self.eager(*args, **kwargs)

    def _run(self, sample: torch.Tensor) -> Any:
        return self.eager(sample)

    def may_capture(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> str | None:
        if not self.capturing:
            return "captured only at the warm-up"
        sample = inputs["sample"]
        pixels = sample.shape[0] * sample.shape[2] * sample.shape[3] * LATENT_SCALE**2
        return room_wanted(self.free, sample.device, decode_bytes(pixels, sample.element_size()))

    def _sample(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The latents of a call that may replay (one 4-D tensor, no `latent_embeds`), else None."""
        if not self.active or not torch.is_inference_mode_enabled():
            return None
        if len(args) == 1 and not kwargs:
            sample = args[0]
        elif not args and set(kwargs) == {"sample"}:
            sample = kwargs["sample"]
        else:
            return None
        return sample if isinstance(sample, torch.Tensor) and sample.ndim == 4 and sample.shape[0] > 0 else None


def install(decoder: torch.nn.Module, capture: Capture | None = None, free: FreeBytes | None = None) -> DecoderGraphs:
    """Wrap the VAE `decoder`'s forward (once) with graphs; returns them."""
    return cuda_graphs.install(decoder, lambda: DecoderGraphs(decoder, capture, free))


def uninstall(decoder: torch.nn.Module) -> None:
    """The decoder's own forward back, its graph (and its memory) dropped."""
    cuda_graphs.uninstall(decoder)


def installed(decoder: Any) -> DecoderGraphs | None:
    return cuda_graphs.installed(decoder, DecoderGraphs)


def graphed(pipe: Any, capture: bool = False) -> AbstractContextManager[None]:
    """Within it, this thread's decodes through `pipe.vae` replay the decoder's graph, where it has one; with
    `capture`, a decode of a shape without one captures it (the warm-up)."""
    return cuda_graphs.enabled(installed(getattr(getattr(pipe, "vae", None), "decoder", None)), capture)
