"""The offline tools of the command line: `tiny-weights` builds test weights, `bench` measures batching (the work
is in pipeline/tiny_weights.py and bench*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import check_choice


def tiny_weights(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline into.")],
    variant: Annotated[
        str,
        typer.Option(
            help="klein (Flux2KleinPipeline, Qwen3 encoder) or dev (Flux2Pipeline, "
            "Mistral3 encoder + PixtralProcessor)."
        ),
    ] = "klein",
) -> None:
    """Build tiny random-weight FLUX.2 weights (real classes, about 800 KB) offline, for tests and trying the API."""
    from pipeline.tiny_weights import VARIANTS, build_tiny_weights

    check_choice(variant, VARIANTS, "--variant")
    try:
        path = build_tiny_weights(out_dir, variant)  # type: ignore[arg-type]
    except OSError as exc:  # a folder that cannot be made or written
        typer.echo(f"error: cannot write the weights to {out_dir}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"tiny FLUX.2 {variant} weights written to {path}")


def bench(
    model: Annotated[
        Path | None, typer.Option(help="A diffusers folder (default: tiny klein weights built in a temporary folder).")
    ] = None,
    size: Annotated[int, typer.Option(help="Square image side in pixels.")] = 256,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 4,
    count: Annotated[int, typer.Option(help="Images per figure (requests, batch size).")] = 4,
    repeats: Annotated[
        int | None,
        typer.Option(
            help="Runs per figure; the median is shown. Default: 5, or the architecture's (3 for klein, 1 for dev).",
            show_default=False,
        ),
    ] = None,
    architecture: Annotated[
        str | None,
        typer.Option(
            help="Instead: the full-size benchmark. klein-4b, klein-9b or dev (tiny: scaled down, for tests) built "
            "with random weights in memory on the device, served vs plain diffusers on the same weights.",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", help="With --architecture: write the results here (after every figure).", show_default=False
        ),
    ] = None,
    update_docs: Annotated[
        bool, typer.Option(help="With --architecture: rewrite this architecture's section of --docs.")
    ] = False,
    docs: Annotated[Path, typer.Option(help="The performance page --update-docs rewrites.")] = Path(
        "docs/PERFORMANCE.md"
    ),
    device: Annotated[str, typer.Option(help="With --architecture: auto, cuda or cpu.")] = "auto",
    transformer_only: Annotated[
        bool,
        typer.Option(
            help="With --architecture: measure the transformer alone "
            "(automatic when the whole pipeline does not fit the card)."
        ),
    ] = False,
    memory_cap: Annotated[
        float | None,
        typer.Option(
            help="With --architecture, CUDA only: cap this process at GB GiB of the card "
            "(torch.cuda.set_per_process_memory_fraction) and run --offload auto under it: the plan, seconds per "
            "1024x1024 image and peak memory, or 'does not fit'.",
            show_default=False,
        ),
    ] = None,
    memory_caps: Annotated[
        str | None,
        typer.Option(
            help="With --architecture: several caps, e.g. 8,12,16,24,48, each in a fresh process; one table.",
            show_default=False,
        ),
    ] = None,
    offload: Annotated[
        str | None,
        typer.Option(
            help="With --memory-cap: force this offload plan (resident, encoder-swapped, encoder-streamed, "
            "transformer-resident, block-streaming) instead of auto. In --memory-caps write a cap as 12@PLAN.",
            show_default=False,
        ),
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            help="With --architecture: quantize components, e.g. transformer=fp8 (as serve's); the full-size "
            "bench first times plain diffusers on the eager bf16 pipeline."
        ),
    ] = "none",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="With --architecture: compile the pipeline as serve --compile does (after timing plain diffusers "
            "on the eager pipeline); both columns then run the compiled modules. With one --memory-cap: compile "
            "after placing (in --memory-caps write a cap as 12+compile).",
        ),
    ] = False,
    loras: Annotated[
        int,
        typer.Option(
            help="With --architecture: load N random rank-32 LoRA adapters into the served model (as serve --lora "
            "does; switched by scale under --compile), after timing plain diffusers on the eager pipeline; adds "
            "the figure one_image_lora (one of them at 0.8, each run right after an image with none).",
        ),
    ] = 0,
    attention: Annotated[
        str,
        typer.Option(
            help="With --architecture: the transformer's attention kernel, as serve's --attention (sdpa, cudnn, "
            "flash, efficient, math), pinned after timing plain diffusers with torch's pick.",
        ),
    ] = "sdpa",
    only: Annotated[
        str | None,
        typer.Option(
            help="With --architecture: measure only these figures/checks (keys as in the JSON, comma-separated, "
            "e.g. one_image,sequential_4,pipeline_step,step_cache,reference_cache,profile); with --memory-cap(s): "
            "one_image leaves out the image of twice the side.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure batching: N requests one by one vs N concurrent through a real server vs one direct diffusers
    batch of N, and the prompt cache, in one run. With --architecture: the full-size benchmark."""
    from pipeline.loader import quiet_progress_bars

    from .bench import report, run_bench

    quiet_progress_bars()
    if architecture is not None:
        _stacks_when_stopped()
    if memory_cap is not None or memory_caps is not None:
        if architecture is None:
            raise typer.BadParameter("needs --architecture", param_hint="--memory-cap")
        from .bench_memory import memory_command

        memory_command(
            architecture, memory_cap, memory_caps, quantize, steps, repeats, json_path, offload, only, compile
        )
        return
    if offload is not None:
        raise typer.BadParameter("goes with --memory-cap", param_hint="--offload")
    if architecture is not None:
        from .bench_fullsize import bench_command
        from .bench_speed import parse_speed_options

        try:
            speed = parse_speed_options(compile, quantize, only, loras, attention)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        bench_command(
            architecture, device, repeats, steps, json_path, update_docs, docs, transformer_only or None, speed
        )
        return
    figures = run_bench(model, size, steps, count, repeats or 5, None)
    typer.echo(report(figures, size, steps, count))


def _stacks_when_stopped() -> None:
    """A full-size bench that is stopped (`.ci/gpu-checks` runs each stage under `timeout`, which sends SIGTERM)
    prints every thread's stack first, so that a stage cut short says where it was (the fp8 compile's warm-up has
    twice run out its time on a GPU without a word); with FLUX2_BENCH_STACKS_EVERY=SECONDS, also every SECONDS.
    Written to the process's own stderr (`sys.__stderr__`: faulthandler needs a file descriptor, which a captured
    `sys.stderr` may not have); nothing where there is none, or where the platform has no `faulthandler.register`."""
    import faulthandler
    import io
    import os
    import signal
    import sys

    every = os.environ.get("FLUX2_BENCH_STACKS_EVERY", "")
    try:
        seconds = float(every) if every else 0.0
    except ValueError as exc:
        raise typer.BadParameter(f"FLUX2_BENCH_STACKS_EVERY: not a number of seconds: {every!r}") from exc
    stream = sys.__stderr__
    try:
        if stream is None:
            return
        stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    if hasattr(faulthandler, "register"):  # not on Windows
        faulthandler.register(signal.SIGTERM, file=stream, all_threads=True, chain=True)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, repeat=True, file=stream)
