"""The final decode, done by us rather than inside the pipeline call: the pipeline returns latents
(`output_type="latent"`), and only the images still wanted are decoded. A batch whose every job was cancelled is
not decoded at all (diffusers would decode the half-denoised latents after an interrupt). Pixels become 8-bit on
the device, so only bytes cross to the CPU.

The decoder's working memory is the largest of any stage (~2.4 GiB per megapixel per image in bf16, measured on an
H200: `offload_plan.decode_bytes`), so a 4 MP image or a batch of four may not fit beside the weights on a small card.
The decode is chosen by the memory free on the device: the whole batch at once; else one image at a time (the same
pixels); else each image in tiles (as `vae.enable_tiling()` does, diffusers' `tiled_decode`: 1024² tiles blended
over a quarter of their side, for images larger than one tile; each tile's mid-block attention sees only the tile,
so the image differs slightly from a whole decode). A decode that runs out of memory anyway is done again tiled,
so a finished denoise is never thrown away for the decode's sake."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .internals import Flux2Pipe, execution_device, indexed_device, vae_dtype, vae_latents
from .offload_plan import decode_bytes

log = logging.getLogger("flux2.decoding")

DecodeWay = Literal["whole", "per_image", "tiled"]
LATENT_SCALE = 8  # pixels per latent row and column of FLUX.2's VAE


def latents_for_vae(pipe: Flux2Pipe, output: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """What a pipeline returns with output_type="latent", made ready for `vae.decode`: klein returns latents already
    unpacked and denormalized (B, 32, H/8, W/8); dev returns its packed tokens (B, tokens, 128)."""
    if output.ndim == 3:
        return vae_latents(pipe, output, width, height)
    return output


def decode(
    pipe: Flux2Pipe,
    latents: torch.Tensor,
    room: int | None = None,
    make_room: Callable[[int], bool] | None = None,
) -> list[Image.Image]:
    """VAE-space latents (B, 32, H/8, W/8) -> RGB images, rounded exactly as diffusers' postprocess rounds them.
    `room`: the device's free bytes (default: read from the pipeline's execution device; on a CPU nothing limits
    the decode). `make_room(lacking)`: asked to free that many bytes (the reference store's sets) when not even one
    image's decode fits, before tiles are chosen; True when it freed any."""
    vae, device, dtype = pipe.vae, execution_device(pipe), vae_dtype(pipe)
    if room is None:
        room = free_device_bytes(device)
    batch, _, rows, columns = latents.shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    pixels = rows * columns * LATENT_SCALE**2
    # Kept sets give way only where the decode would otherwise be tiled (different pixels); one image at a time
    # gives the batch's pixels, so the store stays for that.
    lacking = decode_bytes(pixels, itemsize) - room if room is not None else 0
    if lacking > 0 and make_room is not None and make_room(lacking):
        room = free_device_bytes(device)
    way = decode_way(batch, pixels, itemsize, room)
    if way != "whole":
        side = f"{columns * LATENT_SCALE}x{rows * LATENT_SCALE}"
        log.info("decode: %s (%d image(s) of %s; %s free)", way, batch, side, _gib(room))
    with torch.inference_mode():
        latents = latents.to(device, dtype)
        try:
            array = _decoded(vae, latents, way)
        except torch.OutOfMemoryError:
            if way == "tiled":
                raise
            array = None
        # Outside the handler: the failed attempt's frames (and their feature maps) are released by now.
        if array is None:
            log.warning("decode: out of device memory decoding %s; decoding again in tiles", way.replace("_", " "))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            array = _decoded(vae, latents, "tiled")
    return [Image.fromarray(np.ascontiguousarray(row)) for row in array]


def decode_way(batch: int, pixels: int, itemsize: int, room: int | None) -> DecodeWay:
    """How to decode `batch` images of `pixels` each with `room` free bytes on the device (None: no limit known):
    whole when the batch's working memory fits, one image at a time when one image's does, else tiled."""
    one = decode_bytes(pixels, itemsize)
    if room is None or batch * one <= room:
        return "whole"
    return "per_image" if one <= room else "tiled"


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a CUDA device can still hand this process: free on the card plus what PyTorch's allocator holds
    unused, within a per-process memory fraction if one is set. None on a CPU. A device without an index is the
    current one (`indexed_device`: torch 2.11 refused it here on an H100 under 8 and 12 GiB)."""
    device = indexed_device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    room = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
    if fraction < 1.0:
        room = min(room, int(fraction * total) - allocated)
    return max(0, room)


def _decoded(vae: Any, latents: torch.Tensor, way: DecodeWay) -> np.ndarray:
    """(B, H, W, 3) uint8 pixels from latents on the VAE's device, in its dtype. One image at a time converts each
    to bytes before the next."""
    parts = [latents] if way == "whole" else [latents[row : row + 1] for row in range(latents.shape[0])]
    arrays = []
    tiling = vae.use_tiling
    if way == "tiled":  # through `decode`, as enable_tiling() does: only images above one tile are tiled
        vae.enable_tiling()
    try:
        for part in parts:
            pixels = vae.decode(part, return_dict=False)[0]
            pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
            arrays.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
            del pixels
    finally:
        vae.use_tiling = tiling
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


def _gib(room: int | None) -> str:
    return "unknown" if room is None else f"{room / 1024**3:.2f} GiB"
