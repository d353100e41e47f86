"""A module's forward replayed from CUDA graphs: what the text encoder's graphs (`encoder_graphs.py`) and the
transformer's (`transformer_graphs.py`) share.

A CUDA graph records the kernels of one call once and launches them all with one call, so a pass bound by the
host's Python and kernel launches runs at the speed of its kernels. `GraphedForward` wraps a module's forward
(on the instance; `uninstall` gives the module its own back); a subclass says which calls qualify, by what key a
graph is found (the inputs' shapes and types, what the graph reads besides its inputs) and which tensors are its
inputs. A graph is captured at a qualifying call (after eager passes on a side stream, as CUDA graphs need) and
replayed after: the call's inputs are copied into the graph's own tensors and its outputs copied out, so nothing a
caller keeps is overwritten by the next replay. Calls replay only inside `enabled()`, on the thread that entered
it.

A capture that fails, or whose replay differs from the eager pass of the same inputs (`agree`), leaves its key
eager for good (logged once): the outputs are the eager ones, up to rounding, either way. At most `limit` keys are
captured, each into a memory pool of its own (its activations' memory stays held while the graph is kept)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.utils._pytree as pytree

from .internals import diffusers_hook_names

EAGER_PASSES = 2  # before a capture: lazy initialisations (cuBLAS workspaces, kernels' first loads) happen here
TOLERANCE = 1 / 64  # a replay's difference from the eager pass, relative (`agree`): a few of bf16's rounding steps
_ATTRIBUTE = "_flux2_cuda_graphs"

HEADROOM_DECODES = 2  # a capture leaves room for this many decodes of its batch (its pool is held for good)

# run -> (graph with .replay(), the captured run's output, an eager run's output on the same inputs).
Capture = Callable[[Callable[[], Any]], tuple[Any, Any, Any]]
# device -> the bytes it can still hand this process (None: no limit known, the CPU)
FreeBytes = Callable[[torch.device], int | None]


G = TypeVar("G", bound="GraphedForward")


@dataclass
class Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's own input tensors, filled before each replay
    output: Any  # the graph's own output, overwritten by each replay


class GraphedForward:
    """The graphs of one module, and the wrapper its forward calls through. Subclasses define `forward` (which
    calls `replay`, or `self.eager` for a call that does not qualify); `what` names the module in the log."""

    what = "module"
    limit = 2

    def __init__(self, module: torch.nn.Module, log: logging.Logger, capture: Capture | None = None):
        self.module = module
        self.log = log
        self.eager = module.forward
        self._instance_forward = vars(module).get("forward")  # a forward set on the instance before ours, if any
        self.graphs: dict[Hashable, Graph] = {}
        self.refused: set[Hashable] = set()
        self.captures = 0
        self.replays = 0
        self._capture = capture or capture_cuda_graph
        self._on = threading.local()

    @property
    def active(self) -> bool:
        return getattr(self._on, "depth", 0) > 0

    @property
    def capturing(self) -> bool:
        """Whether this thread's calls may capture graphs now (inside `enabled(capture=True)`)."""
        return getattr(self._on, "capture", 0) > 0

    @contextmanager
    def enabled(self, capture: bool = False) -> Iterator[None]:
        self._on.depth = getattr(self._on, "depth", 0) + 1
        self._on.capture = getattr(self._on, "capture", 0) + int(capture)
        try:
            yield
        finally:
            self._on.depth -= 1
            self._on.capture -= int(capture)
            if not self._on.depth:
                self.left()

    def left(self) -> None:
        """Called when this thread leaves its outermost `enabled()`: the scope's signature dropped."""
        self._on.signature = None

    def scope_signature(self) -> tuple[Any, ...]:
        """`module_signature` of the module, taken once per `enabled()` scope (nothing changes the modules within
        one denoise)."""
        signature = getattr(self._on, "signature", None)
        if signature is None:
            signature = self._on.signature = module_signature(self.module)
        return signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def may_capture(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> str | None:
        """None when `key` may be captured now, else why not (a subclass's limits; the count is checked here)."""
        return None

    def replay(self, key: Hashable, inputs: dict[str, torch.Tensor], run: Callable[..., Any]) -> Any:
        """The output of `run(**inputs)` from `key`'s graph (captured now if it may be), copied out; None when the
        call is to run eager (the key refused, over the limit, or not to be captured now)."""
        if key in self.refused:
            return None
        graph = self.graphs.get(key)
        if graph is None:
            why = self.may_capture(key, inputs)
            if why is not None:  # not now (outside the warm-up, no room): eager, without a word
                self.log.debug("%s: not captured (%s)", self.what, why)
                return None
            if len(self.graphs) >= self.limit:
                self._refuse(key, f"{self.limit} graphs are kept at most")
                return None
            graph = self._captured(key, inputs, run)
            if graph is None:
                return None
        for name, tensor in inputs.items():
            graph.inputs[name].copy_(tensor)
        graph.graph.replay()
        self.replays += 1
        return pytree.tree_map_only(torch.Tensor, torch.clone, graph.output)

    def _captured(self, key: Hashable, inputs: dict[str, torch.Tensor], run: Callable[..., Any]) -> Graph | None:
        own = {name: tensor.clone() for name, tensor in inputs.items()}
        try:
            graph, output, expected = self._capture(lambda: run(**own))
            graph.replay()
        except Exception as exc:  # any failure leaves the call eager, as it was
            first_line = next(iter(str(exc).splitlines()), "")
            self._refuse(key, f"the capture failed ({type(exc).__name__}: {first_line})")
            return None
        differs = agree(output, expected)
        if differs is not None:
            self._refuse(key, f"the replay differs from the eager pass: {differs}")
            return None
        self.captures += 1
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in inputs.items())
        self.log.info("%s: captured as a CUDA graph (%s)", self.what, shapes)
        graph_of = Graph(graph=graph, inputs=own, output=output)
        self.graphs[key] = graph_of
        return graph_of

    def _refuse(self, key: Hashable, why: str) -> None:
        self.refused.add(key)
        self.log.warning("%s: not replayed from a CUDA graph, runs eager (%s)", self.what, why)


def room_wanted(free: FreeBytes, device: torch.device, decode: int) -> str | None:
    """None when `device` has room for `HEADROOM_DECODES` decodes of `decode` bytes (a capture of that batch and
    the work beside it), else what it lacks, in words."""
    room, needed = free(device), HEADROOM_DECODES * decode
    if room is not None and room < needed:
        return f"{room / 2**30:.1f} GiB free, {needed / 2**30:.1f} GiB wanted beside it"
    return None


def capture_cuda_graph(run: Callable[[], Any]) -> tuple[Any, Any, Any]:
    """torch's recipe: eager passes on a side stream, then the capture, into a memory pool of the graph's own (not
    shared with another graph: no replay can write where another graph keeps its output). Only this thread's
    calls are checked during the capture: the server's other threads (the PNG encoders, the HTTP side) may use CUDA
    meanwhile."""
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


def install(module: torch.nn.Module, make: Callable[[], G]) -> G:
    """Wrap `module`'s forward (once) with the graphs `make()` builds; returns them."""
    graphs = getattr(module, _ATTRIBUTE, None)
    if graphs is None:
        graphs = make()
        setattr(module, _ATTRIBUTE, graphs)
        module.forward = graphs.forward
    return cast(G, graphs)


def uninstall(module: torch.nn.Module) -> None:
    """The module's own forward back, its graphs (and their memory) dropped."""
    graphs = installed(module, GraphedForward)
    if graphs is not None:
        if graphs._instance_forward is None:
            del module.forward  # the class's again
        else:
            module.forward = graphs._instance_forward
        delattr(module, _ATTRIBUTE)


def installed(module: Any, kind: type[G]) -> G | None:
    """The graphs of kind `kind` wrapping `module`'s forward, if any."""
    graphs = getattr(module, _ATTRIBUTE, None)
    return graphs if isinstance(graphs, kind) else None


@contextmanager
def enabled(graphs: GraphedForward | None, capture: bool = False) -> Iterator[None]:
    """`graphs.enabled(capture)`, or nothing for a module without graphs."""
    if graphs is None:
        yield
        return
    with graphs.enabled(capture):
        yield


def module_signature(module: torch.nn.Module) -> tuple[Any, ...]:
    """What a graph of `module` bakes in or reads besides its inputs: each submodule with its attention processor,
    hooks (torch's and diffusers') and instance forward (a compiled norm's, a hook's), and where its weights are. One
    walk, attributes read from the instances' dictionaries (klein-4B's transformer, 356 modules: ~1 ms on this
    project's CPU, against ~2.8 ms through `getattr` and `parameters()`)."""
    return tuple(
        (
            id(sub),
            id(vars(sub).get("processor")),
            tuple(sub._forward_pre_hooks),
            tuple(sub._forward_hooks),
            id(vars(sub).get("forward")),
            diffusers_hook_names(sub),
            tuple(tensor.data_ptr() for tensor in sub._parameters.values() if tensor is not None),
            tuple(tensor.data_ptr() for tensor in sub._buffers.values() if tensor is not None),
        )
        for sub in module.modules()
    )


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an output (a ModelOutput, tuple, tensor or None), in order."""
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def agree(replayed: Any, eager: Any) -> str | None:
    """None when two outputs have the same structure and every element of the replay is within `TOLERANCE` of the
    eager one, relative to itself and to the tensor's median magnitude (rounding, as another kernel choice would
    give; the same kernels give the same bits; not the mean nor the largest: Qwen3's few outlier channels, ~1e4
    against ~1, would make either lax); else what differs."""
    left, right = tensors(replayed), tensors(eager)
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
