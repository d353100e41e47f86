"""The `flux2-local` command: `serve` the OpenAI image API (its options are the table in options.py), build
`tiny-weights`."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.engine import Engine
from pipeline.loader import quiet_progress_bars
from pipeline.model_choice import ModelChoiceError, resolve_models
from pipeline.pool import ModelPool

from .app import create_app
from .metrics import Metrics
from .options import ServeConfig, check_choice, serve_command
from .request_ids import configure_logging
from .runtime import serve_app
from .settings import model_ids_for

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A local OpenAI-compatible image API server for FLUX.2 weights (diffusers).")
log = logging.getLogger("flux2")

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@app.command()
@serve_command
def serve(config: ServeConfig) -> None:
    """Serve the OpenAI image API (/v1/images/generations, /v1/images/edits, /v1/models, /health, /metrics)."""
    settings = config.settings
    configure_logging(settings.log_level)
    quiet_progress_bars()
    if not settings.api_keys and settings.host not in _LOCAL_HOSTS:
        log.warning("\n%s\n  NO API KEY, and listening on %s: anyone who can reach this address can use the GPU "
                    "and read the images.\n  Set --api-key (or FLUX2_API_KEYS / --api-key-file), or bind "
                    "127.0.0.1.\n%s", "*" * 96, settings.host, "*" * 96)
    try:
        served = resolve_models(config.models)
    except ModelChoiceError as exc:
        log.error("%s", exc)
        raise typer.Exit(code=2) from exc
    settings = replace(settings, model_ids=model_ids_for([(c.name, c.spec.aliases) for c in served.configs]),
                       test_models=served.test_models)
    log.info("serving ids: %s", ", ".join(f"{i} -> {n}" if i != n else i for i, n in settings.model_ids.items()))
    metrics = Metrics()
    engine = Engine(ModelPool(served.configs, max_loaded=config.models.max_loaded), config.engine,
                    on_batch=metrics.observe_batch)
    serve_app(create_app(settings, engine, metrics=metrics), settings.host, settings.port, settings.log_level,
              settings.shutdown_timeout)


@app.command("tiny-weights")
def tiny_weights(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline into.")],
    variant: Annotated[str, typer.Option(help="klein (Flux2KleinPipeline, Qwen3 encoder) or dev (Flux2Pipeline, "
                                         "Mistral3 encoder + PixtralProcessor).")] = "klein",
) -> None:
    """Build tiny random-weight FLUX.2 weights (real classes, about 860 KB) offline, for tests and trying the API."""
    from pipeline.tiny_weights import VARIANTS, build_tiny_weights

    check_choice(variant, VARIANTS, "--variant")
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
