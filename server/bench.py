"""`flux2-local bench`: what the engine's batching buys, measured in one run.

(a) N requests one by one through a real server, (b) N concurrent requests through it, (c) one direct diffusers
call with a batch of N on the same settings, (d) N direct single calls. Also the prompt-embedding cache: a
request with a new prompt against the same request repeated. Each figure is the median of `repeats` runs; prompts
are made unique per run so that no cache flatters the batching figures."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def run_bench(model: Path | None, size: int, steps: int, count: int, repeats: int, port: int | None) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    from pipeline.tiny_weights import build_tiny_weights

    workdir = Path(tempfile.mkdtemp(prefix="flux2-bench-"))
    folder = model or build_tiny_weights(workdir / "tiny-klein", "klein")
    server = _start_server(folder, workdir, port, count)
    body = {"size": f"{size}x{size}", "num_inference_steps": steps, "response_format": "b64_json"}
    tag = iter(range(10**9))
    # One pooled client, as an application (or the OpenAI SDK) keeps one: connection set-up is not the server's.
    client = httpx.Client(base_url=server["url"], timeout=600, limits=httpx.Limits(max_connections=count * 2))

    def request(prompt: str, seed: int) -> None:
        response = client.post("/v1/images/generations", json={**body, "prompt": prompt, "seed": seed})
        response.raise_for_status()

    def unique_prompts() -> list[str]:
        run = next(tag)
        return [f"bench run {run} image {i}: a lighthouse on a cliff at dusk" for i in range(count)]

    def sequential() -> float:
        prompts = unique_prompts()
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            request(prompt, i)
        return time.perf_counter() - started

    def concurrent() -> float:
        prompts = unique_prompts()
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(request, prompts, range(count)))
        return time.perf_counter() - started

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def direct(prompts: list[str]) -> None:
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        pipe(
            prompt=prompts,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=generators,
            guidance_scale=1.0 if getattr(pipe.config, "is_distilled", False) else 4.0,
        )

    def direct_batch() -> float:
        prompts = unique_prompts()
        started = time.perf_counter()
        direct(prompts)
        return time.perf_counter() - started

    def direct_singles() -> float:
        prompts = unique_prompts()
        started = time.perf_counter()
        for prompt in prompts:
            direct([prompt])
        return time.perf_counter() - started

    def streamed(size_: int, steps_: int, partials: int) -> float:
        """One request read to its end: plain JSON (partials = -1) or streamed with `partials` previews."""
        payload = {
            **body,
            "size": f"{size_}x{size_}",
            "num_inference_steps": steps_,
            "prompt": unique_prompts()[0],
            "seed": 1,
        }
        if partials >= 0:
            payload.update(stream=True, partial_images=partials)
        started = time.perf_counter()
        with client.stream("POST", "/v1/images/generations", json=payload) as response:
            response.raise_for_status()
            for _ in response.iter_bytes():
                pass
        return time.perf_counter() - started

    def cache_pair() -> tuple[float, float]:
        prompt = unique_prompts()[0]
        started = time.perf_counter()
        request(prompt, 0)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        request(prompt, 1)
        return cold, time.perf_counter() - started

    try:
        request("warm-up", 0)
        concurrent()
        direct_batch()
        figures = {
            "sequential": [],
            "concurrent": [],
            "direct_batch": [],
            "direct_singles": [],
            "cold": [],
            "cached": [],
            "plain": [],
            "stream3": [],
            "plain_large": [],
            "stream3_large": [],
        }
        for _ in range(repeats):
            figures["sequential"].append(sequential())
            figures["concurrent"].append(concurrent())
            figures["direct_batch"].append(direct_batch())
            figures["direct_singles"].append(direct_singles())
            cold, cached = cache_pair()
            figures["cold"].append(cold)
            figures["cached"].append(cached)
            figures["plain"].append(streamed(size, steps, -1))
            figures["stream3"].append(streamed(size, steps, 3))
            figures["plain_large"].append(streamed(1024, 20, -1))
            figures["stream3_large"].append(streamed(1024, 20, 3))
    finally:
        client.close()
        server["process"].terminate()
        server["process"].wait(30)
    return {name: statistics.median(values) for name, values in figures.items()}


def _start_server(folder: Path, workdir: Path, port: int | None, count: int) -> dict:
    import socket
    import subprocess

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 (the server process writes to it while it runs)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--output-dir",
            str(workdir / "outputs"),
            "--max-batch-images",
            str(count),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: see {workdir / 'server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return {"process": process, "url": url}
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not become healthy")


def report(figures: dict, size: int, steps: int, count: int) -> str:
    a, b, c, d = (figures[k] for k in ("sequential", "concurrent", "direct_batch", "direct_singles"))
    lines = [
        f"{count} images at {size}x{size}, {steps} steps (median of repeated runs):",
        f"  (a) {count} requests one by one through the server : {a:7.3f} s",
        f"  (b) {count} concurrent requests through the server : {b:7.3f} s",
        f"  (c) one direct pipeline call, batch of {count}       : {c:7.3f} s",
        f"  (d) {count} direct single pipeline calls            : {d:7.3f} s",
        f"  batching in the server, (a)/(b)          = {a / b:5.2f}x faster (target >= 1.3x)",
        f"  server overhead against diffusers, (b)/(c) = {b / c:5.2f}x (target <= 1.1x)",
        f"  what a direct batch buys, (d)/(c)        = {d / c:5.2f}x",
        f"  prompt cache: new prompt {figures['cold']:.3f} s, same prompt again {figures['cached']:.3f} s "
        f"({(1 - figures['cached'] / figures['cold']) * 100:.0f} % saved)",
        f"  streaming 3 partial images (target <= +10 %): {size}x{size}/{steps} steps "
        f"{figures['plain']:.3f} s -> {figures['stream3']:.3f} s ({_extra(figures, 'plain', 'stream3')}); "
        f"1024x1024/20 steps {figures['plain_large']:.3f} s -> {figures['stream3_large']:.3f} s "
        f"({_extra(figures, 'plain_large', 'stream3_large')})",
    ]
    return "\n".join(lines)


def _extra(figures: dict, base: str, measured: str) -> str:
    return f"{(figures[measured] / figures[base] - 1) * 100:+.0f} %"
