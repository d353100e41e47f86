"""Cheap previews of an image while it is denoised (streamed partial images).

Flow matching moves each sample on a near-straight line from its starting noise (sigma = 1) to the clean image
(sigma = 0): x = (1 - sigma) * clean + sigma * noise. Knowing the starting noise, the clean image is predicted from
the current latents at no model cost: clean = (x - sigma * noise) / (1 - sigma). That prediction is decoded by the
VAE at reduced resolution (half the side, or less for large images so that a preview is about 256 px on its long
side), so a preview costs a fraction of one final decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .decoding import decode
from .internals import Flux2Pipe, vae_latents

PREVIEW_SIDE = 256  # about the long side of a preview, for images larger than twice that


def preview_steps(steps: int, count: int) -> list[int]:
    """The steps (1-based, counted as done) after which `count` previews are taken, spread evenly, before the last."""
    if count <= 0 or steps <= 1:
        return []
    chosen = sorted({max(1, min(steps - 1, round(steps * (k + 1) / (count + 1)))) for k in range(count)})
    return chosen


def predict_clean(latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return (latents - sigma * noise) / max(1.0 - sigma, 0.05)


def preview_reduction(width: int, height: int) -> int:
    """By how much a preview's sides are divided: 2, or a larger power of two for large images."""
    factor = 2
    while max(width, height) / (factor * 2) >= PREVIEW_SIDE:
        factor *= 2
    return factor


def decode_preview(pipe: Flux2Pipe, packed: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """Decode packed latents (B, tokens, C) of a `width` x `height` image at reduced resolution."""
    latents = vae_latents(pipe, packed, width, height)
    return decode(pipe, F.avg_pool2d(latents, preview_reduction(width, height)))  # a fraction of the work
