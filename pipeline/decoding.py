"""The final decode, done by us rather than inside the pipeline call: the pipeline returns latents
(`output_type="latent"`), and only the images still wanted are decoded. A batch whose every job was cancelled is
not decoded at all (diffusers would decode the half-denoised latents after an interrupt). Pixels become 8-bit on
the device, so only bytes cross to the CPU."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .internals import Flux2Pipe, vae_latents


def latents_for_vae(pipe: Flux2Pipe, output: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """What a pipeline returns with output_type="latent", made ready for `vae.decode`: klein returns latents already
    unpacked and denormalized (B, 32, H/8, W/8); dev returns its packed tokens (B, tokens, 128)."""
    if output.ndim == 3:
        return vae_latents(pipe, output, width, height)
    return output


def decode(pipe: Flux2Pipe, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-space latents (B, 32, H/8, W/8) -> RGB images, rounded exactly as diffusers' postprocess rounds them."""
    vae = pipe.vae
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(row)) for row in array]
