"""The instruments of the full-size benchmark: the real app served in-process on a loopback port, a client that
speaks the image API, plain diffusers calls on the same pipeline, and meters for memory and denoising steps."""

from __future__ import annotations

import contextlib
import io
import itertools
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from pipeline.codecs import PNG_COMPRESS_LEVEL, encode_image

from .timing import parse_server_timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class InProcessServer:
    """uvicorn serving `app` from a thread of this process on a free loopback port (no signal handlers: those
    belong to the main thread), so the engine it starts shares the benchmark's pipeline object."""

    def __init__(self, app: Any):
        import uvicorn

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="bench-uvicorn", daemon=True
        )

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 300
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the in-process server stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("the in-process server did not start within 300 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(120)
        self._socket.close()


class ImageClient:
    """Requests as an application sends them: one pooled connection set, b64_json PNG, each answer read whole
    and checked (200, the number of images)."""

    def __init__(self, url: str, steps: int):
        self.steps = steps
        self.http = httpx.Client(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=16))
        self.timings: list[dict[str, float]] = []  # each JSON answer's Server-Timing stages, in milliseconds
        self.marks: list[dict[str, str]] = []  # and their descriptions ("cache hit", "computed", ...)
        self.recording = True  # off: answers checked but their stages not kept (a figure's untimed request)

    def _check(self, response: httpx.Response, n: int) -> None:
        _check(response, n)
        if not self.recording:
            return
        stages = parse_server_timing(response.headers.get("server-timing", ""))
        self.timings.append({name: milliseconds for name, (milliseconds, _) in stages.items()})
        self.marks.append({name: mark for name, (_, mark) in stages.items() if mark is not None})

    def close(self) -> None:
        self.http.close()

    def _fields(self, prompt: str, size: int, seed: int, n: int) -> dict:
        return {
            "prompt": prompt,
            "size": f"{size}x{size}",
            "seed": seed,
            "n": n,
            "num_inference_steps": self.steps,
            "response_format": "b64_json",
            "output_format": "png",
        }

    def generate(
        self, prompt: str, size: int, seed: int = 0, n: int = 1, loras: list[dict[str, Any]] | None = None
    ) -> None:
        body = self._fields(prompt, size, seed, n) | ({"loras": loras} if loras else {})
        self._check(self.http.post("/v1/images/generations", json=body), n)

    def generate_unrecorded(self, prompt: str, size: int) -> None:
        """One image whose stages are not kept: what a figure runs before each timed request (`Figure.before`)."""
        self.recording = False
        try:
            self.generate(prompt, size)
        finally:
            self.recording = True

    def stream(self, prompt: str, size: int, partial_images: int, seed: int = 0) -> None:
        body = {**self._fields(prompt, size, seed, 1), "stream": True, "partial_images": partial_images}
        with self.http.stream("POST", "/v1/images/generations", json=body) as response:
            data = b"".join(response.iter_bytes())
        if response.status_code != 200 or b"event: image_generation.completed" not in data:
            raise RuntimeError(f"the stream failed ({response.status_code}): {data[-500:]!r}")
        if data.count(b"event: image_generation.partial_image") != partial_images:
            raise RuntimeError(f"the stream did not carry {partial_images} previews")

    def edit(self, prompt: str, size: int, references: list[bytes], mask: bytes | None = None, seed: int = 0) -> None:
        files = [("image[]", (f"ref{i}.png", data, "image/png")) for i, data in enumerate(references)]
        if mask is not None:
            files.append(("mask", ("mask.png", mask, "image/png")))
        fields = {key: str(value) for key, value in self._fields(prompt, size, seed, 1).items()}
        self._check(self.http.post("/v1/images/edits", data=fields, files=files), 1)


def _check(response: httpx.Response, n: int) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"the server answered {response.status_code}: {response.text[:500]}")
    data = response.json()["data"]
    if len(data) != n or not all(item.get("b64_json") for item in data):
        raise RuntimeError(f"expected {n} b64_json images, got {len(data)}")


class DirectDiffusers:
    """Plain diffusers on the same pipeline object: `pipe(prompt=..., ...)` as a user calls it, the same seeds
    (CPU generators, as the server draws its noise), then every image saved as PNG the way the server encodes it."""

    def __init__(self, pipe: Any, steps: int, guidance_scale: float):
        self.pipe = pipe
        self.steps = steps
        self.guidance_scale = guidance_scale

    def images(
        self, prompts: list[str], size: int, seed: int = 0, per_prompt: int = 1, pipe: Any = None, **extra: Any
    ) -> None:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts) * per_prompt)]
        # Inference mode, as the server runs: diffusers' own call is under no_grad, which compiled blocks would
        # compile a second time for (and which is no faster).
        with torch.inference_mode():
            output = (pipe or self.pipe)(
                prompt=prompts,
                height=size,
                width=size,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                num_images_per_prompt=per_prompt,
                generator=generators,
                **extra,
            )
        for image in output.images:
            plain_png(image)


def seeded_image(pipe: Any, prompt: str, size: int, steps: int, **extra: Any) -> Any:
    """One `size`x`size` image from `pipe` with seed 0, as floats (numpy): for comparing runs of one pipeline."""
    return pipe(
        prompt=prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        **extra,
    ).images[0]


def plain_png(image: Image.Image) -> bytes:
    """What a plain diffusers user does with an output: Pillow's own PNG save (at zlib level 1, as the server's
    encoder, rather than Pillow's default 6). The served side's encoder deflates on several cores instead."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def transformer_step(transformer: Any, size: int, calls: int = 3, text_tokens: int = 512) -> float:
    """Median seconds of one transformer forward at `size`x`size` (batch 1, `text_tokens` of text), called
    directly with the inputs a pipeline step gives it."""
    return median_seconds(step_action(transformer, size, text_tokens), transformer.device.type, calls)


def step_action(transformer: Any, size: int, text_tokens: int = 512) -> Callable[[], object]:
    """One transformer forward at `size`x`size` on the same random inputs at every call, in inference mode."""
    inputs = step_inputs(transformer, size, text_tokens)

    def step() -> object:
        with torch.inference_mode():
            return transformer(**inputs)

    return step


def step_inputs(transformer: Any, size: int, text_tokens: int = 512) -> dict[str, Any]:
    """Random inputs of one transformer forward at `size`x`size` (batch 1), as a pipeline step gives them."""
    from diffusers import Flux2KleinPipeline

    device, dtype = transformer.device, transformer.dtype
    config = transformer.config
    side = size // 16  # 8x VAE downsampling, then 2x2 latent patches
    latents = torch.randn(1, config.in_channels, side, side, device=device, dtype=dtype)
    text = torch.randn(1, text_tokens, config.joint_attention_dim, device=device, dtype=dtype)
    inputs = dict(
        hidden_states=latents.flatten(2).transpose(1, 2),
        encoder_hidden_states=text,
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        img_ids=Flux2KleinPipeline._prepare_latent_ids(latents).to(device),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(device),
        guidance=torch.full((1,), 4.0, device=device, dtype=dtype) if config.guidance_embeds else None,
        return_dict=False,
    )
    return inputs


def median_seconds(action: Callable[[], object], device: str, calls: int) -> float:
    """Median seconds of `calls` calls of `action` after one warm-up call, the device's work included."""
    action()  # warm-up
    seconds = []
    for _ in range(calls):
        synchronize(device)
        started = time.perf_counter()
        action()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


class StepTimer:
    """Times every forward of `module` (synchronizing around it on CUDA, so only while attached): the seconds
    per denoising step inside a real pipeline run, served or direct."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.seconds: list[float] = []
        self._device = device
        self._started = 0.0
        self._hooks = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, *_: object) -> None:
        synchronize(self._device)
        self._started = time.perf_counter()

    def _after(self, *_: object) -> None:
        synchronize(self._device)
        self.seconds.append(time.perf_counter() - self._started)

    def detach(self) -> float:
        for hook in self._hooks:
            hook.remove()
        return statistics.median(self.seconds)


class PeakMemory:
    """Peak memory while the block runs: CUDA's peak allocation, or on the CPU the process's resident size
    sampled every 5 ms (the CPU figure includes everything the process holds)."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            process = psutil.Process()
            self.peak_bytes = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._sampler.join()


def vae_decode(pipe: Any, size: int, calls: int = 3) -> float:
    """Median seconds of the server's final decode (pipeline/decoding.py: VAE decode, 8-bit pixels, to the CPU) of
    one `size`x`size` image from random latents, after a warm-up."""
    return median_seconds(decode_action(pipe, size), pipe.vae.device.type, calls)


def decode_action(pipe: Any, size: int) -> Callable[[], object]:
    """The server's final decode of one `size`x`size` image from the same random latents at every call."""
    from pipeline.decoding import decode

    vae = pipe.vae
    latents = torch.randn((1, vae.config.latent_channels, size // 8, size // 8), device=vae.device, dtype=vae.dtype)
    return lambda: decode(pipe, latents)


def vae_encode(pipe: Any, size: int, calls: int = 3) -> float:
    """Median seconds of one `size`x`size` reference's VAE encode as an edit runs it (diffusers'
    `_encode_vae_image`: the encoder, then the latents' patchify and normalisation), after a warm-up."""
    from pipeline.internals import encode_image_latents

    vae = pipe.vae
    generator = torch.Generator(device="cpu").manual_seed(0)
    pixels = (torch.rand((1, 3, size, size), generator=generator) * 2 - 1).to(vae.device, vae.dtype)

    def one() -> None:
        with torch.inference_mode():
            encode_image_latents(pipe, pixels)

    return median_seconds(one, vae.device.type, calls)


def text_encode(pipe: Any, calls: int = 3, *, read_depth: bool = False, graph: bool = False) -> float:
    """Median seconds of the text encoder on one new prompt through `encode_prompt` (512 tokens), after a
    warm-up: the whole encoder as plain diffusers runs it, or (`read_depth`) as the server's runner runs it, up to
    the deepest layer FLUX.2 reads and without logits (pipeline/encoder_depth.py), and (`graph`) replayed from the
    encoder's CUDA graphs where it has them (pipeline/encoder_graphs.py)."""
    from pipeline.internals import execution_device

    return median_seconds(encode_action(pipe, read_depth=read_depth, graph=graph), execution_device(pipe).type, calls)


def encode_action(pipe: Any, *, read_depth: bool = False, graph: bool = False) -> Callable[[], None]:
    """The text encode of a new prompt at every call (`text_encode` says what `read_depth` and `graph` change)."""
    from pipeline.encoder_depth import reading_depth
    from pipeline.encoder_graphs import graphed
    from pipeline.internals import execution_device

    device = execution_device(pipe)
    takes = itertools.count()

    def one() -> None:
        with (
            torch.inference_mode(),
            reading_depth(pipe) if read_depth else contextlib.nullcontext(),
            graphed(pipe) if graph else contextlib.nullcontext(),
        ):
            pipe.encode_prompt(
                prompt=[f"a lighthouse on a cliff, take {next(takes)}"], device=device, num_images_per_prompt=1
            )

    return one


def text_encoder_layers(pipe: Any) -> torch.nn.ModuleList:
    """The text encoder's decoder layers (Qwen3's model.layers, Mistral3's model.language_model.layers)."""
    from pipeline.encoder_depth import decoder_layers

    layers = decoder_layers(pipe.text_encoder)
    if layers is None:
        raise ValueError("no decoder layers found in the text encoder")
    return layers


def compile_text_encoder_layers(pipe: Any, on: bool) -> None:
    """Regional compilation of the text encoder (each decoder layer compiled in place, one graph for all, as
    diffusers' `compile_repeated_blocks` does for the transformer), or back to eager."""
    for layer in text_encoder_layers(pipe):
        if on:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None


def timed(device: str, action: Callable[[], float | None]) -> tuple[float, int]:
    """(seconds, peak bytes) of one call of `action`; an action that returns a number reports that instead of
    its wall time (a per-step figure)."""
    with PeakMemory(device) as memory:
        synchronize(device)
        started = time.perf_counter()
        value = action()
        synchronize(device)
        seconds = time.perf_counter() - started
    return (seconds if value is None else value), memory.peak_bytes


def reference_images(count: int, size: int) -> tuple[list[bytes], list[Image.Image]]:
    """`count` smooth, photo-like `size`x`size` images (upscaled random colour fields), as PNG bytes and PIL."""
    import numpy as np

    images = []
    for index in range(count):
        field = np.random.default_rng(index).integers(0, 256, (12, 12, 3), dtype=np.uint8)
        images.append(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC))
    return [encode_image(image, "png") for image in images], images


def mask_images(size: int) -> tuple[bytes, Image.Image]:
    """A mask repainting the central quarter: as the API takes it (PNG, transparent = repaint) and as diffusers'
    inpaint pipeline takes it ("L", white = repaint)."""
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    api = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    api.paste((0, 0, 0, 0), box)
    plain = Image.new("L", (size, size), 0)
    plain.paste(255, box)
    buffer = io.BytesIO()
    api.save(buffer, format="PNG")
    return buffer.getvalue(), plain


# The layers a FLUX.2 LoRA commonly adapts (ai-toolkit's and kohya's attention targets): the double blocks' image and
# text attention projections and the single blocks' fused QKV+MLP input projection (the single blocks' `attn.to_out`
# shares its name's tail with the double blocks' ModuleList `to_out`, so it is left out).
LORA_TARGETS = (
    *("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "to_qkv_mlp_proj",
)


def write_random_loras(transformer: Any, folder: Path, count: int, rank: int = 32) -> list[str]:
    """`count` LoRA files with random weights for `transformer` (rank `rank` on LORA_TARGETS, diffusers' peft layout,
    as `save_lora_weights` writes it), each `lora{i}.safetensors` in `folder`; their `--lora` values. The weights are
    small (an adapted layer's output moves by ~2 %): they are there for the time they take, as the random model's."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    linears = [
        (name, module)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in LORA_TARGETS)
    ]
    values = []
    for index in range(count):
        state = {}
        for name, linear in linears:
            down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=generator) * 0.01 / rank**0.5
            state[f"transformer.{name}.lora_A.weight"] = down.to(linear.weight.dtype)
            state[f"transformer.{name}.lora_B.weight"] = up.to(linear.weight.dtype)
        path = folder / f"lora{index}.safetensors"
        save_file(state, path)
        values.append(f"lora{index}={path}")
    return values
