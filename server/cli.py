"""The `flux2-local` command: `serve` the OpenAI image API, build `tiny-weights`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.placement import DEVICE_CHOICES, DTYPE_CHOICES, OFFLOAD_CHOICES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A local OpenAI-compatible image API server for FLUX.2 weights (diffusers).")
log = logging.getLogger("flux2")

def _env(name: str) -> str:
    return f"FLUX2_{name}"


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=option)
    return value


@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option(
        envvar=_env("MODEL"), show_default=False,
        help="A local diffusers folder (e.g. /models/FLUX.2-dev) or a Hugging Face hub id (fetched once, then read "
             "from the hub cache); NAME=PATH_OR_ID names it. Repeat to serve several models: the first is the "
             "default and loads at start, the others load on first use and are evicted least-recently-used when "
             "memory runs short. Default: the diffusers folder found in --weights-dir, else tiny random test "
             "weights built there on first start.")] = None,
    host: Annotated[str, typer.Option(envvar=_env("HOST"), help="Address to bind. Keep 127.0.0.1 unless you "
                                      "mean to serve your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar=_env("PORT"), help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(envvar=_env("DEVICE"), help="auto (CUDA when present, else CPU), cuda "
                                        "or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(envvar=_env("DTYPE"), help="auto (bfloat16 on CUDA, float32 on CPU), "
                                       "bfloat16, float16 or float32.")] = "auto",
    offload: Annotated[str, typer.Option(envvar=_env("OFFLOAD"), help="CUDA only. auto: keep everything on the "
                                         "GPU when the weights fit in free memory with margin, else model CPU "
                                         "offload; none; model (whole sub-models move to the GPU in turn); "
                                         "sequential (layer by layer: least memory, slowest).")] = "auto",
    model_name: Annotated[Optional[str], typer.Option(
        envvar=_env("MODEL_NAME"), show_default=False,
        help="The id clients use for the (first) model, listed in /v1/models. Default: the folder name or hub "
             "id. Aliases such as flux.2-flex, flux.2-dev, flux.2-klein-4b are added as fit the model.")] = None,
    output_dir: Annotated[Path, typer.Option(envvar=_env("OUTPUT_DIR"), help="Where generated images are kept "
                                             "for url responses.")] = Path("outputs"),
    weights_dir: Annotated[Path, typer.Option(envvar=_env("WEIGHTS_DIR"), help="Where to look for a model when "
                                              "--model is not given (and where tiny weights are built).")
                           ] = Path("weights"),
    public_url: Annotated[Optional[str], typer.Option(
        envvar=_env("PUBLIC_URL"), show_default=False,
        help="Base of the image URLs handed out (e.g. https://gpu-box.lan:8000). Default: the address the client "
             "called, as the Host or X-Forwarded-Host/-Proto headers give it.")] = None,
    retention_hours: Annotated[float, typer.Option(envvar=_env("RETENTION_HOURS"), help="Generated files older "
                                                   "than this are deleted.")] = 24.0,
    max_stored_images: Annotated[int, typer.Option(envvar=_env("MAX_STORED_IMAGES"), help="At most this many "
                                                   "generated files are kept; the oldest go first.")] = 1000,
    max_steps: Annotated[int, typer.Option(envvar=_env("MAX_STEPS"), help="Largest num_inference_steps a "
                                           "request may ask for.")] = 100,
    max_batch_images: Annotated[int, typer.Option(envvar=_env("MAX_BATCH_IMAGES"), help="Images that compatible "
                                                  "requests (same model, size, steps, guidance, references) may "
                                                  "share in one pipeline call.")] = 4,
    batch_window_ms: Annotated[float, typer.Option(envvar=_env("BATCH_WINDOW_MS"), help="How long the first job "
                                                   "of a batch waits for compatible ones.")] = 20.0,
    max_queue_images: Annotated[int, typer.Option(envvar=_env("MAX_QUEUE_IMAGES"), help="Images allowed to wait; "
                                                  "beyond, requests get 429 with a Retry-After estimate.")] = 64,
    request_timeout: Annotated[float, typer.Option(envvar=_env("REQUEST_TIMEOUT"), help="Seconds a request may "
                                                   "wait and run; then it is cancelled (504).")] = 600.0,
    shutdown_timeout: Annotated[float, typer.Option(envvar=_env("SHUTDOWN_TIMEOUT"), help="On SIGTERM, seconds "
                                                    "in-flight work may take to finish before it is cancelled.")
                                ] = 30.0,
    max_loaded_models: Annotated[int, typer.Option(envvar=_env("MAX_LOADED_MODELS"), help="With several "
                                                   "--model: at most this many in memory at once (0: as many "
                                                   "as fit).")] = 0,
    prompt_cache_mb: Annotated[int, typer.Option(envvar=_env("PROMPT_CACHE_MB"), help="CPU memory for cached "
                                                 "prompt embeddings (LRU).")] = 512,
    metrics: Annotated[bool, typer.Option(envvar=_env("METRICS"), help="Serve Prometheus metrics at /metrics.")
                       ] = True,
    api_key: Annotated[Optional[list[str]], typer.Option(
        envvar=_env("API_KEYS"), show_default=False,
        help="A key clients must send as 'Authorization: Bearer KEY' on every /v1 route (repeat for several; the "
             "env var takes them comma- or space-separated). Without any key the API is open: keep --host "
             "127.0.0.1 then.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(envvar=_env("API_KEY_FILE"), show_default=False,
                                                         help="A file of keys, one per line (# comments).")] = None,
    public_files: Annotated[bool, typer.Option(envvar=_env("PUBLIC_FILES"), help="Serve generated image URLs "
                                               "without a key (their names are unguessable).")] = False,
    open_metrics: Annotated[bool, typer.Option(envvar=_env("OPEN_METRICS"), help="Serve /metrics without a key "
                                               "when keys are set.")] = False,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        envvar=_env("CORS_ORIGINS"), show_default=False,
        help="Allow browser pages from this origin (e.g. https://tools.studio.lan; '*' for any) to call the API. "
             "Repeat for several. Default: no CORS.")] = None,
    max_body_mb: Annotated[int, typer.Option(envvar=_env("MAX_BODY_MB"), help="Largest request body.")] = 256,
    max_image_mb: Annotated[int, typer.Option(envvar=_env("MAX_IMAGE_MB"), help="Largest input image file.")
                            ] = 50,
    max_input_megapixels: Annotated[float, typer.Option(envvar=_env("MAX_INPUT_MEGAPIXELS"), help="Largest "
                                                        "input image, in decoded pixels (decompression bombs).")
                                    ] = 50.0,
    max_output_megapixels: Annotated[float, typer.Option(envvar=_env("MAX_OUTPUT_MEGAPIXELS"), help="Outputs "
                                                         "above this are scaled down, aspect kept (1 MP = "
                                                         "1024x1024; the product's ceiling is 4).")] = 4.0,
    max_prompt_chars: Annotated[int, typer.Option(envvar=_env("MAX_PROMPT_CHARS"), help="Longest prompt "
                                                  "accepted, in characters.")] = 20_000,
    playground: Annotated[bool, typer.Option(envvar=_env("PLAYGROUND"), help="Serve the Playground page at / "
                                             "(--no-playground turns it off).")] = True,
    playground_open: Annotated[bool, typer.Option(envvar=_env("PLAYGROUND_OPEN"), help="With API keys set, let "
                                                  "the Playground page call the API without one (anyone who can "
                                                  "open the page can then use the GPU).")] = False,
    allow_remote_images: Annotated[bool, typer.Option(envvar=_env("ALLOW_REMOTE_IMAGES"), help="Fetch http(s) "
                                                      "image_url inputs (public addresses only, each redirect "
                                                      "checked, size and time capped). Off: the server never "
                                                      "connects out.")] = False,
    remote_image_timeout: Annotated[float, typer.Option(envvar=_env("REMOTE_IMAGE_TIMEOUT"), help="Seconds a "
                                                        "remote image may take to fetch.")] = 10.0,
    log_level: Annotated[str, typer.Option(envvar=_env("LOG_LEVEL"), help="debug, info, warning or error.")
                         ] = "info",
) -> None:
    """Serve the OpenAI image API (/v1/images/generations, /v1/images/edits, /v1/models, /health, /metrics)."""
    from pipeline.engine import Engine, EngineOptions
    from pipeline.loader import quiet_progress_bars
    from pipeline.model_choice import ModelChoice, ModelChoiceError, resolve_models
    from pipeline.pool import ModelPool

    from .app import create_app
    from .metrics import Metrics
    from .request_ids import configure_logging
    from .runtime import serve_app
    from .settings import Settings, model_ids_for

    configure_logging(log_level)
    quiet_progress_bars()
    _choice(device, DEVICE_CHOICES, "--device")
    _choice(dtype, DTYPE_CHOICES, "--dtype")
    _choice(offload, OFFLOAD_CHOICES, "--offload")

    from .auth import load_keys

    keys = load_keys(api_key or [], api_key_file)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("\n%s\n  NO API KEY, and listening on %s: anyone who can reach this address can use the GPU "
                    "and read the images.\n  Set --api-key (or FLUX2_API_KEYS / --api-key-file), or bind "
                    "127.0.0.1.\n%s", "*" * 96, host, "*" * 96)
    choice = ModelChoice(sources=tuple(model or ()), first_name=model_name, weights_dir=weights_dir, device=device,
                         dtype=dtype, offload=offload, max_loaded=max_loaded_models)
    try:
        served = resolve_models(choice)
    except ModelChoiceError as exc:
        log.error("%s", exc)
        raise typer.Exit(code=2) from exc
    settings = Settings(model_ids=model_ids_for([(c.name, c.spec.aliases) for c in served.configs]),
                        test_models=served.test_models, output_dir=output_dir,
                        public_url=public_url, retention_seconds=retention_hours * 3600,
                        max_stored_images=max_stored_images, max_steps=max_steps, request_timeout=request_timeout,
                        metrics=metrics, api_keys=keys, public_files=public_files, open_metrics=open_metrics,
                        cors_origins=tuple(cors_origin or ()), max_body_bytes=max_body_mb * 1024**2,
                        max_image_bytes=max_image_mb * 1024**2, max_input_pixels=int(max_input_megapixels * 1e6),
                        max_output_pixels=min(4 * 1024**2, int(max_output_megapixels * 1024**2)),
                        max_prompt_chars=max_prompt_chars, allow_remote_images=allow_remote_images,
                        playground=playground, playground_open=playground_open,
                        remote_image_timeout=remote_image_timeout)
    log.info("serving ids: %s", ", ".join(f"{i} -> {n}" if i != n else i for i, n in settings.model_ids.items()))
    metrics = Metrics()
    engine = Engine(ModelPool(served.configs, max_loaded=choice.max_loaded),
                    EngineOptions(max_batch_images=max_batch_images, batch_window=batch_window_ms / 1000,
                                  max_queue_images=max_queue_images, prompt_cache_bytes=prompt_cache_mb * 1024**2),
                    on_batch=metrics.observe_batch)
    serve_app(create_app(settings, engine, shutdown_timeout=shutdown_timeout, metrics=metrics), host, port,
              log_level, shutdown_timeout)


@app.command("tiny-weights")
def tiny_weights(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline into.")],
    variant: Annotated[str, typer.Option(help="klein (Flux2KleinPipeline, Qwen3 encoder) or dev (Flux2Pipeline, "
                                         "Mistral3 encoder + PixtralProcessor).")] = "klein",
) -> None:
    """Build tiny random-weight FLUX.2 weights (real classes, about 860 KB) offline, for tests and trying the API."""
    from pipeline.tiny_weights import VARIANTS, build_tiny_weights

    _choice(variant, VARIANTS, "--variant")
    path = build_tiny_weights(out_dir, variant)  # type: ignore[arg-type]
    typer.echo(f"tiny FLUX.2 {variant} weights written to {path}")


_SERVER = typer.Option("--server", envvar="FLUX2_SERVER", help="The server's base URL.")
_API_KEY = typer.Option("--api-key", envvar="FLUX2_API_KEY", help="API key, if the server needs one.",
                        show_default=False)


def _client_fields(size, aspect_ratio, resolution, n, seed, steps, guidance, output_format, model, prompt) -> dict:
    return {"prompt": prompt, "model": model, "size": size, "aspect_ratio": aspect_ratio, "resolution": resolution,
            "n": n, "seed": seed, "num_inference_steps": steps, "guidance_scale": guidance,
            "output_format": output_format}


def _run_client(endpoint: str, fields: dict, images: list[Path], mask: Path | None, output: Path | None,
                server: str, api_key: str | None) -> None:
    from .client import ClientError, run_request

    try:
        saved = run_request(server, api_key, endpoint, fields, images, mask, output)
    except ClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    for image in saved:
        typer.echo(f"{image.path}  ({image.size}, seed {image.seed})")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="File to write (numbered when n > 1). "
                                                   "Default: flux2-SEED.FORMAT here.", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help='"WxH", "W:H" or "auto".', show_default=False)] = None,
    aspect_ratio: Annotated[Optional[str], typer.Option(help='e.g. "16:9".', show_default=False)] = None,
    resolution: Annotated[Optional[str], typer.Option(help='e.g. "1K", "2K", "0.25".', show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Number of images (1-10).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the first image.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale.", show_default=False)] = None,
    output_format: Annotated[Optional[str], typer.Option("--format", help="png, jpeg, webp, gif or avif.",
                                                         show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Model id or alias.", show_default=False)] = None,
    server: Annotated[str, _SERVER] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], _API_KEY] = None,
) -> None:
    """Generate images on a running flux2-local server, with a progress bar, and save them."""
    fields = _client_fields(size, aspect_ratio, resolution, n, seed, steps, guidance, output_format, model, prompt)
    _run_client("generations", fields, [], None, output, server, api_key)


@app.command()
def edit(
    prompt: Annotated[str, typer.Argument(help="What to change or make from the images.")],
    image: Annotated[list[Path], typer.Option("-i", "--image", exists=True, dir_okay=False,
                                              help="An input image; repeat for several (up to 10).")],
    mask: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, show_default=False,
                                                 help="PNG with alpha, the first image's size: transparent = "
                                                      "repaint.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="File to write (numbered when n > 1).",
                                                   show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help='"WxH", "W:H" or "auto" (default: the first image).',
                                                show_default=False)] = None,
    aspect_ratio: Annotated[Optional[str], typer.Option(show_default=False)] = None,
    resolution: Annotated[Optional[str], typer.Option(show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option("-n", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(show_default=False)] = None,
    output_format: Annotated[Optional[str], typer.Option("--format", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(show_default=False)] = None,
    server: Annotated[str, _SERVER] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], _API_KEY] = None,
) -> None:
    """Edit or combine images on a running flux2-local server, with a progress bar, and save the results."""
    fields = _client_fields(size, aspect_ratio, resolution, n, seed, steps, guidance, output_format, model, prompt)
    _run_client("edits", fields, image, mask, output, server, api_key)


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Option(help="A diffusers folder (default: tiny klein weights built in "
                                                  "a temporary folder).")] = None,
    size: Annotated[int, typer.Option(help="Square image side in pixels.")] = 256,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 4,
    count: Annotated[int, typer.Option(help="Images per figure (requests, batch size).")] = 4,
    repeats: Annotated[Optional[int], typer.Option(help="Runs per figure; the median is shown. Default: 5, or "
                                                   "the architecture's (3 for klein, 1 for dev).",
                                              show_default=False)] = None,
    architecture: Annotated[Optional[str], typer.Option(
        help="Instead: the full-size benchmark. klein-4b, klein-9b or dev (tiny: scaled down, for tests) built "
             "with random weights in memory on the device, served vs plain diffusers on the same weights.",
        show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="With --architecture: write the results "
                                                      "here (after every figure).", show_default=False)] = None,
    update_docs: Annotated[bool, typer.Option(help="With --architecture: rewrite this architecture's section "
                                              "of --docs.")] = False,
    docs: Annotated[Path, typer.Option(help="The performance page --update-docs rewrites.")
                    ] = Path("docs/PERFORMANCE.md"),
    device: Annotated[str, typer.Option(help="With --architecture: auto, cuda or cpu.")] = "auto",
    transformer_only: Annotated[bool, typer.Option(help="With --architecture: measure the transformer alone "
                                                   "(automatic when the whole pipeline does not fit the card).")
                                ] = False,
) -> None:
    """Measure batching: N requests one by one vs N concurrent through a real server vs one direct diffusers
    batch of N, and the prompt cache, in one run. With --architecture: the full-size benchmark."""
    from pipeline.loader import quiet_progress_bars

    from .bench import report, run_bench

    quiet_progress_bars()
    if architecture is not None:
        from .bench_fullsize import bench_command

        bench_command(architecture, device, repeats, steps, json_path, update_docs, docs, transformer_only or None)
        return
    figures = run_bench(model, size, steps, count, repeats or 5, None)
    typer.echo(report(figures, size, steps, count))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
