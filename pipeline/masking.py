"""Masked edits (OpenAI mask semantics) for both FLUX.2 pipelines, through one mechanism.

The pipeline denoises from noise we draw ourselves; after every step the latents outside the mask are replaced by
the source image's latents re-noised to the next step's noise level (flow matching: x = sigma * noise +
(1 - sigma) * source), so the model paints only inside the mask while seeing everything. At the end the source
pixels outside the mask are composited back, so they come back unchanged.

This is what diffusers' `Flux2KleinInpaintPipeline` does inside its loop, applied through `callback_on_step_end` so
that it works for dev and klein alike and with every reference image (the inpaint pipeline takes one extra)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .internals import Flux2Pipe, encode_image_latents, execution_device, pack_latents, transformer_dtype, vae_dtype
from .sizes import MODEL_MULTIPLE

LATENT_PIXELS = MODEL_MULTIPLE  # one packed latent token covers 16 x 16 pixels


def initial_noise(pipe: Flux2Pipe, generators: list[torch.Generator], width: int, height: int) -> torch.Tensor:
    """The starting latents, one per generator, drawn as diffusers' `randn_tensor` draws them for a list of CPU
    generators: (B, C*4, H/16, W/16) on the CPU, in the transformer's dtype."""
    channels = pipe.transformer.config["in_channels"]
    shape = (1, channels, height // LATENT_PIXELS, width // LATENT_PIXELS)
    dtype = transformer_dtype(pipe)
    return torch.cat([torch.randn(shape, generator=g, dtype=dtype) for g in generators])


class MaskBlend:
    """A `callback_on_step_end` that keeps the latents outside `mask` on the source image's trajectory."""

    def __init__(
        self, pipe: Flux2Pipe, source: Image.Image, mask: Image.Image, noise: torch.Tensor, width: int, height: int
    ):
        device = execution_device(pipe)
        dtype = transformer_dtype(pipe)
        pixels = pipe.image_processor.preprocess(
            source.resize((width, height), Image.Resampling.LANCZOS), height=height, width=width
        )
        with torch.inference_mode():
            source_latents = encode_image_latents(pipe, pixels.to(device, vae_dtype(pipe)))
        self.source = pack_latents(pipe, source_latents.to(dtype))  # (1, tokens, C)
        self.noise = pack_latents(pipe, noise.to(device, dtype))  # (B, tokens, C)
        grid = mask.resize((width // LATENT_PIXELS, height // LATENT_PIXELS), Image.Resampling.BOX)
        keep = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)
        self.repaint = keep.reshape(1, -1, 1).to(device, dtype)  # 1 = repaint, 0 = keep

    def __call__(
        self, pipe: Flux2Pipe, step: int, timestep: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        latents = tensors["latents"]
        sigma = pipe.scheduler.sigmas[step + 1].to(latents.device, latents.dtype)  # the level the step reached
        source_now = sigma * self.noise + (1 - sigma) * self.source
        return {"latents": self.repaint * latents + (1 - self.repaint) * source_now}


def composite(generated: Image.Image, source: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` inside the mask's white region, `source` (resized to fit) everywhere else."""
    size = generated.size
    if source.size != size:
        source = source.resize(size, Image.Resampling.LANCZOS)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return Image.composite(generated.convert("RGB"), source.convert("RGB"), mask)


def repaints_nothing(mask: Image.Image) -> bool:
    """Whether a decoded mask (mode L, 255 = repaint) leaves every pixel as it is: the edit returns its first image
    unchanged (an opaque RGBA mask, or an RGB/L one with no white: most likely the wrong file)."""
    return bool(mask.getextrema()[1] == 0)


def fit_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    """The uploaded mask at the delivered size: its one resize (nearest, so it stays black and white). The mask
    blend reduces it to the latent grid and the final composite uses it as it is."""
    return mask if mask.size == (width, height) else mask.resize((width, height), Image.Resampling.NEAREST)
