"""`--quantize`: parsing, refusing impossible combinations at start, and int8 weights (torchao) on tiny weights."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import serve_refused
from engine_helpers import failing_on_empty_inputs, job, make_engine

from pipeline import quantization
from pipeline.placement import PlacementError, decide_placement
from pipeline.quantization import Quantization, QuantizationError, check_quantization, parse_quantization


def test_specs():
    assert parse_quantization("") == parse_quantization("none") == Quantization()
    spec = parse_quantization("transformer=int8, Text_Encoder=fp8-weight")
    assert spec.schemes == (("transformer", "int8"), ("text_encoder", "fp8-weight"))
    assert str(spec) == "transformer=int8,text_encoder=fp8-weight"


@pytest.mark.parametrize("text", ["int8", "vae=int8", "transformer=int4", "transformer=int8,transformer=fp8"])
def test_bad_specs(text):
    with pytest.raises(QuantizationError):
        parse_quantization(text)


@pytest.mark.parametrize(
    ("text", "device", "capability", "words"),
    [
        ("transformer=nf4", "cpu", None, "needs a CUDA GPU"),
        ("transformer=fp8", "cpu", None, "capability 8.9+"),
        ("text_encoder=fp8", "cuda", (8, 0), "this card has 8.0"),
    ],
)
def test_impossible_combinations_are_refused(text, device, capability, words):
    with pytest.raises(QuantizationError, match=words):
        check_quantization(parse_quantization(text), device, capability)


def test_fp8_is_accepted_on_hopper():
    assert check_quantization(parse_quantization("transformer=fp8"), "cuda", (9, 0)) == [
        "quantize: transformer fp8 (torchao)"
    ]


def test_a_missing_library_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QuantizationError, match=r"pip install -e \".\[quant\]\""):
        check_quantization(parse_quantization("transformer=int8"), "cpu")


def test_the_server_refuses_nf4_on_the_cpu_at_start(tiny_klein):
    assert "transformer=nf4 needs a CUDA GPU" in serve_refused(
        "--model", str(tiny_klein), "--quantize", "transformer=nf4"
    )


def test_int8_weights_load_and_generate(tiny_klein):
    placement = decide_placement(weight_params=1, quantize="transformer=int8,text_encoder=int8")
    assert "quantize: transformer int8 (torchao)" in placement.reasons
    engine = make_engine(tiny_klein, placement)
    try:
        pipe = engine.pool.get().pipe
        assert type(pipe.transformer.transformer_blocks[0].ff.linear_in.weight).__name__ == "Int8Tensor"
        assert type(pipe.text_encoder.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
        image = engine.submit(job(prompt="a lighthouse", size=64, seeds=(2,), steps=2)).future.result(120).images[0]
        assert image.size == (64, 64)
    finally:
        engine.stop(10)


def test_a_bad_value_is_a_placement_error():
    with pytest.raises(PlacementError, match="quantize"):
        decide_placement(weight_params=1, quantize="transformer=bf16")


@pytest.mark.parametrize("scheme", ["int8", "fp8-weight", "fp8"])
def test_torchao_configs_leave_inductor_settings_alone(scheme):
    assert quantization._torchao_config(scheme).set_inductor_config is False


def _kernel_tuning_off(monkeypatch):
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor, "coordinate_descent_tuning", False)
    monkeypatch.setattr(inductor, "coordinate_descent_check_all_directions", False)
    return inductor


@pytest.mark.parametrize("scheme", ["int8", "fp8-weight"])
def test_quantizing_a_built_model_does_not_turn_on_kernel_tuning(scheme, monkeypatch):
    """torchao's default turns on Inductor's coordinate-descent tuning (for the thread that quantizes, which then
    compiles): with --compile and fp8 the warm-up spent minutes benchmarking kernel variants (run 9, H200)."""
    import torch

    inductor = _kernel_tuning_off(monkeypatch)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(torch.bfloat16)
    quantization.quantize_module(module, "transformer", parse_quantization(f"transformer={scheme}"))
    assert type(module[0].weight).__name__ in ("Int8Tensor", "Float8Tensor")
    assert module(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 64)
    assert inductor.coordinate_descent_tuning is False
    assert inductor.coordinate_descent_check_all_directions is False


def test_loading_quantized_weights_does_not_turn_on_kernel_tuning(tiny_klein, monkeypatch):
    """The same through diffusers' and transformers' loaders (the server's path), on the thread that loads."""
    import torch
    from diffusers import DiffusionPipeline

    inductor = _kernel_tuning_off(monkeypatch)
    config = quantization.pipeline_quantization_config(parse_quantization("transformer=int8,text_encoder=int8"))
    pipe = DiffusionPipeline.from_pretrained(tiny_klein, dtype=torch.bfloat16, quantization_config=config)
    assert type(pipe.transformer.transformer_blocks[0].ff.linear_in.weight).__name__ == "Int8Tensor"
    assert type(pipe.text_encoder.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert inductor.coordinate_descent_tuning is False
    assert inductor.coordinate_descent_check_all_directions is False


def test_activation_quantized_layers_give_an_empty_output_for_an_empty_input():
    import torch

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    module = failing_on_empty_inputs(layers)
    inputs = torch.randn(2, 3, 8)
    before = module(inputs)
    with pytest.raises(IndexError, match="non-zero size"):
        module(inputs[:, :0])
    for scheme in ("int8", "fp8-weight"):  # weights only: an empty input is no problem, nothing is changed
        assert quantization.tolerate_empty_inputs(module, scheme) == 0
    assert quantization.tolerate_empty_inputs(module, "fp8") == 2
    assert quantization.tolerate_empty_inputs(module, "fp8") == 0  # each layer once
    empty = module(inputs[:, :0])
    assert empty.shape == (2, 0, 4) and empty.dtype == inputs.dtype
    assert torch.equal(module(inputs), before)


def test_fp8_layers_tolerate_empty_inputs_when_built_and_when_loaded(tiny_klein, monkeypatch):
    """Both ways fp8 weights arrive: `quantize_module` (the bench's in-memory models) and the loader, whose
    quantization diffusers applies while loading. fp8 needs a CUDA card of capability 8.9+, so torchao's part is
    left out here (on a GPU: .ci/gpu-checks, fp8-edits)."""
    import torch
    import torchao.quantization

    from pipeline import loader
    from pipeline.weights import inspect_model

    monkeypatch.setattr(torchao.quantization, "quantize_", lambda module, config: None)
    module = failing_on_empty_inputs(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    quantization.quantize_module(module, "transformer", parse_quantization("transformer=fp8"))
    assert module(torch.randn(1, 0, 8)).shape == (1, 0, 8)

    monkeypatch.setattr(loader, "pipeline_quantization_config", lambda quantization: None)
    fp8 = dataclasses.replace(decide_placement(weight_params=1), quantization=parse_quantization("transformer=fp8"))
    pipe = loader.load_model(inspect_model(tiny_klein), fp8).pipe
    assert getattr(pipe.transformer.context_embedder, quantization._TOLERANT, False)
    assert not hasattr(pipe.text_encoder.model.layers[0].mlp.up_proj, quantization._TOLERANT)  # not quantized
