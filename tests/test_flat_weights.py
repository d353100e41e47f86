"""Quantized weights held as plain tensors for streaming (pipeline/flat_weights.py): the same values and outputs,
only plain tensors where diffusers' group offloading and the pinned host buffers see them, and a quantized tiny
model streamed block by block making the image it makes resident. (On an H200, fp8 weights streamed with CUDA
streams failed at the first forward pass; a CPU has no streams, so that failure is not reproduced here: the
streams are faked where the hooks register, as in test_swapping.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import job, make_engine
from fake_streams import fake_streams
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

pytest.importorskip("torchao")

from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

from pipeline.flat_weights import flatten, flatten_weights, unflatten


def _quantized(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32, bias=False))
    model = model.to(torch.bfloat16)
    quantize_(model, config)
    return model


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig, Float8WeightOnlyConfig])
def test_a_quantized_weight_comes_apart_into_plain_tensors_and_back(config):
    weight = _quantized(config(set_inductor_config=False))[0].weight
    leaves, spec = flatten(weight)
    assert len(leaves) >= 2 and all(type(leaf) is torch.Tensor for leaf in leaves)
    rebuilt = unflatten(leaves, spec)
    assert type(rebuilt) is type(weight) and rebuilt.shape == weight.shape and rebuilt.dtype == weight.dtype
    assert torch.equal(rebuilt.dequantize(), weight.dequantize())
    plain = torch.randn(3)
    assert flatten(plain) == ([plain], None) and unflatten([plain], None) is plain


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig, Float8WeightOnlyConfig])
def test_flattened_layers_compute_what_the_quantized_ones_did(config):
    model = _quantized(config(set_inductor_config=False))
    inputs = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(inputs)
    kind = type(model[0].weight)
    assert flatten_weights(model) == 2
    # Buffers, plain: the parameters left are the biases, so the model's dtype (its first floating-point
    # parameter's, for diffusers and transformers) stays bfloat16 and not the quantized values' own.
    assert [name for name, _ in model.named_parameters()] == ["0.bias"]
    originals = [buffer for name, buffer in model.named_buffers() if ".original" in name]
    assert len(originals) >= 4 and all(type(buffer) is torch.Tensor for buffer in originals)
    assert {buffer.dtype for buffer in originals} > {torch.float32}  # the quantized values' own dtype is there
    assert type(model[0].weight) is kind and type(model[2].weight) is kind  # rebuilt where the layer reads it
    with torch.inference_mode():
        assert torch.equal(model(inputs), expected)
    assert flatten_weights(model) == 0  # held once
    model.to(torch.device("meta"))  # the plain tensors move with the module, and the weight is rebuilt there
    assert model[0].weight.device.type == "meta"


def _streamed_quantized(folder, monkeypatch):
    """The tiny pipeline in `folder`, both components quantized (fp8 transformer, int8 encoder) and streamed as
    under a small card's plan, with CUDA streams faked where the hooks register."""
    from diffusers import DiffusionPipeline

    import pipeline.swapping as swapping
    from pipeline.swapping import stream_blocks

    fake_streams(monkeypatch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(swapping, "_settle", lambda modules, tensors, device: None)  # no CUDA to keep them on
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    quantize_(pipe.transformer, Float8WeightOnlyConfig(set_inductor_config=False))
    quantize_(pipe.text_encoder, Int8WeightOnlyConfig(set_inductor_config=False))
    stream_blocks(pipe.text_encoder, "cuda", text_encoder=True)
    stream_blocks(pipe.transformer, "cuda")
    return pipe


@pytest.mark.parametrize("weights", ["tiny_klein", "tiny_dev"])
def test_streamed_quantized_components_hand_only_plain_tensors_to_the_offloading(weights, request, monkeypatch):
    """With (faked) streams diffusers keeps a host copy of every streamed tensor and moves it at each pass: all of
    them plain, each a view into the packed host buffers."""
    from pipeline.internals import offload_groups

    pipe = _streamed_quantized(request.getfixturevalue(weights), monkeypatch)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16  # what the pipeline computes in
    copies = 0
    for module in (pipe.text_encoder, pipe.transformer):
        assert not any(is_traceable_wrapper_subclass(p) for p in module.parameters())
        for group in offload_groups(module):
            for param, host in group.cpu_param_dict.items():
                assert type(param) in (torch.nn.Parameter, torch.Tensor) and type(host) is torch.Tensor
                assert host.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()  # packed, kept
                copies += 1
    assert copies > 0
    assert type(pipe.transformer.transformer_blocks[0].ff.linear_in.weight).__name__ == "Float8Tensor"


@pytest.mark.parametrize("weights", ["tiny_klein", "tiny_dev"])
def test_streamed_groups_hand_every_tensor_back_at_offload(weights, request, monkeypatch):
    """Each streamed group (the encoder's leaves, the transformer's blocks) brought in and sent back holds only its
    host copies again: its buffers (the flattened quantized weights) as well as its parameters. diffusers 0.42's
    stream branch sends back only parameters: on an H200 under a 24 GiB cap the text encoder's streamed layers piled
    up on the card until it ran out (6.7 GiB after 12 of dev's layers). A CPU has no second device: each copy to
    the device is a clone here (a storage of its own), the rest of diffusers' onload and offload runs as it is."""
    import diffusers.hooks.group_offloading as group_offloading

    from pipeline.internals import offload_groups

    pipe = _streamed_quantized(request.getfixturevalue(weights), monkeypatch)

    def to_device(group, tensor, source, default_stream):
        tensor.data = source.clone()  # stands for the copy on the device

    monkeypatch.setattr(group_offloading.ModuleGroup, "_transfer_tensor_to_device", to_device)
    for module in (pipe.text_encoder, pipe.transformer):
        groups = [group for group in offload_groups(module) if group.stream is not None]
        host = {id(tensor): copy.data_ptr() for group in groups for tensor, copy in group.cpu_param_dict.items()}
        buffers = [buffer for group in groups for member in group.modules for buffer in member.buffers()]
        assert groups and buffers  # streamed groups holding flattened weights as buffers
        for group in groups:
            group.onload_()
        assert not any(buffer.data_ptr() == host[id(buffer)] for buffer in buffers)  # each one brought in
        for group in groups:
            group.offload_()
        tensors = [*module.named_parameters(), *module.named_buffers()]
        kept = [name for name, tensor in tensors if id(tensor) in host and tensor.data_ptr() != host[id(tensor)]]
        assert not kept, kept[:5]
        assert all(id(buffer) in host for buffer in buffers)


@pytest.mark.parametrize("weights", ["tiny_klein", "tiny_dev"])
def test_a_quantized_model_streamed_block_by_block_makes_the_resident_image(weights, request):
    """klein (a Qwen3 encoder) and dev (Mistral 3's, the shape of the 24 GiB run), both components quantized."""
    from pipeline.component_sizes import measure_folder
    from pipeline.placement import decide_placement

    folder = request.getfixturevalue(weights)
    images = {}
    components = measure_folder(folder, itemsize=4)
    for offload in ("resident", "block-streaming"):
        placement = decide_placement(
            offload=offload,
            weight_params=1,
            cuda_available=False,
            components=components,
            quantize="transformer=fp8-weight,text_encoder=fp8-weight",
        )
        engine = make_engine(folder, placement)
        try:
            pipe = engine.pool.get().pipe
            streamed = offload != "resident"
            assert any(is_traceable_wrapper_subclass(p) for p in pipe.transformer.parameters()) != streamed
            assert pipe.transformer.dtype == torch.float32  # the noise is drawn in it (fp8 values, on an H200)
            generation = job(prompt="a lighthouse", size=64, seeds=(2,), steps=2)
            images[offload] = np.asarray(engine.submit(generation).future.result(120).images[0], dtype=np.int16)
        finally:
            engine.stop(10)
    assert np.abs(images["block-streaming"] - images["resident"]).max() <= 1
