"""The bench's `profile`: where the time of a served image's stages goes, kernel by kernel.

A served 1024² klein-4B image under `--compile` spends ~0.1 s in the VAE decode and ~35 ms in the text encode on an
H100 (docs/PERFORMANCE.md), both far above what their arithmetic needs (~25 ms and ~6 ms at the card's rates): the
next speed-up depends on whether a stage waits on the host (launches, Python) or on kernels, and on which. Each
stage runs once untimed, then once under `torch.profiler`: its wall time, the time the device spent in kernels
(on a CPU, in operators) and the operators and kernels that took most of it. Written into the bench's JSON
(`profile`) and printed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from .bench_harness import decode_action, encode_action, step_action, synchronize

TOP = 12  # the kernels (or operators) listed per stage
_NAME_CHARACTERS = 100


def profile_stages(
    pipe: Any, size: int, device: str, say: Callable[[str], None], served: dict[str, Any] | None = None
) -> dict[str, Any]:
    """{stage: {"wall_ms", "busy_ms", "top": [{"name", "calls", "ms"}...], "host_ms", "host_top": [...]}} for the
    text encode as the server runs it (cut at the deepest state read, replayed from CUDA graphs where the encoder
    has them), one transformer step at `size`² and the final decode of one `size`² image; `served`: stages already
    profiled the same way while the server was up (`profile_served`), listed first."""
    stages: dict[str, Callable[[], object]] = {
        "text_encode": encode_action(pipe, read_depth=True, graph=True),
        "transformer_step": step_action(pipe.transformer, size),
        "decode": decode_action(pipe, size),
    }
    found = dict(served or {})
    for stage, action in stages.items():
        found[stage] = profile_one(action, device)
        say(line(stage, found[stage]))
    return found


def profile_served(request: Callable[[], object], device: str, say: Callable[[str], None]) -> dict[str, Any]:
    """One served image (a new prompt, through HTTP, as the bench's client sends it) profiled whole: the server's
    threads record their operators too. Its wall time against its kernels, and the host's operators that took
    most of it: where a served image's time goes outside the stages timed alone (the served text encode took
    27 ms on the H200 where the encoder alone took 15 ms, run 6)."""
    found = {"served_image": profile_one(request, device)}
    say(line("served_image", found["served_image"]))
    return found


def profile_one(action: Callable[[], object], device: str) -> dict[str, Any]:
    """One untimed call of `action`, then one profiled: wall and busy milliseconds and the `TOP` entries."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    action()
    synchronize(device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities, experimental_config=_all_threads()) as profiler:
        started = time.perf_counter()
        action()
        synchronize(device)
        wall = time.perf_counter() - started
    averages = profiler.key_averages()
    events = [event for event in averages if _self_us(event, cuda) > 0]
    if cuda:  # the kernels (device work), not the operators that launched them
        events = [event for event in events if _is_kernel(event)]
    events.sort(key=lambda event: _self_us(event, cuda), reverse=True)
    # The host's side: operators and runtime calls by their own CPU time (launches, copies, synchronisations).
    host = [event for event in averages if not _is_kernel(event) and event.self_cpu_time_total > 0]
    host.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": wall * 1000,
        "busy_ms": sum(_self_us(event, cuda) for event in events) / 1000,
        "measures": "CUDA kernels" if cuda else "CPU operators",
        "top": [_entry(event, _self_us(event, cuda)) for event in events[:TOP]],
        "host_ms": sum(event.self_cpu_time_total for event in host) / 1000,
        "host_top": [_entry(event, event.self_cpu_time_total) for event in host[:TOP]],
    }


def _all_threads() -> Any:
    """The profiler's setting that records the operators of every thread (a served image runs on the engine's
    thread, started before the profiler), where this torch has it; else None (the calling thread's only; the
    device's kernels are recorded either way)."""
    from torch.profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        return None


def _entry(event: Any, microseconds: float) -> dict[str, Any]:
    return {"name": event.key[:_NAME_CHARACTERS], "calls": event.count, "ms": microseconds / 1000}


def line(stage: str, found: dict[str, Any]) -> str:
    """'profile decode: 101.2 ms wall, 96.0 ms in CUDA kernels; top: 41.0 ms cudnn... (x24), ...'"""
    top = _listed(found["top"], 5)
    busy = f"{found['busy_ms']:.1f} ms in {found['measures']}"
    text = f"profile {stage}: {found['wall_ms']:.1f} ms wall, {busy}; top: {top}"
    if found["measures"] == "CUDA kernels":  # on a CPU the operators are the host's: listed once
        text += f"; host {found['host_ms']:.1f} ms in operators, top: {_listed(found['host_top'], 4)}"
    return text


def _listed(entries: list[dict[str, Any]], count: int) -> str:
    return ", ".join(f"{entry['ms']:.1f} ms {entry['name'][:60]} (x{entry['calls']})" for entry in entries[:count])


def _self_us(event: Any, cuda: bool) -> float:
    if not cuda:
        return float(event.self_cpu_time_total)
    for name in ("self_device_time_total", "self_cuda_time_total"):  # the name before torch 2.4
        with contextlib.suppress(AttributeError):
            return float(getattr(event, name))
    return 0.0


def _is_kernel(event: Any) -> bool:
    """A device-side entry (a kernel, a memcpy or memset), not an operator whose time counts its kernels again."""
    return str(getattr(event, "device_type", "")).endswith("CUDA")
