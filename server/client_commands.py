"""The client commands, `generate` and `edit`: send a request to a running flux2-local server, show its progress
and save the images (the work is in client.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .client import ClientError, output_format_for, run_request

_SERVER = typer.Option("--server", envvar="FLUX2_SERVER", help="The server's base URL.")
_API_KEY = typer.Option(
    "--api-key", envvar="FLUX2_API_KEY", help="API key, if the server needs one.", show_default=False
)


def _client_fields(size, aspect_ratio, resolution, n, seed, steps, guidance, output_format, model, prompt) -> dict:
    return {
        "prompt": prompt,
        "model": model,
        "size": size,
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "n": n,
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "output_format": output_format,
    }


def _run_client(
    endpoint: str,
    fields: dict,
    images: list[Path],
    mask: Path | None,
    output: Path | None,
    server: str,
    api_key: str | None,
) -> None:
    try:
        fields = {**fields, "output_format": output_format_for(output, fields.get("output_format"))}
        saved = run_request(server, api_key, endpoint, fields, images, mask, output)
    except ClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    for image in saved:
        typer.echo(f"{image.path}  ({image.size}, seed {image.seed})")


def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="File to write (numbered when n > 1; its extension sets the format unless --format does). "
            "Default: flux2-SEED.FORMAT here.",
            show_default=False,
        ),
    ] = None,
    size: Annotated[str | None, typer.Option(help='"WxH", "W:H" or "auto".', show_default=False)] = None,
    aspect_ratio: Annotated[str | None, typer.Option(help='e.g. "16:9".', show_default=False)] = None,
    resolution: Annotated[str | None, typer.Option(help='e.g. "1K", "2K", "0.25".', show_default=False)] = None,
    n: Annotated[int | None, typer.Option("-n", help="Number of images (1-10).", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image.", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.", show_default=False)] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale.", show_default=False)] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="png, jpeg, webp, gif or avif.", show_default=False)
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model id or alias.", show_default=False)] = None,
    server: Annotated[str, _SERVER] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, _API_KEY] = None,
) -> None:
    """Generate images on a running flux2-local server, with a progress bar, and save them."""
    fields = _client_fields(size, aspect_ratio, resolution, n, seed, steps, guidance, output_format, model, prompt)
    _run_client("generations", fields, [], None, output, server, api_key)


def edit(
    prompt: Annotated[str, typer.Argument(help="What to change or make from the images.")],
    image: Annotated[
        list[Path],
        typer.Option(
            "-i", "--image", exists=True, dir_okay=False, help="An input image; repeat for several (up to 10)."
        ),
    ],
    mask: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            show_default=False,
            help="PNG with alpha, the first image's size: transparent = repaint.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="File to write (numbered when n > 1; its extension sets the format unless --format does).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        str | None, typer.Option(help='"WxH", "W:H" or "auto" (default: the first image).', show_default=False)
    ] = None,
    aspect_ratio: Annotated[str | None, typer.Option(show_default=False)] = None,
    resolution: Annotated[str | None, typer.Option(show_default=False)] = None,
    n: Annotated[int | None, typer.Option("-n", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(show_default=False)] = None,
    guidance: Annotated[float | None, typer.Option(show_default=False)] = None,
    output_format: Annotated[str | None, typer.Option("--format", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(show_default=False)] = None,
    server: Annotated[str, _SERVER] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, _API_KEY] = None,
) -> None:
    """Edit or combine images on a running flux2-local server, with a progress bar, and save the results."""
    fields = _client_fields(size, aspect_ratio, resolution, n, seed, steps, guidance, output_format, model, prompt)
    _run_client("edits", fields, image, mask, output, server, api_key)
