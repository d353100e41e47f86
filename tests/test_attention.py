"""`--attention`: the transformer's attention kernel pinned through diffusers' dispatcher (pipeline/attention.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RunningServer, serve_refused
from imaging import decode_b64, generate, pixels
from openai import OpenAI

from pipeline import reference_cache
from pipeline.attention import backend_for
from pipeline.loader import load_model
from pipeline.placement import PlacementError, decide_placement
from pipeline.weights import inspect_model


def _line(placement, prefix):
    return next((reason for reason in placement.reasons if reason.startswith(prefix)), None)


def test_the_kernel_is_checked_and_logged_at_placement():
    assert decide_placement(weight_params=1).attention == "sdpa"
    assert _line(decide_placement(weight_params=1), "attention:") is None  # the default: no line
    math = decide_placement(weight_params=1, attention="math")
    assert math.attention == "math" and "attention: math (asked" in _line(math, "attention:")
    for kernel in ("cudnn", "flash", "efficient"):
        with pytest.raises(PlacementError, match=f"attention {kernel} is a CUDA kernel"):
            decide_placement(weight_params=1, attention=kernel)
        on_cuda = decide_placement(weight_params=1, attention=kernel, cuda_available=True, cuda_free_bytes=1 << 36)
        assert on_cuda.attention == kernel
    with pytest.raises(PlacementError, match="attention must be one of"):
        decide_placement(weight_params=1, attention="flash3")


def test_the_server_refuses_a_cuda_kernel_on_the_cpu_at_start(tiny_klein):
    stderr = serve_refused("--model", str(tiny_klein), "--attention", "cudnn")
    assert "attention cudnn is a CUDA kernel" in stderr and "Traceback" not in stderr


def test_every_attention_layer_gets_the_kernel_the_reference_caches_too(tiny_klein):
    """Pinned after the reference cache's processors go on, and kept when they go on later (the bench's order)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    placement = decide_placement(weight_params=1, attention="math", reference_cache="on", reference_memory="0")
    transformer = load_model(inspect_model(tiny_klein), placement).pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert reference_cache.installed(transformer)
    assert {block.attn.processor._attention_backend for block in blocks} == {AttentionBackendName._NATIVE_MATH}

    plain = load_model(inspect_model(tiny_klein), decide_placement(weight_params=1, attention="math"))
    later = plain.pipe.transformer
    reference_cache.install(later)
    assert {b.attn.processor._attention_backend for b in later.transformer_blocks} == {
        AttentionBackendName._NATIVE_MATH
    }


def test_pinning_a_kernel_on_one_model_leaves_every_other_on_torchs_pick(tiny_klein, monkeypatch):
    """diffusers' `set_attention_backend` also makes its backend the whole process's default: a model pinned to
    `math` moved every other model in the process to it (caught by the safety checker's exact-pixel tests, whose
    in-process images then differed from the server's). Only the pinned model's layers run the kernel now."""
    from engine_helpers import transformer_inputs

    kernels = []
    real = torch.nn.attention.sdpa_kernel

    def recording(backends, *args, **kwargs):
        kernels.append(backends)
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", recording)
    plain = load_model(inspect_model(tiny_klein), decide_placement(weight_params=1)).pipe.transformer
    inputs = transformer_inputs(plain)
    with torch.inference_mode():
        before = plain(**inputs)[0]
    pinned = load_model(inspect_model(tiny_klein), decide_placement(weight_params=1, attention="math")).pipe
    with torch.inference_mode():
        after = plain(**inputs)[0]
    assert kernels == [] and torch.equal(before, after)
    with torch.inference_mode():
        out = pinned.transformer(**inputs)[0]
    layers = len(pinned.transformer.transformer_blocks) + len(pinned.transformer.single_transformer_blocks)
    assert kernels == [torch.nn.attention.SDPBackend.MATH] * layers
    assert torch.allclose(out, before, atol=1e-4)


def test_a_masked_call_goes_to_torchs_pick_with_a_kernel_that_takes_no_masks():
    """The reference cache masks the keys of rows with fewer reference tokens; cuDNN's and flash's kernels may not
    take a mask, so such a call runs on torch's pick (here on the CPU, where cuDNN's kernel cannot run at all: the
    unmasked call fails, the masked one runs)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    cudnn, math = AttentionBackendName._NATIVE_CUDNN, AttentionBackendName._NATIVE_MATH
    assert backend_for(cudnn, masked=True) is None and backend_for(cudnn, masked=False) is cudnn
    assert backend_for(AttentionBackendName._NATIVE_FLASH, masked=True) is None
    assert backend_for(math, masked=True) is math and backend_for(None, masked=True) is None
    processor = reference_cache.ReferenceAttnProcessor("double.0")
    processor._attention_backend = cudnn
    query, key, value = (torch.randn(2, 5, 2, 8) for _ in range(3))  # (batch, tokens, heads, head_dim)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    out = processor._dispatch(query, key, value, mask)
    assert out.shape == (2, 5, 2, 8)
    with pytest.raises(RuntimeError):
        processor._dispatch(query, key, value, None)


@pytest.fixture(scope="module")
def math_server(tiny_klein, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("attention-math")
    args = ["--model", str(tiny_klein), "--attention", "math", "--output-dir", str(workdir / "outputs")]
    with RunningServer(args, workdir) as running:
        yield running


def test_a_server_with_the_math_kernel_serves_the_same_images(math_server, client):
    """The same seed on the default server (torch's pick) and one pinned to the unfused math kernel: the same image
    within rounding, a real decoded PNG of the asked size."""
    pinned = OpenAI(base_url=f"{math_server.base_url}/v1", api_key="unused-key", max_retries=0, timeout=120)
    params = {"prompt": "a red fox in snow", "size": "256x192", "seed": 11, "num_inference_steps": 2}
    images = [decode_b64(generate(c, **params, response_format="b64_json").data[0].b64_json) for c in (client, pinned)]
    assert images[0].size == images[1].size == (256, 192)
    difference = np.abs(pixels(images[0]) - pixels(images[1]))
    assert difference.max() <= 2, difference.max()
    assert "attention: math (asked" in math_server.log()
