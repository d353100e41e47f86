"""`flux2-local bench --architecture NAME`: the served path against plain diffusers on the same full-size random
weights, in one process, one run.

The pipeline is built once in memory on the device (`pipeline.architectures`: real configs, random weights, no
download, no disk). An `Engine` serves that very object through the real app under uvicorn on a loopback port,
and every figure is measured both ways, one after the other, while the other side is idle: through HTTP
(b64_json PNG, each answer read whole) and as a plain `pipe(prompt=...)` call on the same pipeline with the same
seeds and sizes plus the PNG encode (zlib level 1, as the server encodes). Each prompt is new, so no prompt
cache flatters the server. Every figure is the median of `repeats` runs after a warm-up. A dev pipeline that
does not fit the card (~112 GB in bf16) is replaced by its transformer alone, and the table says so."""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.architectures import Architecture, build_pipeline, build_transformer, model_spec, parameter_counts
from pipeline.compilation import warm_up
from pipeline.quantization import Quantization, check_quantization
from pipeline.reference_cache import install as install_reference_processors

from .bench_figures import BATCH, Figure, figures_for
from .bench_harness import (
    DirectDiffusers,
    ImageClient,
    InProcessServer,
    seeded_image,
    synchronize,
    timed,
    transformer_step,
    write_random_loras,
)
from .bench_profile import profile_served, profile_stages
from .bench_references import COUNTS as REFERENCE_COUNTS
from .bench_references import reference_cache_check
from .bench_report import count_label, environment, write_json
from .bench_speed import SpeedOptions, apply_speed_options, speed_capability

_GIB = 1024**3
# Room beyond the weights for activations, the VAE at 2048² and the CUDA context, when deciding whether a whole
# pipeline fits the card.
_HEADROOM_BYTES = 16 * _GIB

Echo = Callable[[str], None]


class _Clock:
    """Progress lines stamped with the seconds since the start, so that a run cut short still tells something."""

    def __init__(self, echo: Echo):
        self.started = time.perf_counter()
        self.echo = echo

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, message: str) -> None:
        self.echo(f"[{self.elapsed:7.1f} s] {message}")


def fits_card(weight_bytes: int, card_bytes: float) -> bool:
    """Whether a whole pipeline of `weight_bytes` runs on a card of `card_bytes` (dev in bf16, ~105 GiB: only on a
    141 GB H200, not on an 80 GB H100)."""
    return weight_bytes + _HEADROOM_BYTES <= card_bytes


def quantized_bytes(counts: dict[str, int], quantization: Quantization, itemsize: int) -> int:
    """The pipeline's weights with the components `quantization` names at one byte a parameter (int8, fp8,
    fp8-weight; the scales are a rounding error) and the others at `itemsize`."""
    schemes = dict(quantization.schemes)
    return sum(count * (1 if component in schemes else itemsize) for component, count in counts.items())


def pipeline_mode(device: str, weight_bytes: int, quantized: int, card_bytes: float, quantizing: bool) -> str:
    """What the bench builds on a card of `card_bytes` when --transformer-only is not given: the whole pipeline
    ("pipeline"); else, with --quantize, the whole pipeline quantized as it is built when that fits ("quantized at
    build": dev with `transformer=fp8,text_encoder=fp8` is ~56 GB, an 80 GB H100's), with no bf16 eager baseline;
    else the transformer alone ("transformer-only")."""
    if device != "cuda" or fits_card(weight_bytes, card_bytes):
        return "pipeline"
    if quantizing and fits_card(quantized, card_bytes):
        return "quantized at build"
    return "transformer-only"


def resolved_device(device: str) -> str:
    """The device a --device choice stands for: CUDA for "auto" when torch sees a card, else the CPU; "cuda" and
    "cpu" as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def run_fullsize_bench(
    arch: Architecture,
    device: str = "auto",
    repeats: int | None = None,
    steps: int = 4,
    json_path: Path | None = None,
    transformer_only: bool | None = None,
    echo: Echo = print,
    speed: SpeedOptions = SpeedOptions(),
    build_quantized: bool | None = None,
) -> dict:
    """Measure every figure and return the results (also written to `json_path` after each figure).
    `build_quantized`: build the pipeline with `speed`'s quantization applied as it is built, and take the eager
    baseline on those weights (None: only where the bf16 pipeline does not fit the card and that does:
    `pipeline_mode`)."""
    clock = _Clock(echo)
    device = resolved_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    repeats = repeats or arch.repeats
    counts = parameter_counts(arch)
    weight_bytes = sum(counts.values()) * dtype.itemsize
    env = environment(device)
    asked_transformer_only = bool(transformer_only)
    quantized = quantized_bytes(counts, speed.quantization, dtype.itemsize)
    if transformer_only is None:
        card = env["device_memory_gib"] * _GIB if device == "cuda" else 0.0
        mode = pipeline_mode(device, weight_bytes, quantized, card, bool(speed.quantization))
        transformer_only = mode == "transformer-only"
        if build_quantized is None:
            build_quantized = mode == "quantized at build"
    build_quantized = bool(build_quantized) and not transformer_only and bool(speed.quantization)
    results = {
        "architecture": arch.name,
        **env,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "repeats": repeats,
        "size": arch.size,
        "parameters": counts,
        "weights_gib": weight_bytes / _GIB,
        "mode": "transformer-only" if transformer_only else "pipeline",
        "quantized_at_build": str(speed.quantization) if build_quantized else None,
        "variant": speed.label(),
        "notes": [],
        "figures": [],
        "skipped": [],
        "complete": False,
    }
    if device == "cpu":
        results["notes"].append("On the CPU, peak memory is the whole process's resident size.")
    if build_quantized:
        results["notes"].append(
            f"Built with --quantize {speed.quantization} applied as each component was built "
            f"({quantized / _GIB:.1f} GiB; {weight_bytes / _GIB:.1f} GiB in {results['dtype']} do not fit this card, "
            "or the run asked so): the eager baseline is plain diffusers on those quantized weights, uncompiled."
        )
    clock.say(
        f"{arch.name}: {count_label(sum(counts.values()))} parameters ({weight_bytes / _GIB:.1f} GiB in "
        f"{results['dtype']}) on {env['device']}; {steps} steps, {repeats} run(s) per figure"
    )

    def save() -> None:
        results["total_s"] = clock.elapsed
        if json_path is not None:
            write_json(results, json_path)

    if transformer_only:
        _transformer_only(arch, device, dtype, weight_bytes, asked_transformer_only, results, clock, save, speed)
    else:
        _whole_pipeline(arch, device, dtype, steps, repeats, results, clock, save, speed, build_quantized)
    results["complete"] = True
    save()
    clock.say("done")
    return results


def _transformer_only(
    arch: Architecture,
    device: str,
    dtype: torch.dtype,
    weight_bytes: int,
    asked: bool,
    results: dict,
    clock: _Clock,
    save: Callable[[], None],
    speed: SpeedOptions,
) -> None:
    if asked:
        results["notes"].append("Only the transformer was built and measured (--transformer-only).")
    else:
        results["notes"].append(
            f"The whole {arch.name} pipeline needs {weight_bytes / _GIB:.0f} GiB of {results['dtype']} weights plus "
            f"room to run; this card has {results['device_memory_gib']:.0f} GiB. Only the transformer was built and "
            f"measured; the served figures need a card of ~{(weight_bytes + _HEADROOM_BYTES) / _GIB:.0f} GiB or "
            "more (a 141 GB H200)."
        )
    started = time.perf_counter()
    transformer = build_transformer(arch, device, dtype)
    synchronize(device)
    results["build_s"] = time.perf_counter() - started
    clock.say(f"built the transformer alone in {results['build_s']:.1f} s")
    if speed:
        eager = transformer_step(transformer, arch.size)
        results["eager_baseline"] = {"key": f"transformer_step_{arch.size}", "direct_s": eager}
        clock.say(f"eager baseline: s/step, transformer alone, {arch.size}x{arch.size}: {eager:.3f} s")
        results["speed_setup_s"] = apply_speed_options(
            SimpleNamespace(transformer=transformer), speed, device, lambda: transformer_step(transformer, arch.size)
        )
        clock.say(f"{speed.label()} applied in {results['speed_setup_s']:.1f} s")
    for side in (arch.size, 2 * arch.size):
        figure = Figure(
            f"transformer_step_{side}",
            f"s/step, transformer alone, {side}x{side}",
            None,
            lambda side=side: transformer_step(transformer, side),
            "direct transformer call",
        )
        results["figures"].append(_guarded(figure, lambda f=figure: _measure(f, 1, device, clock), clock))
        save()
    results["skipped"] = [
        f.label for f in figures_for(arch, None, None, None, steps=0, device=device) if f.served is not None
    ]


def _whole_pipeline(
    arch: Architecture,
    device: str,
    dtype: torch.dtype,
    steps: int,
    repeats: int,
    results: dict,
    clock: _Clock,
    save: Callable[[], None],
    speed: SpeedOptions,
    build_quantized: bool = False,
) -> None:
    from pipeline.adapters import Adapters, LoadedAdapters, adapters_from_options
    from pipeline.encoder_graphs import install as install_encoder_graphs
    from pipeline.engine import Engine
    from pipeline.loader import LoadedModel
    from pipeline.placement import Placement, encoder_graphs_fit, transformer_graphs_fit
    from pipeline.pool import ModelConfig, ModelPool, settle_heap
    from pipeline.transformer_graphs import install as install_transformer_graphs

    from .app import create_app
    from .settings import Settings, model_ids_for

    started = time.perf_counter()
    if build_quantized:  # as the memory bench builds dev for small cards: quantized on the device, one by one
        check_quantization(speed.quantization, device, speed_capability(device))
        pipe = build_pipeline(arch, device, dtype, quantization=speed.quantization)
    else:
        pipe = build_pipeline(arch, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()  # the random initialisation runs on the device: wait for it before timing
        results["weights_resident_gib"] = torch.cuda.memory_allocated() / _GIB
        results["build_peak_gib"] = torch.cuda.max_memory_allocated() / _GIB  # the bench's first use of the card
    results["build_s"] = time.perf_counter() - started
    built = f" with --quantize {speed.quantization}" if build_quantized else ""
    peak = f", peak {results['build_peak_gib']:.1f} GiB on the card" if "build_peak_gib" in results else ""
    clock.say(f"built the pipeline in memory{built} in {results['build_s']:.1f} s{peak}")

    spec = model_spec(arch)
    direct = DirectDiffusers(pipe, steps, spec.defaults.guidance_scale)
    graphs = encoder_graphs_fit(speed.compile, device, "resident")  # the encoder's CUDA graphs
    step_graphs = transformer_graphs_fit(
        speed.compile,
        device,
        "resident",
        "transformer" in dict(speed.quantization.schemes),
        switchable_adapters=speed.loras > 0,
    )
    adapters, loaded_adapters = Adapters(), None
    if speed:  # plain diffusers as a user runs it, before the speed options change the shared pipeline
        results["eager_baseline"] = _eager_baseline(direct, arch.size, repeats, device, clock)
        save()
        if speed.loras:  # as serve --lora loads them: before the compile, switched by scale under it
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="flux2-bench-loras-") as folder:
                adapters = adapters_from_options(write_random_loras(pipe.transformer, Path(folder), speed.loras))
                loaded_adapters = LoadedAdapters(pipe, arch.name, adapters)
                if speed.compile:
                    loaded_adapters.switch_by_scale(device)
            results["loras_load_s"] = time.perf_counter() - started
            clock.say(f"{speed.loras} random LoRA adapters (rank 32) loaded in {results['loras_load_s']:.1f} s")
        if speed.compile and any(speed.wants(f"edit_{count}_cached") for count in REFERENCE_COUNTS):
            # As serve --reference-cache on --compile does: the cache's processors go on before compiling (they act
            # as diffusers' own without a cache), so no figure swaps processors under the compiled blocks.
            install_reference_processors(pipe.transformer)
        # As serve --compile: the warm-up captures the graphs; only the served column's encodes and steps (the
        # default size's, batches of 1 and 2) replay them.
        if graphs:
            install_encoder_graphs(pipe.text_encoder)
        if step_graphs:
            install_transformer_graphs(pipe.transformer)
        # One warm-up serves both columns: they both run in inference mode.
        applied = replace(speed, quantization=Quantization()) if build_quantized else speed  # quantized already
        results["baseline_before"] = applied.label()
        results["speed_setup_s"] = apply_speed_options(pipe, applied, device, lambda: warm_up(pipe, arch.size))
        clock.say(f"{speed.label()} applied (compiled and warmed up) in {results['speed_setup_s']:.1f} s")
    placement = Placement(
        device=device,
        dtype=dtype,
        offload="resident",
        reasons=("built in memory by the bench",),
        compile=speed.compile,
        encoder_graphs=graphs,
        transformer_graphs=step_graphs,
        quantization=speed.quantization,
        attention=speed.attention,
    )
    config = ModelConfig(
        name=arch.name,
        spec=spec,
        placement=placement,
        weight_bytes=int(results["weights_gib"] * _GIB),
        adapters=adapters,
    )
    loaded = LoadedModel(spec, placement, pipe, adapters=loaded_adapters)
    engine = Engine(
        ModelPool([config], load=lambda spec_, placement_, adapters_: loaded),
        max_batch_images=BATCH,
    )
    workdir = Path(tempfile.mkdtemp(prefix="flux2-bench-"))
    settings = Settings(
        model_ids=model_ids_for([(arch.name, spec.aliases)]),
        output_dir=workdir / "outputs",
        request_timeout=3600.0,
        playground=False,
    )
    if arch.family == "dev" and steps < spec.defaults.steps:
        results["notes"].append(f"dev runs {steps} steps here (its default is {spec.defaults.steps}).")
    logging.getLogger("flux2").setLevel(logging.WARNING)
    served_profile: dict[str, Any] | None = None
    with InProcessServer(create_app(settings, engine)) as server:
        client = ImageClient(server.url, steps)
        try:
            if not engine.wait_ready(300):
                raise RuntimeError(f"the engine did not become ready: {engine.load_error}")
            clock.say(f"serving at {server.url}")
            figures = [
                f
                for f in figures_for(arch, pipe, client, direct, steps, device, loaded, speed.compile)
                if speed.wants(f.key)
            ]
            # The first cached edit too: its reference pass and steps run once at these sizes before any timed run.
            warm = {"one_image", "edit_1", "transformer_step"} | {
                next((f.key for f in figures if f.key.endswith("_cached")), "")
            }
            warming = [figure for figure in figures if figure.key in warm]
            clock.say(f"warm-up, served and direct: {', '.join(figure.label for figure in warming) or 'nothing'}")
            for figure in warming:
                for action in (figure.served, figure.direct):
                    if action is not None:
                        action()
            # As a server's start: what the warm-up made (recompiles for the edits' shapes) frozen with the rest,
            # so no full collection of it lands in a timed run (`pipeline.pool.settle_heap`).
            settle_heap()
            clock.say("warm-up done")
            counters = run_counters(pipe, device)
            for figure in figures:
                results["figures"].append(
                    _guarded(figure, lambda f=figure: _measure(f, repeats, device, clock, client, counters), clock)
                )
                save()
            if speed.wants("profile"):  # a new prompt at each call, as the served figures send
                takes = itertools.count()
                served_profile = profile_served(
                    lambda: client.generate(f"a lighthouse on a cliff, profiled {next(takes)}", arch.size),
                    device,
                    clock.say,
                )
        finally:
            client.close()
            shutil.rmtree(workdir, ignore_errors=True)
    if speed.wants("profile"):  # where the stages' time goes, kernel by kernel (server/bench_profile.py)
        results["profile"] = profile_stages(pipe, arch.size, device, clock.say, served_profile)
        save()
    if speed.wants("step_cache"):
        results["step_cache"] = _step_cache_check(pipe, arch.size, max(spec.defaults.steps, 20), device, clock)
        save()
    if speed.wants("reference_cache"):
        results["reference_cache"] = reference_cache_check(pipe, arch.family, arch.size, steps, device, clock.say)
        save()
    if arch.family == "dev":
        _estimate_full_length(results, spec.defaults.steps, steps)


def _eager_baseline(direct: DirectDiffusers, size: int, repeats: int, device: str, clock: _Clock) -> dict:
    """One plain-diffusers image (+ Pillow's PNG) on the eager pipeline, before compiling or quantizing it (unless
    it was quantized as it was built): the baseline the served figures are held against in the same run."""
    prompts = iter(range(10**6))

    def one() -> None:
        direct.images([f"eager baseline {next(prompts)}: a lighthouse on a cliff at dusk"], size)

    one()  # warm-up
    runs = [timed(device, one)[0] for _ in range(repeats)]
    seconds = statistics.median(runs)
    clock.say(f"eager baseline: plain diffusers, one image {size}x{size}: {seconds:.3f} s (median of {repeats})")
    return {"key": "one_image", "direct_s": seconds, "direct_runs": runs}


def _step_cache_check(pipe: Any, size: int, steps: int, device: str, clock: _Clock, interval: int = 5) -> dict:
    """`--cache taylorseer`: the same seed with and without the cache, timed; the PSNR of the cached image
    against the uncached one. Random weights make this a numerical check only, not a quality judgement."""
    import numpy as np

    from pipeline.step_cache import StepCache, apply_cache, cache_context

    def image() -> tuple[Any, float]:
        synchronize(device)
        started = time.perf_counter()
        with cache_context(pipe.transformer):
            output = seeded_image(pipe, "a lighthouse on a cliff at dusk", size, steps)
        synchronize(device)
        return output, time.perf_counter() - started

    uncached, uncached_s = image()
    apply_cache(pipe.transformer, StepCache("taylorseer", interval))
    try:
        cached, cached_s = image()
    finally:
        pipe.transformer.disable_cache()
    mse = float(np.mean((np.asarray(cached, np.float64) - np.asarray(uncached, np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    result = {
        "cache": f"taylorseer:{interval}",
        "steps": steps,
        "size": size,
        "uncached_s": uncached_s,
        "cached_s": cached_s,
        "speedup": uncached_s / cached_s,
        "psnr_db": psnr,
    }
    clock.say(
        f"step cache taylorseer:{interval}, {steps} steps at {size}x{size}: {uncached_s:.3f} s -> "
        f"{cached_s:.3f} s ({result['speedup']:.2f}x), PSNR {psnr:.1f} dB against uncached (random weights: "
        "a numerical check)"
    )
    return result


Counters = Callable[[], dict[str, int]]


def run_counters(pipe: Any, device: str) -> Counters:
    """What a slow run may have paid for, as counters whose change over each run goes into the JSON beside its
    seconds (`served_runs_counters`, `direct_runs_counters`): full garbage collections (`gc_full_collections`),
    graphs Dynamo compiled (`compiled_graphs`: a recompile), steps and text encodes replayed from CUDA graphs
    (`step_graph_replays`, `encoder_graph_replays`, where graphs are installed: a step that did not replay ran
    compiled and eager), the caching allocator's retries and cudaMalloc/cudaFree calls (on CUDA). Run 9 (H200) timed
    the first image after the edits' warm-up at 0.503 s against 0.355 s (denoise 377 ms against 238) with the heap
    frozen; its steps ran without their graphs (the bench's cached edits had put new attention processors on, since
    fixed), and what such a first ungraphed run pays was not recorded."""
    import gc

    from torch._dynamo.utils import counters as dynamo_counters

    from pipeline.encoder_graphs import installed as encoder_graphs
    from pipeline.transformer_graphs import installed as step_graphs

    from .bench_memory import allocator_counts

    def now() -> dict[str, int]:
        found = {
            "gc_full_collections": int(gc.get_stats()[2]["collections"]),
            "compiled_graphs": int(dynamo_counters["stats"]["unique_graphs"]),
        }
        for name, graphs in (
            ("step_graph_replays", step_graphs(pipe.transformer)),
            ("encoder_graph_replays", encoder_graphs(pipe.text_encoder)),
        ):
            if graphs is not None:
                found[name] = graphs.replays
        return found | allocator_counts(device == "cuda")

    return now


def _guarded(figure: Figure, measure: Callable[[], dict], clock: _Clock) -> dict:
    """A figure's results, or its error: one failing figure (out of memory at 10 references, say) must not cost
    the others of a GPU run."""
    try:
        return measure()
    except Exception as exc:  # reported in the table and the JSON; the run goes on
        clock.say(f"{figure.label}: FAILED: {type(exc).__name__}: {exc}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**_figure_result(figure, [], [], [], []), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _measure(
    figure: Figure,
    repeats: int,
    device: str,
    clock: _Clock,
    client: ImageClient | None = None,
    counters: Counters | None = None,
) -> dict:
    if figure.prepare is not None:
        figure.prepare()
        clock.say(f"{figure.label}: prepared")
    first_timing = len(client.timings) if client is not None else 0
    runs_counters: dict[str, list[dict[str, int]]] = {}
    try:
        result = _figure_result(figure, *_runs(figure, repeats, device, clock, counters, runs_counters))
        for side, counts in runs_counters.items():  # served_runs_counters, direct_runs_counters
            result[f"{side}_runs_counters"] = counts
    finally:
        if figure.cleanup is not None:
            figure.cleanup()
    timings = client.timings[first_timing:] if client is not None else []
    if timings:  # the served answers' Server-Timing stages: median milliseconds per stage
        stages = sorted({name for timing in timings for name in timing})
        result["served_stages_ms"] = {name: statistics.median(t.get(name, 0.0) for t in timings) for name in stages}
        # Each request's own stages too: a median of 2 hides which stage a slow first request paid in (run 8: the
        # first image after the edits' warm-up 0.469 s, the second 0.356 s).
        result["served_runs_stages_ms"] = [dict(timing) for timing in timings]
        marks = client.marks[first_timing:] if client is not None else []
        # What each cached stage was in these runs ("cache hit", "computed"...): says the figure measured what it says.
        result["served_marks"] = {
            name: sorted({mark[name] for mark in marks if name in mark})
            for name in sorted({n for m in marks for n in m})
        }
        clock.say(
            f"{figure.label}: served stages (median ms) "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in result["served_stages_ms"].items())
        )
    return result


def _runs(
    figure: Figure,
    repeats: int,
    device: str,
    clock: _Clock,
    counters: Counters | None = None,
    runs_counters: dict[str, list[dict[str, int]]] | None = None,
) -> tuple[list[float], list[float], list[int], list[int]]:
    """Each side's seconds and peak memory over `repeats` runs, served then direct in each run; with `counters`, each
    run's change of them appended to `runs_counters[side]` (and its nonzero ones said on the run's line)."""
    seconds: dict[str, list[float]] = {"served": [], "direct": []}
    peaks: dict[str, list[int]] = {"served": [], "direct": []}
    for run in range(repeats):
        line = []
        for side, action in (("served", figure.served), ("direct", figure.direct)):
            if action is None:
                continue
            if side == "served" and figure.before is not None:
                figure.before()
            at_start = counters() if counters is not None else {}
            took, peak = timed(device, action)
            seconds[side].append(took)
            peaks[side].append(peak)
            line.append(f"{side} {took:.3f} s")
            if counters is not None and runs_counters is not None:
                changed = {name: count - at_start.get(name, 0) for name, count in counters().items()}
                runs_counters.setdefault(side, []).append(changed)
                if any(changed.values()):
                    line[-1] += " (" + ", ".join(f"{name} {n}" for name, n in changed.items() if n) + ")"
        clock.say(f"{figure.label} ({run + 1}/{repeats}): {', '.join(line)}")
    return seconds["served"], seconds["direct"], peaks["served"], peaks["direct"]


def _figure_result(
    figure: Figure, served: list[float], direct: list[float], served_peaks: list[int], direct_peaks: list[int]
) -> dict:
    served_s = statistics.median(served) if served else None
    direct_s = statistics.median(direct) if direct else None
    return {
        "key": figure.key,
        "label": figure.label,
        "served_s": served_s,
        "direct_s": direct_s,
        "ratio": served_s / direct_s if served_s and direct_s else None,
        "direct_label": figure.direct_label,
        "served_peak_gib": max(served_peaks) / _GIB if served_peaks else None,
        "direct_peak_gib": max(direct_peaks) / _GIB if direct_peaks else None,
        "runs": max(len(served), len(direct)),
        "served_runs": served,
        "direct_runs": direct,
    }


def _estimate_full_length(results: dict, default_steps: int, steps: int) -> None:
    by_key = {f["key"]: f for f in results["figures"]}
    one, step = by_key.get("one_image"), by_key.get("pipeline_step")
    if one and step and one["served_s"] and step["served_s"]:
        extra = (default_steps - steps) * step["served_s"]
        results["estimates"] = {f"one_image_{default_steps}_steps_s": one["served_s"] + extra}
        results["notes"].append(
            f"A {default_steps}-step image: about {one['served_s'] + extra:.1f} s served (one "
            f"image + {default_steps - steps} more steps at the measured s/step)."
        )


def bench_command(
    name: str,
    device: str,
    repeats: int | None,
    steps: int,
    json_path: Path | None,
    update_docs: bool,
    docs: Path,
    transformer_only: bool | None,
    speed: SpeedOptions = SpeedOptions(),
) -> dict:
    """`flux2-local bench --architecture NAME ...`: run, print the table, write the JSON and the docs section."""
    import typer

    from pipeline.architectures import get_architecture
    from pipeline.attention import AttentionError, check_attention

    from .bench_report import table, update_performance_doc

    try:
        arch = get_architecture(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--architecture") from exc
    if device not in ("auto", "cuda", "cpu"):
        raise typer.BadParameter("must be one of auto, cuda, cpu", param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("torch sees no CUDA device", param_hint="--device")
    if speed.compile:  # as serve refuses it: at start, with what to install, not Triton's error after the baseline
        from pipeline.toolchain import compile_toolchain_missing, lacking

        resolved = resolved_device(device)
        missing = compile_toolchain_missing(resolved)
        if missing:
            raise typer.BadParameter(lacking(resolved, missing), param_hint="--compile")
    try:  # as serve refuses it: at start, not after the baseline
        check_attention(speed.attention, resolved_device(device))
    except AttentionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--attention") from exc
    results = run_fullsize_bench(
        arch, device, repeats, steps, json_path, transformer_only, echo=lambda line: typer.echo(line), speed=speed
    )
    typer.echo("")
    typer.echo(table(results))
    if json_path is not None:
        typer.echo(f"\nresults written to {json_path}")
    if update_docs:
        command = (
            f"flux2-local bench --architecture {name}"
            + (f" --steps {steps}" if steps != 4 else "")
            + (f" --repeats {repeats}" if repeats else "")
            + (" --transformer-only" if transformer_only else "")
            + (f" {speed.label()}" if speed else "")
            + (f" --only {','.join(sorted(speed.only))}" if speed.only is not None else "")
        )
        update_performance_doc(results, docs, command)
        typer.echo(f"{docs} updated")
    return results
