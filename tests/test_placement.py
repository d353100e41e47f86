"""Device, dtype and offload decisions, with the machine's facts injected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.placement import PlacementError, count_weight_params, decide_placement

GIB = 1024**3
KLEIN_4B_PARAMS = 8_000_000_000  # transformer + Qwen3 4B encoder + VAE, roughly


def _line(placement, prefix):
    (line,) = [reason for reason in placement.reasons if reason.startswith(prefix)]
    return line


def test_compile_is_on_by_default_on_cuda_with_everything_resident_only():
    def placed(**kwargs):
        options = {"weight_params": KLEIN_4B_PARAMS, "cuda_available": True, "cuda_free_bytes": 79 * GIB}
        return decide_placement(**{**options, **kwargs})

    resident = placed()
    assert resident.compile and "auto: CUDA, everything resident" in _line(resident, "compile:")
    assert not decide_placement(weight_params=1000, cuda_available=False).compile  # the CPU: off, no line
    assert not any(r.startswith("compile:") for r in decide_placement(weight_params=1000, cuda_available=False).reasons)
    for kwargs, why in (
        ({"cuda_free_bytes": 16 * GIB}, "offload model"),
        ({"quantize": "transformer=int8", "cuda_capability": (9, 0)}, "quantized weights"),
        ({"transformer_file": Path("t.gguf")}, "a GGUF transformer"),
        ({"cache": "taylorseer"}, "the step cache"),
        ({"quantize": "transformer=fp8,text_encoder=int8", "cuda_capability": (9, 0)}, "(text_encoder=int8)"),
    ):
        held = placed(**kwargs)
        assert not held.compile and why in _line(held, "compile:"), kwargs
    # Measured compiled on a GPU: fp8 transformer weights and adapters switched by scale (run 10, H200), an fp8 text
    # encoder beside them (run 11, H100).
    for kwargs in (
        {"quantize": "transformer=fp8", "cuda_capability": (9, 0)},
        {"quantize": "transformer=fp8,text_encoder=fp8", "cuda_capability": (9, 0)},
        {"switchable_adapters": True},
    ):
        compiled = placed(**kwargs)
        assert compiled.compile and "auto: CUDA, everything resident" in _line(compiled, "compile:"), kwargs
        assert not compiled.transformer_graphs and compiled.encoder_graphs, kwargs
    asked_off = placed(compile=False)
    assert not asked_off.compile and _line(asked_off, "compile:") == "compile: off (asked)"
    asked_on = decide_placement(weight_params=1000, cuda_available=False, compile=True)
    assert asked_on.compile and "(asked)" in _line(asked_on, "compile:")
    forced = placed(cache="taylorseer", compile=True)
    assert forced.compile
    assert placed(switchable_adapters=True, compile=True).compile


def test_encoder_graphs_come_with_the_compile_where_the_encoder_stays_on_the_device():
    """The text encode's CUDA graphs (pipeline/encoder_graphs.py) read the weights where they were at the capture:
    only with the compile on, on CUDA, everything resident (never with an encoder that streams or swaps)."""
    options = {"weight_params": KLEIN_4B_PARAMS, "cuda_available": True, "cuda_free_bytes": 79 * GIB}
    on = decide_placement(**options)
    assert on.compile and on.encoder_graphs and "CUDA graph" in _line(on, "encoder graphs:")
    for kwargs in ({"compile": False}, {"cuda_free_bytes": 16 * GIB, "compile": True}):
        off = decide_placement(**{**options, **kwargs})
        assert not off.encoder_graphs and not any(r.startswith("encoder graphs:") for r in off.reasons), kwargs
    cpu = decide_placement(weight_params=1000, cuda_available=False, compile=True)
    assert cpu.compile and not cpu.encoder_graphs


def test_transformer_graphs_come_with_the_encoders_for_a_transformer_nothing_changes():
    """The steps' CUDA graphs (pipeline/transformer_graphs.py) bake in what the transformer does: as the encoder's
    graphs, and not with quantized weights, a GGUF transformer, the step cache's hooks or LoRA adapters that
    requests switch."""
    options = {"weight_params": KLEIN_4B_PARAMS, "cuda_available": True, "cuda_free_bytes": 79 * GIB}
    on = decide_placement(**options)
    assert on.transformer_graphs and "CUDA graphs" in _line(on, "transformer graphs:")
    for kwargs in (
        {"compile": False},
        {"cuda_free_bytes": 16 * GIB, "compile": True},
        {"compile": True, "cache": "taylorseer"},
        {"compile": True, "quantize": "transformer=fp8", "cuda_capability": (9, 0)},
        {"compile": True, "transformer_file": Path("flux2-klein-4b-Q4_K.gguf")},
        {"compile": True, "switchable_adapters": True},
    ):
        off = decide_placement(**{**options, **kwargs})
        assert not off.transformer_graphs and not any(r.startswith("transformer graphs:") for r in off.reasons), kwargs
    encoder_only = decide_placement(**options, compile=True, quantize="text_encoder=fp8", cuda_capability=(9, 0))
    assert encoder_only.encoder_graphs and encoder_only.transformer_graphs
    cpu = decide_placement(weight_params=1000, cuda_available=False, compile=True)
    assert cpu.compile and not cpu.transformer_graphs


def test_cpu_defaults_to_fp32_without_offload():
    placement = decide_placement(weight_params=1000, cuda_available=False)
    assert (placement.device, placement.dtype, placement.offload) == ("cpu", torch.float32, "resident")
    assert len(placement.reasons) == 3


def test_cuda_defaults_to_bf16_and_no_offload_when_it_fits():
    placement = decide_placement(weight_params=KLEIN_4B_PARAMS, cuda_available=True, cuda_free_bytes=79 * GIB)
    assert (placement.device, placement.dtype, placement.offload) == ("cuda", torch.bfloat16, "resident")
    assert "fits" in _line(placement, "offload:")


def test_cuda_offloads_when_the_weights_do_not_fit():
    placement = decide_placement(weight_params=KLEIN_4B_PARAMS, cuda_available=True, cuda_free_bytes=16 * GIB)
    assert placement.offload == "model"
    assert "does not fit" in _line(placement, "offload:")


def test_the_margin_counts():
    # 8e9 bf16 params = 14.9 GiB: fits in 20 GiB free, not in 16 GiB (needs at least 4 GiB of margin).
    assert (
        decide_placement(weight_params=KLEIN_4B_PARAMS, cuda_available=True, cuda_free_bytes=20 * GIB).offload
        == "resident"
    )
    assert (
        decide_placement(weight_params=KLEIN_4B_PARAMS, cuda_available=True, cuda_free_bytes=18 * GIB).offload
        == "model"
    )


def test_fp32_on_cuda_needs_twice_the_room():
    assert (
        decide_placement(
            dtype="float32", weight_params=KLEIN_4B_PARAMS, cuda_available=True, cuda_free_bytes=24 * GIB
        ).offload
        == "model"
    )


def test_explicit_choices_are_kept():
    placement = decide_placement(
        "cuda", "float16", "sequential", weight_params=1, cuda_available=True, cuda_free_bytes=80 * GIB
    )
    assert (placement.dtype, placement.offload) == (torch.float16, "sequential")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device": "cuda", "cuda_available": False},
        {"device": "cpu", "offload": "model", "cuda_available": False},
        {"device": "tpu"},
        {"dtype": "int8"},
        {"offload": "disk"},
    ],
)
def test_impossible_or_unknown_choices_are_refused(kwargs):
    with pytest.raises(PlacementError):
        decide_placement(weight_params=1, **kwargs)


def test_count_weight_params_reads_safetensors_headers(tiny_klein):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_klein)
    # Every saved tensor (weights and persistent buffers), tied ones (embeddings = lm_head) counted once.
    unique = {
        t.data_ptr(): t.numel()
        for name in ("transformer", "text_encoder", "vae")
        for t in getattr(pipe, name).state_dict().values()
    }
    expected = sum(unique.values())
    assert count_weight_params(tiny_klein) == expected
