"""The text encoder runs only as deep as FLUX.2 reads it.

FLUX.2's pipelines build the prompt embeddings from three hidden states of their text encoder (`encode_prompt`'s
`text_encoder_out_layers`: klein reads Qwen3's 9, 18 and 27 of 36 layers, dev reads Mistral 3's 10, 20 and 30 of
40) and never read its logits. Run whole, the encoder computes 9 (klein) or 10 (dev) layers, its final norm and a
vocabulary-wide head over 512 tokens for nothing; under the streamed plans it also copies their weights to the
device for nothing (klein-4B: ~2.4 of the ~8.2 GiB a whole streamed encode copies, its tied embedding counted
once for the lookup and once for the head; dev: ~11.6 of ~45 GiB).

`reading_depth(pipe)` runs the calls inside it on the layers below the deepest one read: for that time the decoder's
layer list is cut after it, its final norm is an identity (the deepest state read is then the last one, which
transformers reports after the norm) and the head computes no logits. Hidden state `k` is the output of layer
`k - 1` whether or not the layers above run, so the embeddings are the same (tests/test_encoder_depth.py compares
them with the whole encoder's, exactly). The modules are put back on exit: prompt enhancement, which generates with
the same encoder, still has all of it. Only the engine's worker thread encodes prompts, so nothing else sees the
encoder while it is cut.

Under diffusers' group offloading the layers above are never brought to the device on an encode: their groups keep
loading themselves (a later whole-encoder call still works). Its warning that some layers did not run, on the
first streamed encode, is expected here and filtered."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_OFFLOAD_LOGGER = "diffusers.hooks.group_offloading"


def read_layers(pipe: Any) -> tuple[int, ...] | None:
    """The hidden states `pipe.encode_prompt` reads by default, or None when it does not say."""
    parameter = inspect.signature(pipe.encode_prompt).parameters.get("text_encoder_out_layers")
    if parameter is None or not isinstance(parameter.default, tuple) or not parameter.default:
        return None
    return tuple(int(index) for index in parameter.default)


def decoder_layers(text_encoder: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The text encoder's decoder layers (Qwen3's `model.layers`, Mistral 3's `model.language_model.layers`), or
    None for an encoder that keeps them elsewhere."""
    found = decoder_owner(text_encoder)
    return None if found is None else found[1]


def decoder_owner(text_encoder: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList] | None:
    """The decoder module that holds the layers, and the layers, or None."""
    decoder = _decoder(text_encoder)
    layers = getattr(decoder, "layers", None)
    return (decoder, layers) if decoder is not None and isinstance(layers, torch.nn.ModuleList) else None


def _decoder(text_encoder: torch.nn.Module) -> torch.nn.Module | None:
    get_decoder = getattr(text_encoder, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else None


def _head(text_encoder: torch.nn.Module) -> torch.nn.Module | None:
    get_head = getattr(text_encoder, "get_output_embeddings", None)
    head = get_head() if callable(get_head) and hasattr(text_encoder, "set_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


class _NoLogits(torch.nn.Module):
    """A head that computes no logits: (..., hidden) -> (..., 0)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., :0]


class _UnexecutedLayersWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "some layers were not executed" not in record.getMessage()


@contextmanager
def reading_depth(pipe: Any) -> Iterator[None]:
    """Within it, `pipe.text_encoder` runs up to the deepest hidden state `pipe.encode_prompt` reads, with no
    logits; whole again after. An encoder whose deepest read state is its last (the normed output) runs all its
    layers, without the head; one whose layers or head are not where transformers keeps them runs as it is."""
    text_encoder = pipe.text_encoder
    read = read_layers(pipe)
    found = decoder_owner(text_encoder)
    head = _head(text_encoder)
    deepest = max(read) if read is not None else 0
    cut: tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module] | None = None
    if found is not None:
        decoder, layers = found
        norm = getattr(decoder, "norm", None)
        if isinstance(norm, torch.nn.Module) and 0 < deepest < len(layers):
            cut = (decoder, layers, norm)  # state `deepest` is a layer's raw output, not the normed last one
    offload_log = logging.getLogger(_OFFLOAD_LOGGER)
    quiet = _UnexecutedLayersWarning()
    offload_log.addFilter(quiet)
    if cut is not None:
        cut[0].layers = torch.nn.ModuleList(cut[1][:deepest])
        cut[0].norm = torch.nn.Identity()
    if head is not None:
        text_encoder.set_output_embeddings(_NoLogits())
    try:
        yield
    finally:
        if head is not None:
            text_encoder.set_output_embeddings(head)
        if cut is not None:
            cut[0].layers, cut[0].norm = cut[1], cut[2]
        offload_log.removeFilter(quiet)
