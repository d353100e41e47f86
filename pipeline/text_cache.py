"""An LRU cache of encoded prompts, bounded in bytes and kept in CPU memory.

Clients retry and iterate on the same prompt; encoding it (a 4-24 B parameter text encoder) is a large share of a
short generation. Entries are keyed by (model, prompt) and hold the encoder's output and the prompt's measure."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .prompts import PromptTokens


@dataclass(frozen=True)
class EncodedPrompt:
    embeds: torch.Tensor  # (1, sequence, dim), on the CPU
    tokens: PromptTokens


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], EncodedPrompt] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, model: str, prompt: str) -> EncodedPrompt | None:
        with self._lock:
            entry = self._entries.get((model, prompt))
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end((model, prompt))
            self.hits += 1
            return entry

    def put(self, model: str, prompt: str, entry: EncodedPrompt) -> None:
        size = _nbytes(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop((model, prompt), None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._entries[(model, prompt)] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)

    def drop_model(self, model: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == model]:
                self._bytes -= _nbytes(self._entries.pop(key))


def _nbytes(entry: EncodedPrompt) -> int:
    return entry.embeds.numel() * entry.embeds.element_size()
