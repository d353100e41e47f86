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

# Below this many parameters a model can only be a test model (real FLUX.2 klein 4B has ~8 billion with its encoder).
_TEST_MODEL_PARAMS = 50_000_000

_TINY_WARNING = """
************************************************************************************************
  Serving TINY RANDOM-WEIGHT test model: {path}
  It exercises the whole API, but its images are NOISE. To serve real FLUX.2 weights:
    flux2-local serve --model black-forest-labs/FLUX.2-klein-4B        (hub id, needs internet once)
    flux2-local serve --model /models/FLUX.2-dev                       (a local diffusers folder)
  or put a diffusers folder under {weights_dir}/ and start again without --model.
************************************************************************************************"""


def _env(name: str) -> str:
    return f"FLUX2_{name}"


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=option)
    return value


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(
        envvar=_env("MODEL"), show_default=False,
        help="A local diffusers folder (e.g. /models/FLUX.2-dev) or a Hugging Face hub id (fetched once, then read "
             "from the hub cache). Default: the diffusers folder found in --weights-dir, else tiny random test "
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
        help="The model id clients use and /v1/models lists. Default: the folder name or hub id. Aliases such as "
             "flux.2-flex, flux.2-dev, flux.2-klein-4b are added as fit the model.")] = None,
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
    log_level: Annotated[str, typer.Option(envvar=_env("LOG_LEVEL"), help="debug, info, warning or error.")
                         ] = "info",
) -> None:
    """Serve the OpenAI image API (/v1/images/generations, /v1/models, /health) for one FLUX.2 model."""
    import uvicorn

    from pipeline.engine import Engine
    from pipeline.loader import load_model, quiet_progress_bars
    from pipeline.placement import PlacementError, count_weight_params, decide_placement
    from pipeline.weights import WeightsError, inspect_model, resolve_weights

    from .app import create_app
    from .settings import Settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_progress_bars()
    _choice(device, DEVICE_CHOICES, "--device")
    _choice(dtype, DTYPE_CHOICES, "--dtype")
    _choice(offload, OFFLOAD_CHOICES, "--offload")

    try:
        folder = resolve_weights(model) if model else _default_weights(weights_dir)
        spec = inspect_model(folder)
        params = count_weight_params(spec.path)
        placement = decide_placement(device, dtype, offload, weight_params=params)
    except (WeightsError, PlacementError) as exc:
        log.error("%s", exc)
        raise typer.Exit(code=2) from exc

    if params < _TEST_MODEL_PARAMS:
        log.warning(_TINY_WARNING.format(path=spec.path, weights_dir=weights_dir))
    name = model_name or (model if model and not Path(model).expanduser().is_dir() else spec.path.name)
    log.info("model: %s (%s, %s, %.1fM parameters) served as %s", spec.path, spec.pipeline_class, spec.family,
             params / 1e6, ", ".join([name, *spec.aliases]))
    for reason in placement.reasons:
        log.info("%s", reason)

    settings = Settings(model_name=name, model_aliases=spec.aliases, output_dir=output_dir, public_url=public_url,
                        retention_seconds=retention_hours * 3600, max_stored_images=max_stored_images,
                        max_steps=max_steps)
    engine = Engine(lambda: load_model(spec, placement))
    uvicorn.run(create_app(settings, engine), host=host, port=port, log_level=log_level.lower())


def _default_weights(weights_dir: Path) -> Path:
    from pipeline.tiny_weights import build_tiny_weights
    from pipeline.weights import TINY_DEFAULT_DIRNAME, find_local_weights

    found = find_local_weights(weights_dir)
    if found is not None:
        log.info("model: no --model given; serving %s found in %s", found, weights_dir)
        return found
    target = weights_dir / TINY_DEFAULT_DIRNAME
    log.warning("model: no --model given and no diffusers folder in %s: building tiny random test weights in %s",
                weights_dir, target)
    # Build beside the target and rename, so an interrupted first start never leaves a half-written folder.
    partial = build_tiny_weights(weights_dir / f".{TINY_DEFAULT_DIRNAME}.partial", "klein")
    partial.rename(target)
    return target


@app.command("tiny-weights")
def tiny_weights(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline into.")],
    variant: Annotated[str, typer.Option(help="klein (Flux2KleinPipeline, Qwen3 encoder) or dev (Flux2Pipeline, "
                                         "Mistral3 encoder + PixtralProcessor).")] = "klein",
) -> None:
    """Build tiny random-weight FLUX.2 weights (real classes, a few MB) offline, for tests and trying the API."""
    from pipeline.tiny_weights import VARIANTS, build_tiny_weights

    _choice(variant, VARIANTS, "--variant")
    path = build_tiny_weights(out_dir, variant)  # type: ignore[arg-type]
    typer.echo(f"tiny FLUX.2 {variant} weights written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
