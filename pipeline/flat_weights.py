"""Quantized weights held as plain tensors, for the components that stream.

torchao's quantized weights (fp8, int8) are tensor subclasses: a wrapper whose data is in inner tensors (the
quantized values, the scales). diffusers' group offloading moves them with special cases (`swap_tensors` to the
device, inner tensors set back one by one to the host), and with CUDA streams that failed on an H200 at the first
forward pass (torch 2.11, diffusers 0.42.1, torchao 0.17: "Attempted to set the storage of a tensor on device
cuda:0 to a storage on different device cpu", a view of a weight whose wrapper and inner tensors were on different
devices), for an fp8 transformer and for an fp8 text encoder alike: dev under 24 GiB could not run.

So before a quantized component is streamed, each such weight is replaced by its inner tensors, held as plain
buffers, with torch's parametrization (`torch.nn.utils.parametrize`) rebuilding the quantized weight from them
(`__tensor_unflatten__`, the protocol traceable subclasses implement for torch.compile) whenever the module reads
it: the same values, the same quantized matmul. Everything that moves weights (group offloading, the pinned host
buffers) then sees plain tensors only, on the one device they are on. Rebuilding a wrapper costs microseconds a
layer, against a matmul's milliseconds. Buffers, not parameters: diffusers and transformers take a model's dtype
from its first floating-point parameter, which would otherwise be fp8 values (the wrapper says bfloat16), and the
pipeline would draw its noise in fp8 (the H200's next run: "normal_kernel_cpu not implemented for Float8_e4m3fn")."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# A flattened tensor: None for a plain one, else (class, flatten context, [(inner name, leaf count, spec)], size,
# stride), nested as deep as subclasses nest (an affine-quantized tensor holds a tensor-impl subclass).
Spec = tuple[type, Any, list[tuple[str, int, Any]], torch.Size, tuple[int, ...]] | None


def flatten(tensor: torch.Tensor) -> tuple[list[torch.Tensor], Spec]:
    """A (possibly nested) traceable subclass -> its plain leaf tensors, in order, and how to rebuild it."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor], None
    names, context = tensor.__tensor_flatten__()
    leaves: list[torch.Tensor] = []
    inner: list[tuple[str, int, Any]] = []
    for name in names:
        found, spec = flatten(getattr(tensor, name))
        leaves += found
        inner.append((name, len(found), spec))
    return leaves, (type(tensor), context, inner, tensor.size(), tensor.stride())


def unflatten(leaves: list[torch.Tensor] | tuple[torch.Tensor, ...], spec: Spec) -> torch.Tensor:
    """The tensor `flatten` took apart, rebuilt around `leaves` (wherever they now are)."""
    if spec is None:
        return leaves[0]
    cls, context, inner, size, stride = spec
    tensors, start = {}, 0
    for name, count, inner_spec in inner:
        tensors[name] = unflatten(leaves[start : start + count], inner_spec)
        start += count
    rebuilt: torch.Tensor = cls.__tensor_unflatten__(tensors, context, size, stride)  # type: ignore[attr-defined]
    return rebuilt


class Rebuilt(torch.nn.Module):
    """The parametrization: plain tensors (original0, original1, ...) -> the quantized weight."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec

    def forward(self, *leaves: torch.Tensor) -> torch.Tensor:
        return unflatten(leaves, self.spec)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten(weight)[0])


def flatten_weights(module: torch.nn.Module) -> int:
    """Every traceable-subclass parameter of `module` held as plain buffers from now on (see the module's
    docstring); the number of weights so held."""
    held = 0
    for owner in list(module.modules()):
        for name, param in list(owner.named_parameters(recurse=False)):
            if parametrize.is_parametrized(owner, name) or not is_traceable_wrapper_subclass(param):
                continue
            del owner._parameters[name]  # a buffer now: parametrize then keeps the inner tensors as buffers too
            owner.register_buffer(name, param.detach())
            parametrize.register_parametrization(owner, name, Rebuilt(flatten(param)[1]), unsafe=True)
            held += 1
    return held
