"""Run one generation job on a loaded pipeline, in numbered stages like diffusers' own `__call__`."""

from __future__ import annotations

import time

import torch
from PIL import Image

from .jobs import GenerationJob, GenerationResult
from .loader import LoadedModel


def run_job(model: LoadedModel, job: GenerationJob) -> GenerationResult:
    started = time.perf_counter()

    # 1. One CPU generator per image, so image i depends on seeds[i] alone (and is the same on any device).
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in job.seeds]

    # 2. Denoise and decode at the model's size. `prompt` goes by keyword: the first positional is `image`.
    with torch.inference_mode():
        output = model.pipe(
            prompt=job.prompt,
            height=job.run_height,
            width=job.run_width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            num_images_per_prompt=job.n,
            generator=generators,
            output_type="pil",
        )

    # 3. Deliver exactly the size asked for.
    images = [_to_delivered_size(image, job.width, job.height) for image in output.images]
    return GenerationResult(images=images, seeds=job.seeds, seconds=time.perf_counter() - started)


def _to_delivered_size(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
