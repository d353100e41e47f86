"""What the full-size benchmark reports: the machine and software it ran on, a table for the terminal, the JSON,
and its section of `docs/PERFORMANCE.md` (one section per architecture, replaced by the latest run)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch

from .bench_references import summary as reference_summary

_GIB = 1024**3

DOC_INTRO = """# Performance

Measured by `flux2-local bench --architecture NAME --update-docs`: the full-size architecture with random weights
(real configs; noise images, but the real shapes, memory and time), built in memory on the device, served by the
real app in the same process (HTTP over loopback, b64_json PNG, each answer read whole) against plain diffusers
on the same pipeline object with the same seeds and sizes, in inference mode (+ Pillow's PNG save at zlib level 1;
the server's own encoder deflates on several cores).
Every prompt is new (no prompt cache). Each figure is the median of its runs after a warm-up; peak memory is the
largest CUDA allocation during a run. Each architecture's section is replaced by its latest run.
"""


def environment(device: str) -> dict:
    """The card (or CPU) and the software versions a run used."""
    import diffusers
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        import psutil

        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        memory = psutil.virtual_memory().total
    return {
        "device": name,
        "device_memory_gib": memory / _GIB,
        # The caching allocator's settings change streamed plans' times (expandable segments, ...): said with them.
        "cuda_allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default",
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)  # a reader never sees half a file, even if the run is cut off mid-write


def count_label(count: int) -> str:
    """3875544576 -> "3.876 B", 84046115 -> "84.0 M", 82560 -> "82.6 k"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3f} B" if unit == "B" else f"{count / scale:.1f} {unit}"
    return str(count)


def _parameters(results: dict) -> str:
    counts = results["parameters"]
    return (
        f"transformer {count_label(counts['transformer'])}, text encoder {count_label(counts['text_encoder'])}, "
        f"VAE {count_label(counts['vae'])} ({results['weights_gib']:.2f} GiB in {results['dtype']})"
    )


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} s"


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for figure in results["figures"]:
        direct = _seconds(figure["direct_s"])
        if figure["direct_s"] is not None and figure["direct_label"] != "the same call":
            direct += f" ({figure['direct_label']})"
        elif figure["direct_s"] is None and figure["direct_label"] != "the same call":
            direct = f"— ({figure['direct_label']})"
        peaks = " / ".join(
            "—" if peak is None else f"{peak:.1f}" for peak in (figure["served_peak_gib"], figure["direct_peak_gib"])
        )
        ratio = "—" if figure["ratio"] is None else f"{figure['ratio']:.2f}x"
        if figure.get("error"):
            rows.append([figure["label"], "failed", figure["error"][:80].replace("|", "/"), "—", "—", "0"])
            continue
        rows.append([figure["label"], _seconds(figure["served_s"]), direct, ratio, peaks, str(figure["runs"])])
    for label in results["skipped"]:
        rows.append([label, "not measured", "not measured", "—", "—", "0"])
    return rows


_HEADERS = ["figure", "served", "plain diffusers", "served / plain", "peak GiB served / plain", "runs"]


def _summary(results: dict) -> list[str]:
    versions = results["versions"]
    lines = [
        f"{results['architecture']} on {results['device']} ({results['device_memory_gib']:.1f} GiB), "
        f"{results['date']}; torch {versions['torch']} (CUDA {versions['cuda']}), diffusers {versions['diffusers']}, "
        f"transformers {versions['transformers']}, Python {versions['python']}",
        f"parameters: {_parameters(results)}; {results['steps']} steps; {results['mode']}; built in "
        f"{results.get('build_s', 0):.1f} s; whole run {results.get('total_s', 0):.0f} s",
    ]
    cache = results.get("step_cache")
    if cache:
        lines.append(
            f"step cache {cache['cache']}, {cache['steps']} steps at {cache['size']}x{cache['size']}: "
            f"{cache['uncached_s']:.3f} s -> {cache['cached_s']:.3f} s ({cache['speedup']:.2f}x), PSNR "
            f"{cache['psnr_db']:.1f} dB against uncached (random weights: a numerical check only)"
        )
    if results.get("reference_cache"):
        lines.append(reference_summary(results["reference_cache"]))
    if results.get("eager_baseline"):
        lines.append(baseline_summary(results))
    if edit_summary(results):
        lines.append(edit_summary(results))
    return lines + [f"note: {note}" for note in results["notes"]]


def edit_summary(results: dict) -> str:
    """The served edits as multiples of one served image, the unit of issue 12's goals (4 references <= 2x, 10 <=
    4x); "" without the one-image figure or any edit."""
    served = {figure["key"]: figure.get("served_s") for figure in results["figures"] if not figure.get("error")}
    one = served.get("one_image")
    if not one:
        return ""
    groups = [
        ("uncached", [(f"{n} ref{'s' if n > 1 else ''}", f"edit_{n}") for n in (1, 4, 10)]),
        ("--reference-cache on", [(f"{n}", f"edit_{n}_cached") for n in (1, 4, 10)]),
        ("the same references again (reference store)", [(f"{n}", f"edit_{n}_repeated") for n in (4, 10)]),
    ]
    parts = []
    for name, keys in groups:
        found = [f"{label} {served[key] / one:.2f}x" for label, key in keys if served.get(key)]
        if found:
            parts.append(f"{name}: {', '.join(found)}")
    if not parts:
        return ""
    return f"edits against one served image ({one:.3f} s; goals: 4 refs <= 2x, 10 <= 4x): " + "; ".join(parts)


def baseline_summary(results: dict) -> str:
    """The speed options against plain diffusers on the eager pipeline, measured earlier in the same run."""
    baseline = results["eager_baseline"]
    eager = baseline["direct_s"]
    figure = next((f for f in results["figures"] if f["key"] == baseline["key"]), None)
    what = "the transformer alone" if results.get("mode") == "transformer-only" else "plain diffusers"
    weights = results["dtype"]
    if results.get("quantized_at_build"):
        weights += f", quantized at build: {results['quantized_at_build']}"
    before = results.get("baseline_before", results.get("variant")) or "nothing else"
    text = f"eager baseline ({what}, {weights}, before {before}): {baseline['key']} {eager:.3f} s"
    if figure is not None:
        for side in ("served", "direct"):
            if figure.get(f"{side}_s"):
                seconds = figure[f"{side}_s"]
                text += f"; {side} with the options {seconds:.3f} s ({seconds / eager:.2f}x the eager baseline)"
    if results.get("speed_setup_s") is not None:
        text += f"; applying the options (compile + warm-up) took {results['speed_setup_s']:.1f} s"
    return text


def _stage_lines(results: dict) -> list[str]:
    lines = []
    for figure in results["figures"]:
        stages = figure.get("served_stages_ms")
        if stages:
            lines.append(f"- {figure['label']}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in stages.items()))
    return lines


def table(results: dict) -> str:
    """The results as a plain-text table with the machine and versions above it."""
    rows = [_HEADERS, *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = [*_summary(results), ""]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    stage_lines = _stage_lines(results)
    if stage_lines:
        lines += ["", "served stages (Server-Timing, median ms per request):", *stage_lines]
    return "\n".join(lines)


def section_name(results: dict) -> str:
    """The docs section's name: the architecture, with the speed options when the run used any."""
    return " ".join(filter(None, [results["architecture"], results.get("variant")]))


def markdown_section(results: dict, command: str) -> str:
    name = section_name(results)
    versions = results["versions"]
    lines = [
        f"<!-- bench:{name} -->",
        f"## {name} on {results['device']} ({results['device_memory_gib']:.1f} GiB)",
        "",
        f"- Measured {results['date']} with `{command}`.",
        f"- torch {versions['torch']} (CUDA {versions['cuda']}), diffusers {versions['diffusers']}, transformers "
        f"{versions['transformers']}, Python {versions['python']}.",
        f"- Parameters: {_parameters(results)}.",
        f"- {results['steps']} steps, up to {results['repeats']} run(s) per figure; built in memory in "
        f"{results.get('build_s', 0):.1f} s; the whole run took {results.get('total_s', 0):.0f} s.",
    ]
    cache = results.get("step_cache")
    if cache:
        lines.append(
            f"- Step cache `--cache {cache['cache']}`, {cache['steps']} steps at {cache['size']}x{cache['size']}: "
            f"{cache['uncached_s']:.3f} s -> {cache['cached_s']:.3f} s ({cache['speedup']:.2f}x), PSNR "
            f"{cache['psnr_db']:.1f} dB against the uncached image (random weights: a numerical check only)."
        )
    if results.get("reference_cache"):
        lines.append(f"- {reference_summary(results['reference_cache'])}.")
    if results.get("eager_baseline"):
        lines.append(f"- {baseline_summary(results)}.")
    if edit_summary(results):
        lines.append(f"- {edit_summary(results)}.")
    lines += [f"- {note}" for note in results["notes"]]
    lines += ["", "| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    lines += ["", "Where the served time goes (Server-Timing, median ms per request):", "", *_stage_lines(results)]
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines) + "\n"


def update_performance_doc(results: dict, path: Path, command: str) -> None:
    """Replace (or add) this architecture's section of `path`, keeping the others."""
    section = markdown_section(results, command)
    name = re.escape(section_name(results))
    text = path.read_text() if path.is_file() else DOC_INTRO
    pattern = re.compile(rf"<!-- bench:{name} -->\n.*?<!-- /bench:{name} -->\n", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
