"""The tiny weights builder: both variants load through the real DiffusionPipeline and generate."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "variant, pipeline_class, encoder_class, tokenizer_class",
    [
        ("klein", "Flux2KleinPipeline", "Qwen3ForCausalLM", "Qwen2TokenizerFast"),
        ("dev", "Flux2Pipeline", "Mistral3ForConditionalGeneration", "PixtralProcessor"),
    ],
)
def test_variant_loads_with_real_classes_and_generates(
    tmp_path, variant, pipeline_class, encoder_class, tokenizer_class
):
    from diffusers import DiffusionPipeline

    from pipeline.tiny_weights import build_tiny_weights

    started = time.perf_counter()
    folder = build_tiny_weights(tmp_path / variant, variant)
    assert time.perf_counter() - started < 10
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert type(pipe).__name__ == pipeline_class
    assert type(pipe.text_encoder).__name__ == encoder_class
    # transformers 5 folds the Fast tokenizer classes into their plain names (both backed by `tokenizers`).
    assert type(pipe.tokenizer).__name__ in (tokenizer_class, tokenizer_class.removesuffix("Fast"))
    assert type(pipe.transformer).__name__ == "Flux2Transformer2DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLFlux2"
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.tokenizer.chat_template if variant == "klein" else pipe.tokenizer.tokenizer.chat_template

    image = pipe(
        prompt="a cat", height=64, width=96, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (96, 64)


def test_builds_are_deterministic(tmp_path):
    from pipeline.tiny_weights import build_tiny_weights

    first = build_tiny_weights(tmp_path / "a", "klein")
    second = build_tiny_weights(tmp_path / "b", "klein")
    assert _digest(first) == _digest(second)


def test_builder_leaves_the_global_rng_alone(tmp_path):
    from pipeline.tiny_weights import build_tiny_weights

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_weights(tmp_path / "k", "klein")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_variant_is_refused(tmp_path):
    from pipeline.tiny_weights import build_tiny_weights

    with pytest.raises(ValueError, match="variant"):
        build_tiny_weights(tmp_path / "x", "schnell")
