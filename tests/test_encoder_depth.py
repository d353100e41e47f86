"""The text encoder run only as deep as FLUX.2 reads it (pipeline/encoder_depth.py): the same embeddings as the
whole encoder, exactly, from fewer layers and no logits; whole again after; under group offloading with streams;
and in the served path (a real server on weights whose encoder is deeper than what FLUX.2 reads)."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
import torch
from conftest import RunningServer
from fake_streams import fake_streams
from PIL import Image

from pipeline.encoder_depth import read_layers, reading_depth
from pipeline.tiny_weights import build_tiny_pipeline

PROMPTS = ["a red kite over the sea", "a lighthouse at dusk, oil painting"]


def deep_encoder(text_encoder: torch.nn.Module, layers: int) -> torch.nn.Module:
    """`text_encoder`'s architecture with `layers` decoder layers, random weights: the tiny encoders have 27
    (klein) and 30 (dev) layers, so the deepest state FLUX.2 reads is their last; the real ones have 36 and 40."""
    config = text_encoder.config.to_dict()
    text = config.get("text_config", config)
    text["num_hidden_layers"] = layers
    text.pop("layer_types", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return type(text_encoder)(type(text_encoder.config).from_dict(config)).eval()


def _deep_pipe(family: str, layers: int):
    pipe = build_tiny_pipeline(family)
    pipe.text_encoder = deep_encoder(pipe.text_encoder, layers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _watch(pipe) -> tuple[list[int], list[str]]:
    """Which decoder layers ran and whether the head did, for each call."""
    layers, head = [], []
    for index, layer in enumerate(pipe.text_encoder.get_decoder().layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: layers.append(index))
    pipe.text_encoder.get_output_embeddings().register_forward_pre_hook(lambda module, args: head.append("ran"))
    return layers, head


def _embeds(pipe) -> torch.Tensor:
    with torch.inference_mode():
        return pipe.encode_prompt(prompt=PROMPTS, device="cpu", num_images_per_prompt=1)[0]


@pytest.mark.parametrize(("family", "layers", "read"), [("klein", 36, (9, 18, 27)), ("dev", 40, (10, 20, 30))])
def test_only_the_layers_read_run_and_the_embeddings_are_the_same(family, layers, read):
    pipe = _deep_pipe(family, layers)
    assert read_layers(pipe) == read  # diffusers' encode_prompt default, as the runner calls it
    ran, head = _watch(pipe)
    whole = _embeds(pipe)
    assert ran == list(range(layers)) and head == ["ran"]  # plain diffusers: every layer and the logits
    ran.clear(), head.clear()
    decoder = pipe.text_encoder.get_decoder()
    modules = (decoder.layers, decoder.norm, pipe.text_encoder.get_output_embeddings())
    with reading_depth(pipe):
        cut = _embeds(pipe)
    assert ran == list(range(max(read))) and head == []  # layers 0 .. deepest-1, no logits
    assert torch.equal(cut, whole)
    # Whole again after: the same modules back, logits over the whole vocabulary.
    assert (decoder.layers, decoder.norm, pipe.text_encoder.get_output_embeddings()) == modules
    with torch.inference_mode():
        logits = pipe.text_encoder(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == pipe.text_encoder.get_output_embeddings().out_features


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_an_encoder_whose_last_state_is_read_runs_whole_without_the_head(family):
    """The tiny encoders: the deepest state read is their last, which transformers reports after the final
    norm; every layer and the norm run, only the logits are skipped, and the embeddings do not change."""
    pipe = build_tiny_pipeline(family)
    ran, head = _watch(pipe)
    whole = _embeds(pipe)
    layers = len(ran)
    ran.clear(), head.clear()
    with reading_depth(pipe):
        cut = _embeds(pipe)
    assert len(ran) == layers and head == []
    assert torch.equal(cut, whole)


def test_an_encoder_kept_elsewhere_runs_as_it_is():
    """A text encoder without transformers' decoder and head accessors is left alone."""
    pipe = build_tiny_pipeline("klein")
    whole = _embeds(pipe)

    class Wrapped(torch.nn.Module):  # no get_decoder / get_output_embeddings
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        @property
        def dtype(self):
            return self.inner.dtype

    pipe.text_encoder = Wrapped(pipe.text_encoder)
    with reading_depth(pipe):
        assert torch.equal(_embeds(pipe), whole)


def test_under_group_offloading_with_streams(monkeypatch):
    """The streamed plans (encoder-streamed, block-streaming) stream the encoder weight by weight with diffusers'
    group offloading, whose first call records the order to prefetch in. A CPU has no streams: the stream backend,
    pinning and the moves are faked (the hooks' bookkeeping runs for real). A cut encode first, the whole encoder
    after (prompt enhancement generates with it), a cut encode again, and the other way round: the same
    embeddings and logits each time, and diffusers' warning that layers did not run is not logged."""
    import diffusers.hooks.group_offloading as group_offloading
    import diffusers.pipelines.flux2.pipeline_flux2_klein as klein_module

    fake_streams(monkeypatch)
    monkeypatch.setattr(group_offloading, "send_to_device", lambda value, *args, **kwargs: value)
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", lambda self: None)
    monkeypatch.setattr(group_offloading.ModuleGroup, "offload_", lambda self: None)
    monkeypatch.setattr(klein_module, "get_module_execution_device", lambda module: torch.device("cpu"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    offload_log = logging.getLogger("diffusers.hooks.group_offloading")
    offload_log.addHandler(handler)
    try:
        for whole_first in (False, True):
            pipe = _deep_pipe("klein", 36)
            whole = _embeds(pipe)
            with torch.inference_mode():
                logits = pipe.text_encoder(input_ids=torch.tensor([[1, 2, 3]])).logits
            group_offloading.apply_group_offloading(
                pipe.text_encoder, onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True,
                low_cpu_mem_usage=False,
            )  # fmt: skip
            ran, head = _watch(pipe)
            calls = ["whole", "cut", "whole", "cut"] if whole_first else ["cut", "whole", "cut"]
            for call in calls:
                ran.clear(), head.clear()
                if call == "cut":
                    with reading_depth(pipe):
                        assert torch.equal(_embeds(pipe), whole)
                    assert ran == list(range(27)) and head == []
                else:
                    with torch.inference_mode():
                        assert torch.equal(pipe.text_encoder(input_ids=torch.tensor([[1, 2, 3]])).logits, logits)
                    assert ran == list(range(36)) and head == ["ran"]
    finally:
        offload_log.removeHandler(handler)
    assert not [r for r in records if "not executed" in r.getMessage()]


@pytest.fixture(scope="module")
def deep_klein(tmp_path_factory):
    """Tiny klein weights whose text encoder has Qwen3-4B's 36 layers (FLUX.2 reads up to state 27)."""
    folder = tmp_path_factory.mktemp("weights") / "deep-klein"
    _deep_pipe("klein", 36).save_pretrained(folder)
    return folder


def test_a_served_image_is_plain_diffusers_image_from_the_whole_encoder(deep_klein, tmp_path):
    """Served (the runner encodes with the layers FLUX.2 reads only), the image is the one plain diffusers makes
    with the whole encoder, for the same prompt and seed."""
    from diffusers import DiffusionPipeline
    from openai import OpenAI

    pipe = DiffusionPipeline.from_pretrained(deep_klein, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=PROMPTS[0], height=64, width=96, num_inference_steps=2, generator=torch.Generator().manual_seed(11)
    ).images[0]
    with RunningServer(["--model", str(deep_klein), "--output-dir", str(tmp_path / "out")], tmp_path) as server:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.images.generate(
            prompt=PROMPTS[0], size="96x64", response_format="b64_json", extra_body={"seed": 11, "steps": 2}
        )
    ours = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB")
    assert ours.size == theirs.size == (96, 64)
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
    assert difference.max() <= 1, difference.max()


def test_the_engine_encodes_with_the_layers_read_only(deep_klein):
    """The runner's prompt encode (a cache miss) runs layers 0-26 of 36 and no head; a cache hit runs none."""
    from engine_helpers import job, make_engine

    engine = make_engine(deep_klein, batch_window=0)
    try:
        ran, head = _watch(engine.pool.get().pipe)
        assert engine.submit(job(prompt=PROMPTS[0])).future.result(60).images[0].size == (64, 64)
        assert ran == list(range(27)) and head == []
        ran.clear()
        engine.submit(job(prompt=PROMPTS[0], seeds=(2,))).future.result(60)
        assert ran == []
    finally:
        engine.stop(10)
