"""Run one generation job on a loaded pipeline, in numbered stages like diffusers' own `__call__`."""

from __future__ import annotations

import time

import torch
from PIL import Image

from .jobs import GenerationJob, GenerationResult
from .loader import LoadedModel
from .masking import MaskBlend, composite, initial_noise
from .prompts import measure_prompt
from .references import prepare_reference


def run_job(model: LoadedModel, job: GenerationJob) -> GenerationResult:
    started = time.perf_counter()
    pipe = model.pipe

    # 0. What the encoder will see of the prompt (it cuts at 512 tokens without a word): for usage and warnings.
    prompt = measure_prompt(pipe, model.spec.family, job.prompt)

    # 1. One CPU generator per image, so image i depends on seeds[i] alone (and is the same on any device).
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in job.seeds]

    # 2. Conditioning: every reference goes to the pipeline (it resizes each to <= 1 MP, sides floored to 16).
    extra: dict = {}
    if job.references:
        extra["image"] = [prepare_reference(image) for image in job.references]

    # 3. A masked edit starts from noise we draw with the same generators and stays on the source image's
    #    trajectory outside the mask.
    if job.mask is not None:
        noise = initial_noise(pipe, generators, job.run_width, job.run_height)
        extra["latents"] = noise
        extra["callback_on_step_end"] = MaskBlend(pipe, job.references[0], job.mask, noise, job.run_width,
                                                  job.run_height)

    # 4. Denoise and decode at the model's size. `prompt` goes by keyword: the first positional is `image`.
    with torch.inference_mode():
        output = pipe(
            prompt=job.prompt,
            height=job.run_height,
            width=job.run_width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            num_images_per_prompt=job.n,
            generator=generators,
            output_type="pil",
            **extra,
        )

    # 5. Deliver exactly the size asked for; a masked edit gets its unmasked pixels back from the source.
    images = [_to_delivered_size(image, job.width, job.height) for image in output.images]
    if job.mask is not None:
        images = [composite(image, job.references[0], job.mask) for image in images]
    return GenerationResult(images=images, seeds=job.seeds, seconds=time.perf_counter() - started, prompt=prompt)


def _to_delivered_size(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
