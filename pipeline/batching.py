"""Batches: which queued jobs run together, and how a batch splits when the device runs out of memory."""

from __future__ import annotations

from dataclasses import dataclass

from .jobs import GenerationJob


@dataclass(frozen=True)
class Slice:
    """Some of one job's images (all of them unless a batch was split)."""

    job: GenerationJob
    seeds: tuple[int, ...]


def images_in(slices: list[Slice]) -> int:
    return sum(len(s.seeds) for s in slices)


def split_in_half(slices: list[Slice]) -> tuple[list[Slice], list[Slice]]:
    """Two batches of about half the images each; a job's images may land in both."""
    target = images_in(slices) // 2
    left: list[Slice] = []
    taken = 0
    for index, piece in enumerate(slices):
        if taken + len(piece.seeds) <= target:
            left.append(piece)
            taken += len(piece.seeds)
            continue
        cut = target - taken
        if cut:
            left.append(Slice(piece.job, piece.seeds[:cut]))
        right = [Slice(piece.job, piece.seeds[cut:]), *slices[index + 1 :]]
        return left, right
    return left, []
