"""An LRU cache of encoded prompts, bounded in bytes and kept in CPU memory.

Clients retry and iterate on the same prompt; encoding it (a 4-24 B parameter text encoder) is a large share of a
short generation. Entries are keyed by (model, prompt) and hold the encoder's output and the prompt's measure."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lru import LRU
from .prompts import PromptTokens


@dataclass(frozen=True)
class EncodedPrompt:
    embeds: torch.Tensor  # (1, sequence, dim), on the CPU
    tokens: PromptTokens


class PromptCache:
    """Keyed by (model, prompt); `max_bytes` of embeddings at most."""

    def __init__(self, max_bytes: int):
        self._entries: LRU[tuple[str, str], EncodedPrompt] = LRU(max_bytes, _nbytes)

    @property
    def hits(self) -> int:
        return self._entries.hits

    @property
    def misses(self) -> int:
        return self._entries.misses

    def get(self, model: str, prompt: str) -> EncodedPrompt | None:
        return self._entries.get((model, prompt))

    def put(self, model: str, prompt: str, entry: EncodedPrompt) -> None:
        self._entries.put((model, prompt), entry)

    def drop_model(self, model: str) -> None:
        self._entries.drop(lambda key: key[0] == model)


def _nbytes(entry: EncodedPrompt) -> int:
    return entry.embeds.numel() * entry.embeds.element_size()
