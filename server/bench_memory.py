"""`flux2-local bench --architecture NAME --memory-cap GB`: the cards people own, simulated on a big GPU.

`torch.cuda.set_per_process_memory_fraction` caps the process at GB GiB before anything is loaded; the offload
planner (`--offload auto`, with `--quantize` where asked) picks the plan for that cap from the architecture's
sizes; the pipeline is built with random weights on the host, placed as the plan says, and served by an `Engine`
(the runner's stage boundaries move what the plan swaps, as in a real server), without HTTP. Reported: the plan,
seconds per 1024x1024 image (median after a warm-up, each image a new prompt, so the text encoder runs every
time), peak device memory, or "does not fit" (the planner's verdict before building, or an out-of-memory error
caught while running); then one image of twice the side (2048² for the real architectures: its decode is sized by
what the cap leaves free, pipeline/decoding.py), its seconds and peak or "out of memory". `--memory-caps 8,12,16`
runs each cap in a fresh process, the safest way to start every cap from an empty card, and prints one table; a cap
written `12@transformer-resident` forces that plan instead of auto (`--offload` for one `--memory-cap`), so two
plans under one cap compare in one run; a cap written `12+compile` (or `--compile` with one `--memory-cap`)
compiles the transformer's repeated blocks and warms them up after placing, as `serve --compile` does.
`--only one_image` leaves the 2x-side image out (dev at 50 steps: minutes)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.architectures import Architecture, build_pipeline, measured_sizes, model_spec
from pipeline.jobs import StageTimes
from pipeline.offload_plan import COMPONENTS, PLAN_NAMES, DoesNotFit, OffloadPlan, PlanName, plan_offload
from pipeline.placement import one_of
from pipeline.quantization import Quantization, parse_quantization

from .bench_harness import synchronize
from .bench_report import environment, write_json

_GIB = 1024**3
Echo = Callable[[str], None]


MEMORY_FIGURES = ("one_image", "large_image")  # what `--only` may name with --memory-cap(s)


class MemoryCapError(ValueError):
    """A --memory-cap run that cannot start here (no CUDA, a cap above the card, a bad list)."""


class CapRun(NamedTuple):
    """One cap of `--memory-caps`: GiB, the plan forced under it (None: `--offload auto`), and whether the
    transformer is compiled (`+compile`)."""

    cap: float
    offload: PlanName | None = None
    compile: bool = False

    def label(self) -> str:
        return f"{self.cap:g}" + (f"@{self.offload}" if self.offload else "") + ("+compile" if self.compile else "")


_COMPILE_SUFFIX = "+compile"


def parse_caps(text: str) -> list[CapRun]:
    """ "8,12,12@transformer-resident,12+compile" -> [8 auto, 12 auto, 12 forced transformer-resident, 12 auto
    compiled] (GiB, as cards count them)."""
    runs = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        compiled = part.endswith(_COMPILE_SUFFIX)
        part = part.removesuffix(_COMPILE_SUFFIX)
        cap_text, at, offload = part.partition("@")
        try:
            cap = float(cap_text)
        except ValueError as exc:
            raise MemoryCapError(f"--memory-caps takes GB values separated by commas, got {text!r}") from exc
        if cap <= 0:
            raise MemoryCapError(f"--memory-caps takes positive GB values separated by commas, got {text!r}")
        runs.append(CapRun(cap, check_offload(offload) if at else None, compiled))
    if not runs:
        raise MemoryCapError(f"--memory-caps takes positive GB values separated by commas, got {text!r}")
    return runs


def parse_memory_only(only: str | None) -> bool:
    """`--only` with --memory-cap(s): whether the 2x-side image is measured (the timed images always are)."""
    if only is None:
        return True
    keys = {key.strip() for key in only.split(",") if key.strip()}
    if "one_image" not in keys or not keys <= set(MEMORY_FIGURES):
        raise MemoryCapError(f"--only with --memory-cap takes one_image and optionally large_image, got {only!r}")
    return "large_image" in keys


def check_offload(offload: str) -> PlanName:
    """A plan name to force under a cap (the planner's plans only: diffusers' own offloads are not planned)."""
    if one_of(offload, PLAN_NAMES):
        return offload
    raise MemoryCapError(f"a cap's plan must be one of {', '.join(PLAN_NAMES)}, got {offload!r}")


def check_cap(cap_gib: float, cuda_available: bool, card_bytes: int | None) -> None:
    if not cuda_available:
        raise MemoryCapError("--memory-cap needs CUDA: it caps this process's share of a GPU")
    if card_bytes is not None and cap_gib * _GIB > card_bytes:
        raise MemoryCapError(f"--memory-cap {cap_gib:g} is above this card's {card_bytes / _GIB:.0f} GiB")


def plan_for_cap(
    arch: Architecture,
    cap_bytes: int,
    quantization: Quantization,
    itemsize: int = 2,
    force: PlanName | None = None,
) -> OffloadPlan:
    """The plan `--offload auto` (or `force`) takes for `arch` under the cap, from its sizes alone (raises
    DoesNotFit)."""
    measured = measured_sizes(arch, itemsize, quantization)
    return plan_offload(
        measured.sizes,
        measured.working,
        cap_bytes,
        transformer_blocks=measured.transformer_blocks,
        text_encoder_layers=measured.text_encoder_layers,
        force=force,
        quantized=tuple(c for c in COMPONENTS if c in dict(quantization.schemes)),
    )


def run_memory_cap(
    arch: Architecture,
    cap_gib: float,
    quantize: str = "none",
    steps: int = 4,
    repeats: int = 3,
    echo: Echo = print,
    offload: PlanName | None = None,
    large: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """One cap: the planner's verdict (or the forced plan), then (if it fits) seconds per image and peak memory
    (and, with `large`, one image of twice the side)."""
    check_cap(cap_gib, torch.cuda.is_available(), None)
    total = torch.cuda.get_device_properties(0).total_memory
    check_cap(cap_gib, True, total)
    quantization = parse_quantization(quantize)
    result: dict[str, Any] = {
        "architecture": arch.name,
        "cap_gib": cap_gib,
        "quantize": str(quantization),
        "steps": steps,
        **environment("cuda"),
    }
    if offload is not None:
        result["forced"] = offload
    if compile:
        result["compiled"] = True
    try:
        plan = plan_for_cap(arch, int(cap_gib * _GIB), quantization, force=offload)
    except DoesNotFit as exc:
        echo(f"{arch.name} under {cap_gib:g} GiB: {exc}")
        return {**result, "plan": None, "verdict": "does not fit", "reason": str(exc)}
    result["plan"] = plan.name
    result["plan_lines"] = plan.lines()
    for line in plan.lines():
        echo(line)
    if result["cuda_allocator"] != "default":
        echo(f"CUDA allocator: PYTORCH_CUDA_ALLOC_CONF={result['cuda_allocator']}")
    started = time.perf_counter()
    # Built before the cap: each component initialised on the card (seconds; the CPU takes minutes) and parked on
    # the host, the card then emptied; the cap holds for everything the plan places and runs.
    # Quantized on the card before parking (the host holds the quantized weights; torchao's fp8 refuses a CPU).
    pipe = build_pipeline(arch, "cuda", torch.bfloat16, park_on_host=True, quantization=quantization)
    echo(f"built on the card and parked on the host in {time.perf_counter() - started:.1f} s")
    torch.cuda.set_per_process_memory_fraction(cap_gib * _GIB / total)
    report_first_out_of_memory(echo)
    try:
        measured = _measure(pipe, arch, plan, quantization, steps, repeats, echo, large=large, compile=compile)
    except torch.cuda.OutOfMemoryError as exc:
        echo(f"{arch.name} under {cap_gib:g} GiB with {plan.name}: out of memory")
        return {**result, "verdict": "does not fit", "reason": f"out of memory while running: {str(exc)[:300]}"}
    return {
        **result,
        "verdict": "ok",
        "seconds_per_image": measured.seconds,
        "peak_gib": measured.peak / _GIB,
        "large_image": measured.large,
        "images": measured.images,
    }


class Measured(NamedTuple):
    """What `_measure` found: the median seconds per image, the peak allocation, the 2x-side image, and each timed
    image (its seconds and, on CUDA, what the caching allocator did meanwhile)."""

    seconds: float
    peak: int
    large: dict[str, Any] | None  # None: not asked for
    images: list[dict[str, Any]]


# The caching allocator's counters that tell a streamed plan's slow image apart: retries (an allocation that failed
# under the cap, so the allocator synchronised, released its cached blocks and tried again) and cudaMalloc/cudaFree
# calls (each synchronous). Their differences over one image go into the JSON beside its seconds.
_ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def allocator_counts(cuda: bool) -> dict[str, int]:
    """The allocator's counters now (empty off CUDA)."""
    if not cuda:
        return {}
    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(name, 0)) for name in _ALLOCATOR_COUNTERS}


def live_memory(segments: list[dict[str, Any]]) -> str:
    """What is allocated, by CUDA stream, from `torch.cuda.memory_snapshot()`'s segments: '23.90 GiB live in 756
    blocks: 17.18 GiB on the default stream (574 blocks, largest 0.59 GiB), 6.73 GiB on other streams (182 blocks,
    largest 0.16 GiB)'. Copies made on a side stream (group offloading's prefetches) and not released show there:
    what told run 6's leak (H200, dev under 24 GiB) from a plan too tight."""
    sizes: dict[bool, list[int]] = {True: [], False: []}
    for segment in segments:
        default = not segment.get("stream")  # the default stream is 0
        sizes[default] += [block["size"] for block in segment["blocks"] if block["state"] == "active_allocated"]
    total = sizes[True] + sizes[False]
    parts = [
        f"{sum(found) / _GIB:.2f} GiB on {where} ({len(found)} blocks, largest {max(found) / _GIB:.2f} GiB)"
        for where, found in (("the default stream", sizes[True]), ("other streams", sizes[False]))
        if found
    ]
    return f"{sum(total) / _GIB:.2f} GiB live in {len(total)} blocks" + (": " + ", ".join(parts) if parts else "")


def report_first_out_of_memory(echo: Echo) -> None:
    """At the first CUDA out-of-memory of this process, say what was live (`live_memory`); nothing until then, and
    nothing where this torch lacks the allocator's observer hook."""
    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if attach is None:
        return
    told = []

    def observe(device: int, asked: int, allocated: int, free: int) -> None:
        if not told:
            told.append(True)
            echo(f"out of memory asking {asked / 2**20:.0f} MiB: {live_memory(torch.cuda.memory_snapshot())}")

    attach(observe)


_STAGES = ("text_encode", "denoise", "decode")  # the runner's synchronised stages (pipeline/jobs.py StageTimes)


def image_record(
    seconds: float, before: dict[str, int], after: dict[str, int], stages: StageTimes | None = None
) -> dict[str, Any]:
    """One timed image: {"seconds", its stages' seconds (`stages`: the result's StageTimes), and per allocator
    counter the calls during it}."""
    timed = {name: getattr(stages, name) for name in _STAGES} if stages is not None else {}
    return {"seconds": seconds, **timed, **{name: after[name] - before.get(name, 0) for name in after}}


def describe_image(record: dict[str, Any]) -> str:
    """'1.003 s' or '1.003 s (text_encode 104 ms, denoise 780 ms, decode 110 ms; allocator: 12 retries,
    340 cudaMalloc, 300 cudaFree)'."""
    parts = [", ".join(f"{name} {record[name] * 1000:.0f} ms" for name in _STAGES if name in record)]
    if "num_alloc_retries" in record:
        parts.append(
            f"allocator: {record['num_alloc_retries']} retries, {record['num_device_alloc']} cudaMalloc, "
            f"{record['num_device_free']} cudaFree"
        )
    text = f"{record['seconds']:.3f} s"
    said = "; ".join(part for part in parts if part)
    if said:
        text += f" ({said})"
    return text


def _measure(
    pipe: Any,
    arch: Architecture,
    plan: OffloadPlan,
    quantization: Quantization,
    steps: int,
    repeats: int,
    echo: Echo,
    device: str = "cuda",
    large: bool = True,
    compile: bool = False,
) -> Measured:
    """`pipe` (built with `quantization` applied: `build_pipeline`) placed by `plan` and served by an engine: median
    seconds per image, each image's record and peak device memory (0 on a CPU, where this runs only as a test),
    then one image of twice the side (4 MP for the real architectures: the decode's working memory is 4x, so small
    cards decode it one image at a time or tiled, pipeline/decoding.py): its seconds and peak, or the error it met."""
    from pipeline.adapters import Adapters
    from pipeline.engine import Engine
    from pipeline.loader import LoadedModel, apply_plan, compile_and_warm_up
    from pipeline.placement import Placement, encoder_graphs_fit, transformer_graphs_fit
    from pipeline.pool import ModelConfig, ModelPool
    from pipeline.weights import ModelSpec

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    placement = Placement(
        device=device,
        dtype=dtype,
        offload=plan.name,
        reasons=tuple(plan.lines()),
        quantization=quantization,
        plan=plan,
        compile=compile,
        encoder_graphs=encoder_graphs_fit(compile, device, plan.name),
        transformer_graphs=transformer_graphs_fit(
            compile, device, plan.name, "transformer" in dict(quantization.schemes)
        ),
    )
    echo(f"placing as {plan.name} (swapped components are copied into pinned host memory first)")
    swapper = apply_plan(pipe, placement) if plan.name != "resident" else None
    if swapper is None:
        pipe.to(device)
    synchronize(device)
    placed = f"placed in {time.perf_counter() - started:.1f} s"
    if cuda:
        placed += f"; {torch.cuda.memory_allocated() / _GIB:.2f} GiB allocated"
    echo(placed)
    if compile:  # as load_model does for `serve --compile`, after placing
        started = time.perf_counter()
        placement = compile_and_warm_up(pipe, placement, side=arch.size)
        echo(f"compiled and warmed up in {time.perf_counter() - started:.1f} s")
    spec = model_spec(arch)
    config = ModelConfig(name=arch.name, spec=spec, placement=placement, weight_bytes=0)

    def load(spec_: ModelSpec, placement_: Placement, adapters_: Adapters) -> LoadedModel:
        return LoadedModel(spec_, placement_, pipe, swapper)

    engine = Engine(ModelPool([config], load=load))
    started = time.perf_counter()
    engine.start()
    try:
        if not engine.wait_ready(600):
            raise RuntimeError(f"the engine did not become ready: {engine.load_error}")
        # A streamed plan's load runs its first passes (pipeline/stream_warm_up.py), as a server's does.
        echo(f"engine ready in {time.perf_counter() - started:.1f} s; a warm-up image, then the timed ones")
        images = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for run in range(repeats + 1):  # the first is the warm-up
            job = _job(arch.size, steps, spec.defaults.guidance_scale, f"a lighthouse on a cliff, take {run}")
            counts = allocator_counts(cuda)
            begun = time.perf_counter()
            result = engine.submit(job).future.result(3600)
            synchronize(device)
            if run:
                images.append(image_record(time.perf_counter() - begun, counts, allocator_counts(cuda), result.stages))
                echo(f"image {run}/{repeats}: {describe_image(images[-1])}")
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        return Measured(
            statistics.median(image["seconds"] for image in images),
            peak,
            _large_image(engine, arch, spec.defaults.guidance_scale, steps, cuda, echo) if large else None,
            images,
        )
    finally:
        engine.stop(60)


def _large_image(
    engine: Any, arch: Architecture, guidance: float, steps: int, cuda: bool, echo: Echo
) -> dict[str, Any]:
    from pipeline.jobs import OutOfDeviceMemory

    side = 2 * arch.size
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    begun = time.perf_counter()
    try:
        engine.submit(_job(side, steps, guidance, "a lighthouse on a cliff, large")).future.result(3600)
    except OutOfDeviceMemory as exc:
        echo(f"image {side}x{side}: out of memory")
        return {"side": side, "error": str(exc)}
    seconds = time.perf_counter() - begun
    echo(f"image {side}x{side}: {seconds:.3f} s")
    return {"side": side, "seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / _GIB if cuda else 0.0}


def _job(size: int, steps: int, guidance: float, prompt: str) -> Any:
    from pipeline.jobs import GenerationJob

    return GenerationJob(
        prompt=prompt,
        width=size,
        height=size,
        run_width=size,
        run_height=size,
        seeds=(0,),
        steps=steps,
        guidance_scale=guidance,
    )


def run_caps_in_subprocesses(
    name: str, caps: list[CapRun], quantize: str, steps: int, repeats: int, echo: Echo = print, large: bool = True
) -> list[dict[str, Any]]:
    """Each cap in a fresh `flux2-local bench` process (an empty card, its own memory fraction)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="flux2-caps-") as workdir:
        for run in caps:
            path = Path(workdir) / f"cap-{run.label()}.json"
            command = [
                sys.executable, "-m", "server.cli", "bench", "--architecture", name, "--memory-cap", f"{run.cap:g}",
                "--quantize", quantize, "--steps", str(steps), "--repeats", str(repeats), "--json", str(path),
            ]  # fmt: skip
            if run.offload is not None:
                command += ["--offload", run.offload]
            if run.compile:
                command += ["--compile"]
            if not large:
                command += ["--only", "one_image"]
            echo(f"--- {name} under {run.cap:g} GiB: {' '.join(command[2:])}")
            # The child's progress lines stream through as they come (a cap cut short still shows how far it got);
            # its traceback, if any, is Python's plain one (typer's boxed one showed two frames in 40 lines).
            child_env = {**os.environ, "_TYPER_STANDARD_TRACEBACK": "1"}
            child = subprocess.run(command, text=True, stdout=None, stderr=subprocess.PIPE, env=child_env)
            if path.is_file():
                results.append(json.loads(path.read_text()))
                continue
            lines = (child.stderr or "").strip().splitlines()
            echo("\n".join(["the run failed; the end of its stderr:", *lines[-120:]]))  # the traceback, for the log
            result = {
                "architecture": name,
                "cap_gib": run.cap,
                "quantize": quantize,
                "verdict": "failed",
                "reason": " / ".join(lines[-3:]),
            }
            if run.offload is not None:
                result["forced"] = run.offload
            if run.compile:
                result["compiled"] = True
            results.append(result)
    return results


def caps_table(results: list[dict[str, Any]]) -> str:
    """card memory x model -> plan, seconds per image, peak memory (a markdown table)."""
    lines = [
        "| card memory | model | quantized | plan | s / 1024² image | peak memory | s / 2048² image (peak) |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if result.get("verdict") == "ok":
            plan, seconds, peak = result["plan"], f"{result['seconds_per_image']:.2f}", f"{result['peak_gib']:.1f} GiB"
            large = _large_cell(result.get("large_image"))
        else:
            plan, seconds, peak, large = result.get("plan") or "—", result.get("verdict", "?"), "—", "—"
        if result.get("forced"):
            plan = f"{result['forced']} (forced)"
        if result.get("compiled"):
            plan += " + compile"
        lines.append(
            f"| {result['cap_gib']:g} GB | {result['architecture']} | {result.get('quantize', 'none')} | {plan} | "
            f"{seconds} | {peak} | {large} |"
        )
    return "\n".join(lines)


def _large_cell(large: dict[str, Any] | None) -> str:
    if not large:
        return "not measured"
    if "error" in large:
        return "out of memory"
    return f"{large['seconds']:.2f} ({large['peak_gib']:.1f} GiB)"


def write_result(result: dict[str, Any], json_path: Path | None) -> None:
    if json_path is not None:
        write_json(result, json_path)


def memory_command(
    name: str,
    cap: float | None,
    caps: str | None,
    quantize: str,
    steps: int,
    repeats: int | None,
    json_path: Path | None,
    offload: str | None = None,
    only: str | None = None,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """`flux2-local bench --architecture NAME --memory-cap GB | --memory-caps GB,GB,...`: run, print the table."""
    import typer

    from pipeline.architectures import get_architecture
    from pipeline.quantization import QuantizationError

    try:
        arch = get_architecture(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--architecture") from exc
    try:
        parse_quantization(quantize)
        if cap is not None and caps is not None:
            raise MemoryCapError("give --memory-cap or --memory-caps, not both")
        if offload is not None and caps is not None:
            raise MemoryCapError("--offload goes with one --memory-cap; in --memory-caps write a cap as 12@PLAN")
        if compile and caps is not None:
            raise MemoryCapError("--compile goes with one --memory-cap; in --memory-caps write a cap as 12+compile")
        forced = check_offload(offload) if offload is not None else None
        large = parse_memory_only(only)
        wanted = parse_caps(caps) if caps is not None else [CapRun(cap, forced, compile)] if cap is not None else []
        for each in wanted:
            check_cap(each.cap, torch.cuda.is_available(), None)
    except (MemoryCapError, QuantizationError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--memory-cap") from exc
    if caps is not None:
        results = run_caps_in_subprocesses(name, wanted, quantize, steps, repeats or arch.repeats, large=large)
    else:
        one = wanted[0]
        results = [
            run_memory_cap(
                arch, one.cap, quantize, steps, repeats or arch.repeats, typer.echo, one.offload, large, one.compile
            )
        ]
        write_result(results[0], json_path)
    typer.echo("")
    typer.echo(caps_table(results))
    if caps is not None and json_path is not None:
        write_json({"runs": results}, json_path)
    return results
