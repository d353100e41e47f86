"""Every use of diffusers' private pipeline API, in one place.

FLUX.2's pipelines keep a few helpers private (`_pack_latents`, `_unpatchify_latents`, `_encode_vae_image`,
`_execution_device`, `_interrupt`). We need them for previews, masks, our own final decode and stopping a batch.
`diffusers` is pinned to the range these were checked against (pyproject.toml); `tests/test_internals.py` fails,
naming the call, when an upgrade moves one of them."""

from __future__ import annotations

from typing import Any

import torch

# (pipeline class name, attribute) pairs this module relies on; the test checks each against installed diffusers.
REQUIRED = tuple((cls, attr) for cls in ("Flux2Pipeline", "Flux2KleinPipeline")
                 for attr in ("_pack_latents", "_unpatchify_latents", "_encode_vae_image", "_execution_device",
                              "_interrupt", "encode_prompt", "image_processor", "vae", "transformer", "scheduler"))


def execution_device(pipe: Any) -> torch.device:
    return pipe._execution_device


def pack_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H*W, C) tokens, row-major, as the transformer reads them."""
    return pipe._pack_latents(latents)


def encode_image_latents(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) -> the normalized, patchified latents the transformer sees."""
    return pipe._encode_vae_image(pixels, generator=None)


def stop_after_this_step(pipe: Any) -> None:
    """Inside `callback_on_step_end`: the pipeline skips its remaining steps."""
    pipe._interrupt = True


def vae_latents(pipe: Any, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed latent tokens (B, tokens, C) of a `width` x `height` image, row-major (as both pipelines lay out the
    generated image's tokens) -> what the VAE decodes: batch-norm statistics undone, 2x2 patches unfolded."""
    vae = pipe.vae
    batch, _, channels = packed.shape
    latents = packed.reshape(batch, height // 16, width // 16, channels).permute(0, 3, 1, 2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                           latents.dtype)
    return pipe._unpatchify_latents(latents * std + mean)
