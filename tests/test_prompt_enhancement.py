"""prompt_enhancement "on": the model's own language model (tiny klein's Qwen3) rewrites the prompt, end to end
through the OpenAI SDK, and in-process for what a server cannot force (a rewrite too long for the encoder)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import RunningServer
from engine_helpers import job, make_engine
from imaging import decode_b64, generate, pixels

from pipeline import prompt_enhancement
from pipeline.prompt_enhancement import PromptEnhancer
from pipeline.tiny_weights import build_tiny_pipeline
from server.timing import parse_server_timing

ONE = {"size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}
PROMPT = "a red kite over the sea"


@pytest.fixture(scope="module")
def enhancing(tiny_klein, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("enhance")
    with RunningServer(["--model", str(tiny_klein), "--enhancer-max-tokens", "12"], workdir) as running:
        yield running


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_rewrite_is_generated_returned_and_reproduces_the_image(enhancing):
    client = _client(enhancing)
    raw = client.images.with_raw_response.generate(
        prompt=PROMPT, extra_body={"prompt_enhancement": "on", "seed": 7, **_extra()}, **_direct()
    )
    result = raw.parse()
    revised = result.data[0].revised_prompt
    assert revised and revised != PROMPT
    assert result.model_extra.get("warnings") is None
    stages = parse_server_timing(raw.headers["server-timing"])
    assert stages["enhance"][0] > 0
    enhanced = pixels(decode_b64(result.data[0].b64_json))

    # The rewrite, sent as the prompt with enhancement off and the same seed, gives the very same image ...
    again = generate(client, prompt=revised, seed=7, prompt_enhancement="off", **ONE)
    assert again.data[0].revised_prompt == revised
    assert np.array_equal(pixels(decode_b64(again.data[0].b64_json)), enhanced)
    # ... and the original prompt another one: the image was made from the rewrite.
    plain = generate(client, prompt=PROMPT, seed=7, **ONE)
    assert plain.data[0].revised_prompt == PROMPT
    assert not np.array_equal(pixels(decode_b64(plain.data[0].b64_json)), enhanced)
    # The history's parameters, sent back with the prompt, ask for the rewrite again: the same image.
    import httpx

    entry = httpx.get(f"{enhancing.base_url}/v1/images/history/{raw.headers['x-flux2-history-id']}").json()
    assert entry["parameters"]["prompt_enhancement"] == "on"
    rerun = httpx.post(
        f"{enhancing.base_url}/v1/images/generations",
        json={**entry["parameters"], "prompt": entry["prompt"], "response_format": "b64_json"},
        timeout=120,
    ).json()
    assert np.array_equal(pixels(decode_b64(rerun["data"][0]["b64_json"])), enhanced)
    # No enhance stage when no rewrite was asked for.
    raw_plain = client.images.with_raw_response.generate(prompt=PROMPT, extra_body={"seed": 7, **_extra()}, **_direct())
    assert "enhance" not in parse_server_timing(raw_plain.headers["server-timing"])


def test_same_seed_same_rewrite_other_seed_other_rewrite(enhancing):
    client = _client(enhancing)

    def rewrite(seed: int, n: int = 1) -> list[str]:
        result = generate(client, prompt="a lighthouse at dawn", seed=seed, n=n, prompt_enhancement=True, **ONE)
        return [item.revised_prompt for item in result.data]

    first = rewrite(11)
    assert rewrite(11) == first
    assert rewrite(12) != first
    assert rewrite(11, n=2) == first * 2  # one rewrite for the request, from its first seed


def test_the_rewrite_does_not_depend_on_the_cache():
    pipe = build_tiny_pipeline("klein")
    model = SimpleNamespace(pipe=pipe, spec=SimpleNamespace(path="tiny", family="klein"))
    asked = job(prompt="a lighthouse", seeds=(5,), enhance_prompt=True)
    first = PromptEnhancer(max_new_tokens=8).rewrite(model, asked)  # type: ignore[arg-type]
    second = PromptEnhancer(max_new_tokens=8).rewrite(model, asked)  # type: ignore[arg-type]
    assert first == second and first.prompt != "a lighthouse" and not first.warnings


def test_enhancer_model_names_another_local_language_model(tmp_path):
    pipe = build_tiny_pipeline("klein")
    pipe.text_encoder.save_pretrained(tmp_path / "enhancer")  # a causal LM folder with its tokenizer
    pipe.tokenizer.save_pretrained(tmp_path / "enhancer")
    model = SimpleNamespace(pipe=pipe, spec=SimpleNamespace(path="tiny", family="klein"))
    asked = job(prompt="a lighthouse", seeds=(5,), enhance_prompt=True)
    enhancer = PromptEnhancer(str(tmp_path / "enhancer"), max_new_tokens=8)
    rewrite = enhancer.rewrite(model, asked)  # type: ignore[arg-type]
    assert rewrite.prompt != "a lighthouse" and enhancer._external is not None
    # The same weights as klein's own encoder: the same rewrite for the same seed.
    assert rewrite == PromptEnhancer(max_new_tokens=8).rewrite(model, asked)  # type: ignore[arg-type]


def test_an_empty_rewrite_falls_back_to_the_prompt_with_a_warning(tiny_klein, tmp_path):
    args = ["--model", str(tiny_klein), "--enhancer-max-tokens", "0"]
    with RunningServer(args, tmp_path) as running:
        result = generate(_client(running), prompt=PROMPT, seed=3, prompt_enhancement="on", **ONE)
        log = running.log()
    assert result.data[0].revised_prompt == PROMPT
    (warning,) = result.model_extra["warnings"]
    assert "the rewrite came back empty" in warning and "original prompt" in warning
    assert "the rewrite came back empty" in log


def test_a_rewrite_too_long_for_the_encoder_falls_back(monkeypatch):
    pipe = build_tiny_pipeline("klein")
    model = SimpleNamespace(pipe=pipe, spec=SimpleNamespace(path="tiny", family="klein"))
    monkeypatch.setattr(prompt_enhancement, "_chat_generate", lambda *args: "a very long rewrite " * 200)
    rewrite = PromptEnhancer().rewrite(model, job(prompt="a cat", enhance_prompt=True))  # type: ignore[arg-type]
    assert rewrite.prompt == "a cat"
    assert "longer than the text encoder's 512 tokens" in rewrite.warnings[0]


def _in_one_batch(engine, enhanced_prompt: str, plain_prompt: str):
    """The results of a job asking for a rewrite and one not asking, made in one pipeline call (seed 4)."""
    with engine.arriving() as first, engine.arriving():
        enhanced = engine.submit(job(prompt=enhanced_prompt, seeds=(4,), enhance_prompt=True))
        first.release()
        plain = engine.submit(job(prompt=plain_prompt, seeds=(4,)))
    return enhanced.future.result(60), plain.future.result(60)


def test_in_a_batch_only_the_job_that_asks_is_rewritten(tiny_klein):
    engine = make_engine(tiny_klein, enhancer_max_tokens=8, batch_window=0.5, max_batch_images=4)
    try:
        enhanced_result, plain_result = _in_one_batch(engine, "a cat", "a cat")
        alone = engine.submit(job(prompt="a cat", seeds=(4,))).future.result(60)
    finally:
        engine.stop()
    assert enhanced_result.batch_images == 2  # they shared one pipeline call
    assert enhanced_result.prompt.used_prompt != "a cat"
    assert plain_result.prompt.used_prompt == "a cat"
    # The other job's image is its own prompt's (fp32 batch math: at most 2/255 apart from the one made alone).
    assert np.abs(pixels(plain_result.images[0]) - pixels(alone.images[0])).max() <= 2


def _direct() -> dict:
    return {"size": "64x64", "response_format": "b64_json"}


def _extra() -> dict:
    return {"num_inference_steps": 2}


def test_an_enhanced_image_file_is_reproduced_from_its_metadata(enhancing):
    """The file records the enhancement and the rewrite; `reproduce`'s request (the rewrite as the prompt) gives
    the same image, for the second image of n=2 too (whose own seed would draw another rewrite). Not the same bytes:
    the new file's record names the rewrite as its prompt."""
    import base64

    import httpx

    from pipeline.file_metadata import read_metadata
    from server.reproduce_command import reproduction

    result = generate(_client(enhancing), prompt=PROMPT, seed=21, n=2, prompt_enhancement="on", **ONE)
    second = base64.b64decode(result.data[1].b64_json)
    record = read_metadata(second)
    assert record["prompt_enhancement"] == "on" and record["revised_prompt"] == result.data[1].revised_prompt
    endpoint, fields = reproduction(record, [], None)
    answer = httpx.post(
        f"{enhancing.base_url}/v1/images/{endpoint}", json={**fields, "response_format": "b64_json"}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    again = pixels(decode_b64(answer.json()["data"][0]["b64_json"]))
    # Within 1/255: a row of a batch of two and a lone image may round differently (float reductions, CPU).
    assert np.abs(again - pixels(decode_b64(result.data[1].b64_json))).max() <= 1


def test_an_enhancer_model_that_is_no_language_model_is_refused_at_start(tiny_klein, tmp_path):
    """A missing folder, or one holding another kind of model, started fine and then failed every request that asked
    for a rewrite, and every other image of its batch (a 500 each)."""
    from conftest import serve_refused

    missing = serve_refused("--model", str(tiny_klein), "--enhancer-model", str(tmp_path / "nope"))
    assert f"--enhancer-model {tmp_path / 'nope'}: not a language model's folder" in missing
    assert "Traceback" not in missing
    pipe = build_tiny_pipeline("klein")
    pipe.vae.save_pretrained(tmp_path / "vae")  # a config.json, but a diffusers model's
    vae = serve_refused("--model", str(tiny_klein), "--enhancer-model", str(tmp_path / "vae"))
    assert f"--enhancer-model {tmp_path / 'vae'}: not a language model's folder" in vae
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)).save_pretrained(
        tmp_path / "vit"
    )
    vit = serve_refused("--model", str(tiny_klein), "--enhancer-model", str(tmp_path / "vit"))
    assert "a vit model, not a causal language model" in vit


def test_a_rewrite_that_fails_costs_only_its_request_the_rewrite(tiny_klein, monkeypatch):
    """A failing enhancer (a broken model, a bad generation) gives its own job the original prompt and a warning;
    the job beside it in the batch is untouched, and nothing fails."""

    def broken(*args):
        raise RuntimeError("the enhancer broke")

    monkeypatch.setattr(prompt_enhancement, "_chat_generate", broken)
    engine = make_engine(tiny_klein, enhancer_max_tokens=8, batch_window=0.5, max_batch_images=4)
    try:
        enhanced_result, plain_result = _in_one_batch(engine, "a cat", "a dog")
    finally:
        engine.stop()
    assert enhanced_result.batch_images == 2
    assert enhanced_result.prompt.used_prompt == "a cat" and plain_result.prompt.used_prompt == "a dog"
    (warning,) = enhanced_result.warnings
    assert "the prompt enhancer failed" in warning and not plain_result.warnings
