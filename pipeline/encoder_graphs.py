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
(logged once): the embeddings are the eager ones, up to rounding, either way. At most `MAX_GRAPHS` keys are
captured. Only an encoder that stays on the device is graphed (`placement.encoder_graphs`: CUDA, everything
resident, with `--compile`): a streamed or swapped encoder moves its weights."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

log = logging.getLogger("flux2.encoder_graphs")

MAX_GRAPHS = 2  # the cut encode and one other form at most; each keeps its activations' memory (~0.1 GB a row)
EAGER_PASSES = 2  # before a capture: lazy initialisations (cuBLAS workspaces, kernels' first loads) happen here
TOLERANCE = 1 / 64  # a replay's difference from the eager pass, relative (`_agree`): a few of bf16's rounding steps
_CALL = frozenset({"input_ids", "attention_mask", "output_hidden_states", "use_cache"})
_ATTRIBUTE = "_flux2_encoder_graphs"

# run -> (graph with .replay(), the captured run's output, an eager run's output on the same inputs).
Capture = Callable[[Callable[[], Any]], tuple[Any, Any, Any]]


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's own input tensors, filled before each replay
    output: Any  # the graph's own output (a transformers ModelOutput), overwritten by each replay


class EncoderGraphs:
    """The graphs of one text encoder, and the wrapper its forward calls through."""

    def __init__(self, encoder: torch.nn.Module, capture: Capture | None = None):
        self.encoder = encoder
        self.eager = encoder.forward
        self._instance_forward = vars(encoder).get("forward")  # a forward set on the instance before ours, if any
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.refused: set[tuple[Any, ...]] = set()
        self.captures = 0
        self.replays = 0
        self._capture = capture or capture_cuda_graph
        self._on = threading.local()

    @property
    def active(self) -> bool:
        return getattr(self._on, "depth", 0) > 0

    @contextmanager
    def enabled(self) -> Iterator[None]:
        self._on.depth = getattr(self._on, "depth", 0) + 1
        try:
            yield
        finally:
            self._on.depth -= 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._graphable(args, kwargs):
            return self.eager(*args, **kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        key = self._key(ids, mask)
        if key in self.refused:
            return self.eager(*args, **kwargs)
        rows = []
        for row in range(ids.shape[0]):
            output = self._run(key, ids[row : row + 1], mask[row : row + 1])
            if output is None:  # not captured (refused or over the limit): the whole call eager
                return self.eager(*args, **kwargs)
            rows.append(output)
        # Rows' outputs as the whole batch's (transformers registers its ModelOutputs with torch's pytree).
        return rows[0] if len(rows) == 1 else pytree.tree_map(lambda *parts: torch.cat(parts), *rows)

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
        modules = tuple(id(module) if _owns_tensors(module) else type(module) for module in self.encoder.modules())
        weights = tuple(tensor.data_ptr() for tensor in [*self.encoder.parameters(), *self.encoder.buffers()])
        return (ids.shape[1], ids.dtype, mask.dtype, ids.device, modules, weights)

    def _run(self, key: tuple[Any, ...], ids: torch.Tensor, mask: torch.Tensor) -> Any:
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self._refuse(key, f"{MAX_GRAPHS} graphs are kept at most")
                return None
            graph = self._captured(key, ids, mask)
            if graph is None:
                return None
        graph.inputs["input_ids"].copy_(ids)
        graph.inputs["attention_mask"].copy_(mask)
        graph.graph.replay()
        self.replays += 1
        return pytree.tree_map_only(torch.Tensor, torch.clone, graph.output)

    def _captured(self, key: tuple[Any, ...], ids: torch.Tensor, mask: torch.Tensor) -> _Graph | None:
        inputs = {"input_ids": ids.clone(), "attention_mask": mask.clone()}

        def run() -> Any:
            return self.eager(**inputs, output_hidden_states=True, use_cache=False)

        try:
            graph, output, expected = self._capture(run)
            graph.replay()
        except Exception as exc:  # any failure leaves the encode eager, as it was
            first_line = next(iter(str(exc).splitlines()), "")
            self._refuse(key, f"the capture failed ({type(exc).__name__}: {first_line})")
            return None
        differs = _agree(output, expected)
        if differs is not None:
            self._refuse(key, f"the replay differs from the eager pass: {differs}")
            return None
        self.captures += 1
        log.info("text encoder: one prompt row of %d tokens captured as a CUDA graph", ids.shape[1])
        graph_of = _Graph(graph=graph, inputs=inputs, output=output)
        self.graphs[key] = graph_of
        return graph_of

    def _refuse(self, key: tuple[Any, ...], why: str) -> None:
        self.refused.add(key)
        log.warning("text encoder: not replayed from a CUDA graph, runs eager (%s)", why)


def capture_cuda_graph(run: Callable[[], Any]) -> tuple[Any, Any, Any]:
    """torch's recipe: eager passes on a side stream, then the capture, into a memory pool of the graph's own (not
    shared with the encoder's other graph: no replay can write where another graph keeps its output). Only this
    thread's calls are checked during the capture: the server's other threads (the PNG encoders, the HTTP side) may
    use CUDA meanwhile."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(EAGER_PASSES):
            expected = run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = run()
    return graph, output, expected


def install(encoder: torch.nn.Module, capture: Capture | None = None) -> EncoderGraphs:
    """Wrap `encoder`'s forward (once) with graphs; returns them."""
    graphs = installed(encoder)
    if graphs is None:
        graphs = EncoderGraphs(encoder, capture)
        setattr(encoder, _ATTRIBUTE, graphs)
        encoder.forward = graphs.forward
    return graphs


def uninstall(encoder: torch.nn.Module) -> None:
    """The encoder's own forward back, its graphs (and their memory) dropped."""
    graphs = installed(encoder)
    if graphs is not None:
        if graphs._instance_forward is None:
            del encoder.forward  # the class's again
        else:
            encoder.forward = graphs._instance_forward
        delattr(encoder, _ATTRIBUTE)


def installed(encoder: Any) -> EncoderGraphs | None:
    graphs = getattr(encoder, _ATTRIBUTE, None)
    return graphs if isinstance(graphs, EncoderGraphs) else None


@contextmanager
def graphed(pipe: Any) -> Iterator[None]:
    """Within it, this thread's encodes through `pipe.text_encoder` replay its graphs, where it has any."""
    graphs = installed(getattr(pipe, "text_encoder", None))
    if graphs is None:
        yield
        return
    with graphs.enabled():
        yield


def _owns_tensors(module: torch.nn.Module) -> bool:
    return bool(module._parameters) or bool(module._buffers)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an output (a ModelOutput, tuple, tensor or None), in order."""
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _agree(replayed: Any, eager: Any) -> str | None:
    """None when two outputs have the same structure and every element of the replay is within `TOLERANCE` of the
    eager one, relative to itself and to the tensor's median magnitude (rounding, as another kernel choice would
    give; the same kernels give the same bits; not the mean nor the largest: Qwen3's few outlier channels, ~1e4
    against ~1, would make either lax); else what differs."""
    left, right = _tensors(replayed), _tensors(eager)
    if len(left) != len(right) or any(x.shape != y.shape for x, y in zip(left, right, strict=True)):
        return "a different structure"
    for index, (x, y) in enumerate(zip(left, right, strict=True)):
        if not x.numel():
            continue
        x, y = x.float(), y.float()
        typical = y.abs().median()
        excess = ((x - y).abs() - TOLERANCE * (y.abs() + typical)).max().item()
        if not excess <= 0:  # a NaN is not within it either
            difference = (x - y).abs().max().item()
            return f"tensor {index} up to {difference:g} apart (median magnitude {typical.item():g})"
    return None
