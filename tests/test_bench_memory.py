"""`flux2-local bench --memory-cap(s)`: option parsing, the refusal without CUDA, the planner's verdict per card
for the real architectures (from their sizes on the meta device), the "does not fit" path, and the table."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pipeline.architectures import build_pipeline, get_architecture
from pipeline.jobs import StageTimes
from pipeline.offload_plan import DoesNotFit
from pipeline.quantization import Quantization, parse_quantization
from server import bench_memory
from server.bench_memory import CapRun, MemoryCapError, caps_table, check_cap, parse_caps, plan_for_cap

GIB = 1024**3


def bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`flux2-local bench ARGS` in a fresh process, its output captured."""
    command = [sys.executable, "-m", "server.cli", "bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_caps_are_parsed_and_bad_lists_refused():
    assert [run.cap for run in parse_caps("8,12, 16,24,48")] == [8, 12, 16, 24, 48]
    assert parse_caps("7.5") == [CapRun(7.5)]
    # A cap can force a plan, so two plans under one cap compare in one run.
    assert parse_caps("48,12,12@transformer-resident") == [
        CapRun(48),
        CapRun(12),
        CapRun(12, "transformer-resident"),
    ]
    assert parse_caps("12@encoder-streamed")[0].label() == "12@encoder-streamed"
    # ... and compile the transformer (the server compiles only resident plans by default).
    assert parse_caps("48+compile,12@encoder-streamed+compile") == [
        CapRun(48, None, True),
        CapRun(12, "encoder-streamed", True),
    ]
    assert [run.label() for run in parse_caps("12+compile,12@encoder-streamed+compile")] == [
        "12+compile",
        "12@encoder-streamed+compile",
    ]
    for bad in ("8,x", "", "0", "-4", "12@model", "12@fast", "x@resident", "12@", "12+fast", "+compile"):
        with pytest.raises(MemoryCapError):
            parse_caps(bad)


def test_a_forced_plan_under_a_cap_is_the_planners_forced_plan_and_says_so():
    arch, quantization = get_architecture("klein-4b"), parse_quantization("none")
    assert plan_for_cap(arch, 12 * GIB, quantization).name == "encoder-streamed"
    forced = plan_for_cap(arch, 12 * GIB, quantization, force="transformer-resident")
    assert forced.name == "transformer-resident" and forced.forced
    table = caps_table(
        [
            {"architecture": "klein-4b", "cap_gib": 12, "plan": "transformer-resident", "forced":
             "transformer-resident", "verdict": "ok", "seconds_per_image": 0.75, "peak_gib": 11.06},
            {"architecture": "klein-4b", "cap_gib": 12, "forced": "encoder-streamed", "verdict": "failed"},
        ]
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[2] == "| 12 GB | klein-4b | none | transformer-resident (forced) | 0.75 | 11.1 GiB | not measured |"
    assert lines[3] == "| 12 GB | klein-4b | none | encoder-streamed (forced) | failed | — | — |"
    compiled = {"architecture": "klein-4b", "cap_gib": 12, "plan": "encoder-streamed", "compiled": True,
                "verdict": "ok", "seconds_per_image": 0.55, "peak_gib": 10.2}  # fmt: skip
    assert caps_table([compiled]).splitlines()[2] == (
        "| 12 GB | klein-4b | none | encoder-streamed + compile | 0.55 | 10.2 GiB | not measured |"
    )


def test_offload_goes_with_one_cap_only():
    run = bench_cli("--architecture", "klein-4b", "--memory-caps", "8,12", "--offload", "resident")
    assert run.returncode == 2 and "12@PLAN" in run.stderr
    run = bench_cli("--offload", "resident")
    assert run.returncode == 2 and "goes with --memory-cap" in run.stderr


def test_only_one_image_leaves_the_large_image_out_and_other_keys_are_refused():
    """dev at 50 steps takes ~40 s an image under 24 GiB: `--only one_image` skips the 2x-side image (4x the work)."""
    assert bench_memory.parse_memory_only(None) is True
    assert bench_memory.parse_memory_only("one_image,large_image") is True
    assert bench_memory.parse_memory_only(" one_image ") is False
    for bad in ("large_image", "one_image,edit_1", ""):
        with pytest.raises(MemoryCapError, match="takes one_image"):
            bench_memory.parse_memory_only(bad)
    run = bench_cli("--architecture", "klein-4b", "--memory-cap", "8", "--only", "one_image,stream_2")
    assert run.returncode == 2 and "takes one_image" in run.stderr
    # Each cap's child process is told too (here it refuses: no CUDA; its command line is echoed first).
    lines: list[str] = []
    bench_memory.run_caps_in_subprocesses("tiny", [CapRun(8)], "none", 2, 1, echo=lines.append, large=False)
    assert lines[0].endswith("--only one_image")
    lines.clear()
    results = bench_memory.run_caps_in_subprocesses("tiny", [CapRun(8, None, True)], "none", 2, 1, echo=lines.append)
    assert lines[0].endswith("--compile") and results[0]["compiled"] is True
    run = bench_cli("--architecture", "klein-4b", "--memory-caps", "8,12", "--compile")
    assert run.returncode == 2 and "12+compile" in run.stderr


def test_a_cap_needs_cuda_and_a_card_big_enough():
    with pytest.raises(MemoryCapError, match="needs CUDA"):
        check_cap(12, cuda_available=False, card_bytes=None)
    with pytest.raises(MemoryCapError, match="above this card's 80 GiB"):
        check_cap(96, cuda_available=True, card_bytes=80 * GIB)
    check_cap(24, cuda_available=True, card_bytes=80 * GIB)


def test_the_command_refuses_without_cuda():
    run = bench_cli("--architecture", "klein-4b", "--memory-caps", "8,12")
    assert run.returncode == 2
    assert "needs CUDA" in run.stderr


@pytest.mark.parametrize(
    ("name", "cap", "quantize", "plan"),
    [
        ("klein-4b", 48, "none", "resident"),
        ("klein-4b", 24, "none", "resident"),
        ("klein-4b", 12, "none", "encoder-streamed"),  # the 7.2 GiB transformer stays, the 7.5 GiB encoder streams
        ("klein-4b", 8, "none", "block-streaming"),
        ("klein-4b", 12, "transformer=int8,text_encoder=int8", "resident"),
        ("klein-9b", 24, "none", "encoder-streamed"),
        ("klein-9b", 16, "none", "block-streaming"),
        ("dev", 80, "none", "encoder-streamed"),
        ("dev", 24, "none", "block-streaming"),
    ],
)
def test_the_planner_picks_a_plan_per_card(name, cap, quantize, plan):
    assert plan_for_cap(get_architecture(name), cap * GIB, parse_quantization(quantize)).name == plan


def test_dev_does_not_fit_a_tiny_card():
    with pytest.raises(DoesNotFit, match="even block-streaming needs"):
        plan_for_cap(get_architecture("dev"), 4 * GIB, Quantization())


def test_the_does_not_fit_verdict_is_reported_before_anything_is_built(monkeypatch):
    fraction = []
    cuda = bench_memory.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", lambda value, *args: fraction.append(value))
    monkeypatch.setattr(cuda, "memory_reserved", lambda *args: 0)
    monkeypatch.setattr(bench_memory, "environment", lambda device: {"device": "a simulated 80 GiB card"})
    monkeypatch.setattr(bench_memory, "_measure", lambda *args: pytest.fail("nothing is built when it does not fit"))
    monkeypatch.setattr(
        bench_memory, "build_pipeline", lambda *args, **kwargs: pytest.fail("nothing is built when it does not fit")
    )
    lines = []
    result = bench_memory.run_memory_cap(get_architecture("dev"), 4, echo=lines.append)
    assert fraction == []  # the cap is set after building, which a "does not fit" never gets to
    assert result["verdict"] == "does not fit" and result["plan"] is None
    assert "even block-streaming needs" in result["reason"] and "dev under 4 GiB" in lines[0]


def test_the_table_has_a_row_per_card_and_model():
    table = caps_table(
        [
            {
                "architecture": "klein-4b",
                "cap_gib": 12,
                "quantize": "none",
                "plan": "transformer-resident",
                "verdict": "ok",
                "seconds_per_image": 1.0432,
                "peak_gib": 10.26,
                "large_image": {"side": 2048, "seconds": 3.512, "peak_gib": 11.43},
            },
            {
                "architecture": "klein-4b",
                "cap_gib": 8,
                "quantize": "none",
                "plan": "block-streaming",
                "verdict": "ok",
                "seconds_per_image": 2.5,
                "peak_gib": 7.0,
                "large_image": {"side": 2048, "error": "the device ran out of memory for a single image"},
            },
            {"architecture": "dev", "cap_gib": 4, "quantize": "none", "plan": None, "verdict": "does not fit"},
        ]
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| card memory | model | quantized | plan | s / 1024² image | peak memory | s / 2048² image (peak) |"
    )
    assert lines[2] == "| 12 GB | klein-4b | none | transformer-resident | 1.04 | 10.3 GiB | 3.51 (11.4 GiB) |"
    assert lines[3] == "| 8 GB | klein-4b | none | block-streaming | 2.50 | 7.0 GiB | out of memory |"
    assert lines[4] == "| 4 GB | dev | none | — | does not fit | — | — |"


def test_a_planned_run_builds_places_and_times_images_on_the_cpu():
    """The GPU path on the tiny architecture, on the CPU: built on the host, the forced plan applied (the swapper
    moving the encoder and the transformer in turns), served by an Engine, timed."""
    from pipeline.architectures import measured_sizes
    from pipeline.offload_plan import plan_offload

    arch = get_architecture("tiny")
    measured = measured_sizes(arch, 4)
    plan = plan_offload(
        measured.sizes, measured.working, 64 * GIB, transformer_blocks=measured.transformer_blocks,
        force="transformer-resident",
    )  # fmt: skip
    lines: list[str] = []
    pipe = build_pipeline(arch, "cpu", torch.float32, park_on_host=True)
    seconds, peak, large, images = bench_memory._measure(
        pipe, arch, plan, Quantization(), 2, 2, lines.append, device="cpu"
    )
    assert seconds > 0 and peak == 0
    # Each timed image is recorded with its stages (the median is theirs); off CUDA no allocator counters.
    assert [sorted(image) for image in images] == [["decode", "denoise", "seconds", "text_encode"]] * 2
    assert all(0 < image["denoise"] < image["seconds"] for image in images)
    assert all(image["text_encode"] + image["denoise"] + image["decode"] <= image["seconds"] for image in images)
    assert "denoise" in lines[-3] and lines[-3].endswith(" ms)")
    assert seconds == pytest.approx((images[0]["seconds"] + images[1]["seconds"]) / 2)
    assert [line.split(":")[0] for line in lines[-3:]] == [
        "image 1/2",
        "image 2/2",
        f"image {2 * arch.size}x{2 * arch.size}",
    ]
    assert large["side"] == 2 * arch.size and large["seconds"] > 0
    assert lines[0].startswith("placing as transformer-resident") and "engine ready" in lines[2]


def test_a_quantized_run_is_quantized_where_it_is_built_and_streams_its_blocks():
    """Quantized components are quantized where they are built, before parking (on the card, for torchao's fp8
    and a host holding dev quantized), then placed: here int8 on the CPU, block-streaming forced, the quantized
    transformer's blocks streamed through group offloading but for the one the room keeps."""
    pytest.importorskip("torchao")
    from pipeline.architectures import measured_sizes
    from pipeline.offload_plan import plan_offload

    arch = get_architecture("tiny")
    quantization = parse_quantization("transformer=int8")
    pipe = build_pipeline(arch, "cpu", torch.float32, park_on_host=True, quantization=quantization)
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert type(pipe.text_encoder.get_decoder().layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    measured = measured_sizes(arch, 4, quantization)
    plan = plan_offload(
        measured.sizes, measured.working, 64 * GIB, transformer_blocks=measured.transformer_blocks,
        text_encoder_layers=measured.text_encoder_layers, force="block-streaming", quantized=("transformer",),
    )  # fmt: skip
    assert plan.components[1].resident_blocks == 1
    lines: list[str] = []
    seconds, _, large, _ = bench_memory._measure(pipe, arch, plan, quantization, 2, 1, lines.append, device="cpu")
    assert seconds > 0 and large["seconds"] > 0
    # Without the large image (`--only one_image`): the timed images only.
    lines.clear()
    seconds, _, large, images = bench_memory._measure(
        pipe, arch, plan, quantization, 2, 1, lines.append, device="cpu", large=False
    )
    assert seconds > 0 and large is None and len(images) == 1
    assert not [line for line in lines if f"{2 * arch.size}x" in line]
    assert hasattr(pipe.transformer.transformer_blocks[0], "_diffusers_hook")


def test_a_failed_cap_leaves_its_traceback_in_the_log():
    """On the H100 both streamed plans failed in their child process and only three lines of its stderr reached
    the log; the end of a failed child's stderr is now echoed whole (here the child refuses: no CUDA)."""
    lines: list[str] = []
    results = bench_memory.run_caps_in_subprocesses(
        "tiny", [CapRun(8, "block-streaming")], "none", 2, 1, echo=lines.append
    )
    assert results[0]["verdict"] == "failed" and results[0]["forced"] == "block-streaming"
    assert "--offload block-streaming" in lines[0]
    assert lines[1].startswith("the run failed; the end of its stderr:") and "needs CUDA" in lines[1]


def test_each_image_carries_what_the_allocator_did_meanwhile():
    """On the H200 under 12 GiB the first image after the warm-up took 1.0 s where the others took 0.63 s: each
    image's record now says how many allocations were retried (a failed allocation under the cap makes the
    allocator synchronise and release its cache) and how many cudaMalloc/cudaFree calls ran during it."""
    before = {"num_alloc_retries": 3, "num_device_alloc": 100, "num_device_free": 40}
    after = {"num_alloc_retries": 5, "num_device_alloc": 130, "num_device_free": 41}
    stages = StageTimes(text_encode=0.104, denoise=0.7801, decode=0.11)
    record = bench_memory.image_record(1.0034, before, after, stages)
    assert record == {
        "seconds": 1.0034, "text_encode": 0.104, "denoise": 0.7801, "decode": 0.11,
        "num_alloc_retries": 2, "num_device_alloc": 30, "num_device_free": 1,
    }  # fmt: skip
    assert bench_memory.describe_image(record) == (
        "1.003 s (text_encode 104 ms, denoise 780 ms, decode 110 ms; allocator: 2 retries, 30 cudaMalloc, 1 cudaFree)"
    )
    assert bench_memory.describe_image(bench_memory.image_record(0.5, {}, {})) == "0.500 s"
    assert bench_memory.allocator_counts(False) == {}


def test_a_compiled_cap_compiles_the_transformer_after_placing_and_times_images_on_the_cpu():
    """`12+compile`: the planner's plan (here encoder-streamed, forced: the transformer stays on the device while
    the encoder streams), then the transformer's repeated blocks compiled and warmed up as `serve --compile` does,
    and the images timed through the compiled blocks."""
    from pipeline.architectures import measured_sizes
    from pipeline.offload_plan import plan_offload

    arch = get_architecture("tiny")
    measured = measured_sizes(arch, 4)
    plan = plan_offload(
        measured.sizes, measured.working, 64 * GIB, transformer_blocks=measured.transformer_blocks,
        text_encoder_layers=measured.text_encoder_layers, force="encoder-streamed",
    )  # fmt: skip
    pipe = build_pipeline(arch, "cpu", torch.float32, park_on_host=True)
    lines: list[str] = []
    seconds, _, _, images = bench_memory._measure(
        pipe, arch, plan, Quantization(), 2, 1, lines.append, device="cpu", large=False, compile=True
    )
    assert seconds > 0 and len(images) == 1
    assert any(line.startswith("compiled and warmed up in") for line in lines)
    block = pipe.transformer.transformer_blocks[0]
    assert block._compiled_call_impl is not None  # diffusers' compile_repeated_blocks: each block compiled


def test_an_out_of_memory_says_what_was_live_on_which_stream():
    """The memory bench's report at an out-of-memory, from the allocator's snapshot: live bytes on the default
    stream and on side streams (group offloading's prefetched copies), freed and reserved blocks left out. Run 6's
    numbers: 17.18 GiB on the default stream, 6.73 GiB on a side stream, the leak that failed dev under 24 GiB."""
    gib = 1024**3

    def segment(stream, *blocks):
        return {"stream": stream, "blocks": [{"size": size, "state": state} for size, state in blocks]}

    segments = [
        segment(0, (int(16 * gib), "active_allocated"), (int(0.5 * gib), "inactive")),
        segment(0, (int(1.18 * gib), "active_allocated")),
        segment(1473560512, (int(6.5 * gib), "active_allocated"), (int(0.23 * gib), "active_allocated")),
    ]
    said = bench_memory.live_memory(segments)
    assert said == (
        "23.91 GiB live in 4 blocks: 17.18 GiB on the default stream (2 blocks, largest 16.00 GiB), "
        "6.73 GiB on other streams (2 blocks, largest 6.50 GiB)"
    )
    assert bench_memory.live_memory([segment(0, (gib, "inactive"))]) == "0.00 GiB live in 0 blocks"
    assert bench_memory.live_memory([segment(0, (gib, "active_allocated"))]).endswith(
        "1.00 GiB on the default stream (1 blocks, largest 1.00 GiB)"
    )
