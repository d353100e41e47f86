"""Cheap previews of an image while it is denoised (streamed partial images).

Flow matching moves each sample on a near-straight line from its starting noise (sigma = 1) to the clean image
(sigma = 0): x = (1 - sigma) * clean + sigma * noise. Knowing the starting noise, the clean image is predicted from
the current latents at no model cost: clean = (x - sigma * noise) / (1 - sigma). That prediction is decoded by the
VAE at half resolution (a quarter of the pixels), so a preview costs a fraction of one final decode."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

LATENT_PIXELS = 16


def preview_steps(steps: int, count: int) -> list[int]:
    """The steps (1-based, counted as done) after which `count` previews are taken, spread evenly, before the last."""
    if count <= 0 or steps <= 1:
        return []
    chosen = sorted({max(1, min(steps - 1, round(steps * (k + 1) / (count + 1)))) for k in range(count)})
    return chosen


def predict_clean(latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return (latents - sigma * noise) / max(1.0 - sigma, 0.05)


def decode_preview(pipe: Any, packed: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """Decode packed latents (B, tokens, C) of a `width` x `height` image at half resolution."""
    vae = pipe.vae
    batch, _, channels = packed.shape
    rows, cols = height // LATENT_PIXELS, width // LATENT_PIXELS
    latents = packed.reshape(batch, rows, cols, channels).permute(0, 3, 1, 2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                           latents.dtype)
    latents = pipe._unpatchify_latents(latents * std + mean)
    latents = F.avg_pool2d(latents, 2)  # half the width and height: a quarter of the decoding work
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")
