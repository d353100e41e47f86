"""The text encode replayed from a CUDA graph.

On a GPU the text encode of a new prompt is bound by the host, not by the card: klein-4B's encode (Qwen3 over 512
tokens, ~6 ms of matmuls on an H100) took 34 ms eager and 28 ms with its layers compiled (H100, docs/PERFORMANCE.md),
the Python and the launches of ~30 small operations per layer. A CUDA graph records the kernels of one encode once
and launches them all with one call.

`install(text_encoder)` wraps the encoder's forward. Inside `graphed(pipe)` (the runner's encode and the compile
warm-up), on the thread that entered it, a call of the form FLUX.2's pipelines make (`input_ids` and
`attention_mask` of one shape, `output_hidden_states=True`, `use_cache=False`, in inference mode, on CUDA) runs row
by row through a graph of one prompt row: captured at the first such call (after eager passes on a side stream, as
CUDA graphs need), replayed after. Inputs are copied into the graph's own tensors and its outputs copied out, so
nothing a caller keeps is overwritten by the next replay. A graph is keyed by the token count, the modules that run
(`reading_depth`'s cut encoder is one graph, the whole encoder another) and the addresses of the weights, which a
graph reads where they were at capture: a moved weight makes a new key, never a stale read. Outside `graphed`, or
for any other call, the encoder runs as it is.

A capture that fails, or whose replay differs from the eager pass of the same inputs, leaves its key eager for good
(logged once): the embeddings are the eager ones, up to rounding, either way (`cuda_graphs.py`, shared with the
transformer's graphs). At most `MAX_GRAPHS` keys are captured. Only an encoder that stays on the device is graphed
(`placement.encoder_graphs`: CUDA, everything resident, with `--compile`): a streamed or swapped encoder moves its
weights."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import cuda_graphs
from .cuda_graphs import Capture, GraphedForward

log = logging.getLogger("flux2.encoder_graphs")

MAX_GRAPHS = 2  # the cut encode and one other form at most; each keeps its activations' memory (~0.1 GB a row)
_CALL = frozenset({"input_ids", "attention_mask", "output_hidden_states", "use_cache"})


class EncoderGraphs(GraphedForward):
    """The graphs of one text encoder, and the wrapper its forward calls through."""

    what = "text encoder"
    limit = MAX_GRAPHS

    def __init__(self, encoder: torch.nn.Module, capture: Capture | None = None):
        super().__init__(encoder, log, capture)
        self.encoder = encoder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._graphable(args, kwargs):
            return self.eager(*args, **kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        key = self._key(ids, mask)
        rows = []
        for row in range(ids.shape[0]):
            inputs = {"input_ids": ids[row : row + 1], "attention_mask": mask[row : row + 1]}
            output = self.replay(key, inputs, self._run)
            if output is None:  # not captured (refused or over the limit): the whole call eager
                return self.eager(*args, **kwargs)
            rows.append(output)
        # Rows' outputs as the whole batch's (transformers registers its ModelOutputs with torch's pytree).
        return rows[0] if len(rows) == 1 else pytree.tree_map(lambda *parts: torch.cat(parts), *rows)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.eager(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )

    def _graphable(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if args or not self.active or set(kwargs) != _CALL or not torch.is_inference_mode_enabled():
            return False
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        return (
            kwargs["output_hidden_states"] is True
            and kwargs["use_cache"] is False
            and isinstance(ids, torch.Tensor)
            and isinstance(mask, torch.Tensor)
            and ids.ndim == 2
            and mask.shape == ids.shape
            and ids.shape[0] > 0
            and ids.device == mask.device
        )

    def _key(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, ...]:
        """What a graph depends on besides the input values: the row's shape and types, the modules that run (a
        parameterless module by its type: `reading_depth` puts a new head in each time) and where the weights are."""
        modules = tuple(
            (
                id(module) if _owns_tensors(module) else type(module),
                tuple(tensor.data_ptr() for tensor in module._parameters.values() if tensor is not None),
                tuple(tensor.data_ptr() for tensor in module._buffers.values() if tensor is not None),
            )
            for module in self.encoder.modules()
        )  # one walk (klein-4B's encoder, 547 modules: 1.4 ms on this project's CPU, 3.4 ms through parameters())
        return (ids.shape[1], ids.dtype, mask.dtype, ids.device, modules)


def install(encoder: torch.nn.Module, capture: Capture | None = None) -> EncoderGraphs:
    """Wrap `encoder`'s forward (once) with graphs; returns them."""
    return cuda_graphs.install(encoder, lambda: EncoderGraphs(encoder, capture))


def uninstall(encoder: torch.nn.Module) -> None:
    """The encoder's own forward back, its graphs (and their memory) dropped."""
    cuda_graphs.uninstall(encoder)


def installed(encoder: Any) -> EncoderGraphs | None:
    return cuda_graphs.installed(encoder, EncoderGraphs)


def graphed(pipe: Any) -> AbstractContextManager[None]:
    """Within it, this thread's encodes through `pipe.text_encoder` replay its graphs, where it has any."""
    return cuda_graphs.enabled(installed(getattr(pipe, "text_encoder", None)))


def _owns_tensors(module: torch.nn.Module) -> bool:
    return bool(module._parameters) or bool(module._buffers)
