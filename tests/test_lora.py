"""LoRA adapters (--lora, --fuse-lora, "loras" in requests) on tiny weights: through real servers and the openai SDK
(extra_body), the engine's batching in-process, and the option's checks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import replace

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import RunningServer
from engine_helpers import job, model_config
from imaging import decode_b64, generate, pixels
from lora_files import make_lora, to_kohya
from PIL import Image
from safetensors.torch import save_file

from pipeline.adapters import AdapterError, Adapters, adapters_from_options, parse_adapter, select
from pipeline.engine import Engine
from pipeline.model_choice import ModelChoice, ModelChoiceError, resolve_models
from pipeline.pool import ModelPool

ASK = {"prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json", "seed": 7, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def lora_files(tiny_klein, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    style = make_lora(tiny_klein, folder / "style.safetensors", seed=1, strength=0.6)
    return {
        "style": style,
        "other": make_lora(tiny_klein, folder / "other.safetensors", seed=2, strength=0.6),
        "kohya": to_kohya(style, folder / "style_kohya.safetensors"),
    }


@pytest.fixture(scope="module")
def lora_server(tiny_klein, lora_files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora-server")
    args = ["--model", str(tiny_klein), "--output-dir", str(workdir / "out"), "--batch-window-ms", "300"]
    args += ["--lora", f"style={lora_files['style']}", "--lora", f"other={lora_files['other']}:0.5"]
    args += ["--lora", f"kohya={lora_files['kohya']}"]
    with RunningServer(args, workdir) as running:
        yield running


@pytest.fixture(scope="module")
def lora_client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def image(client, **params):
    return pixels(decode_b64(generate(client, **{**ASK, **params}).data[0].b64_json))


def test_the_adapter_changes_the_image_and_leaves_the_base_model_untouched(client, lora_client):
    base = image(client)  # the session's server: no adapter loaded at all
    styled = image(lora_client, loras=[{"name": "style", "scale": 1.0}])
    assert np.abs(styled - base).mean() > 5, "the LoRA must visibly change the image"
    assert np.array_equal(image(lora_client), base), "no loras: exactly the base model's image"
    assert np.array_equal(image(lora_client, loras=[{"name": "style", "scale": 0}]), base), "scale 0 is the base"
    assert np.array_equal(image(lora_client, loras=[{"name": "style"}]), styled), "default scale 1, switched back"
    half = image(lora_client, loras=[{"name": "style", "scale": 0.5}])
    assert 0 < np.abs(half - base).mean() < np.abs(styled - base).mean()
    both = image(lora_client, loras=[{"name": "other"}, {"name": "style", "scale": 1.0}])
    assert not np.array_equal(both, styled)
    assert np.array_equal(image(lora_client), base), "and back to the base after several switches"


def test_the_kohya_layout_gives_the_same_image_as_the_diffusers_layout(lora_client):
    diffusers_layout = image(lora_client, loras=[{"name": "style"}])
    kohya_layout = image(lora_client, loras=[{"name": "kohya"}])
    assert np.abs(diffusers_layout - kohya_layout).max() <= 1


def test_concurrent_requests_with_different_adapters_each_get_their_own(lora_server, lora_client):
    alone = {name: image(lora_client, loras=[{"name": name, "scale": 1.0}]) for name in ("style", "other")}
    assert not np.array_equal(alone["style"], alone["other"])

    async def both():
        clients = [openai.AsyncOpenAI(base_url=f"{lora_server.base_url}/v1", api_key="x", max_retries=0)] * 2
        return await asyncio.gather(
            *[
                c.images.generate(
                    prompt=ASK["prompt"],
                    size="64x64",
                    response_format="b64_json",
                    extra_body={"seed": 7, "num_inference_steps": 3, "loras": [{"name": name, "scale": 1.0}]},
                )
                for c, name in zip(clients, ("style", "other"), strict=True)
            ]
        )

    for name, result in zip(("style", "other"), asyncio.run(both()), strict=True):
        assert np.abs(pixels(decode_b64(result.data[0].b64_json)) - alone[name]).max() <= 2, name


def test_an_edit_takes_loras_as_json_text_in_a_multipart_form(lora_server, lora_client):
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(3).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    source = buffer.getvalue()
    common = {"image": ("in.png", source, "image/png"), "prompt": "a lighthouse", "response_format": "b64_json"}
    fields = {"seed": 7, "num_inference_steps": 2}

    def edited(extra):
        result = lora_client.images.edit(**common, extra_body={**fields, **extra})
        return pixels(decode_b64(result.data[0].b64_json))

    plain = edited({})
    styled = edited({"loras": json.dumps([{"name": "style", "scale": 1}])})
    assert np.abs(styled - plain).mean() > 5
    as_json = httpx.post(
        f"{lora_server.base_url}/v1/images/edits",
        json={
            "images": [{"image_url": "data:image/png;base64," + base64.b64encode(source).decode()}],
            "prompt": "a lighthouse",
            "response_format": "b64_json",
            "loras": [{"name": "style", "scale": 1}],
            **fields,
        },
        timeout=60,
    )
    assert np.array_equal(pixels(decode_b64(as_json.json()["data"][0]["b64_json"])), styled)


def test_models_lists_the_adapters(lora_server):
    cards = httpx.get(f"{lora_server.base_url}/v1/models").json()["data"]
    loras = cards[0]["loras"]
    assert [(a["name"], a["scale"], a["file"], a["fused"]) for a in loras] == [
        ("style", 1.0, "style.safetensors", False),
        ("other", 0.5, "other.safetensors", False),
        ("kohya", 1.0, "style_kohya.safetensors", False),
    ]
    assert all(card["loras"] == loras for card in cards)  # aliases name the same model


def test_unknown_adapters_and_bad_scales_are_400s_naming_them(lora_server, lora_client):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(lora_client, **ASK, loras=[{"name": "nope"}])
    error = caught.value.body
    assert error["param"] == "loras" and error["code"] == "lora_not_found"
    assert "'nope'" in error["message"] and "style" in error["message"]
    for loras, param in (
        ([{"name": "style", "scale": 2.5}], "loras.0.scale"),
        ([{"name": "style"}, {"name": "style"}], "loras"),
        ("not json", "loras"),
        ([{"name": "style", "weight": 1}], "loras.0.weight"),
    ):
        answer = httpx.post(f"{lora_server.base_url}/v1/images/generations", json={**ASK, "loras": loras})
        assert answer.status_code == 400, (loras, answer.text)
        assert answer.json()["error"]["param"] == param, answer.json()
    assert image(lora_client).shape == (64, 64, 3)  # and it keeps serving


def test_a_server_without_adapters_refuses_loras(client):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, **ASK, loras=[{"name": "style"}])
    assert caught.value.body["param"] == "loras" and "none" in caught.value.body["message"]


# -- the engine in-process: different adapter sets never share a pipeline call ------------------------------------
def test_jobs_with_different_adapters_never_share_a_batch(tiny_klein, lora_files):
    config = model_config(tiny_klein)
    adapters = adapters_from_options([f"style={lora_files['style']}", f"other={lora_files['other']}"])
    reports = []
    engine = Engine(
        ModelPool([replace(config, adapters=adapters)]),
        max_batch_images=4,
        batch_window=2.0,
        on_batch=reports.append,
    )
    engine.start()
    assert engine.wait_ready(60)
    try:
        for sets in ([(("style", 1.0),), (("style", 1.0),)], [(("style", 1.0),), (("other", 1.0),), ()]):
            before = len(reports)
            with engine.arriving():  # hold the batch open: every job below is queued before it starts
                handles = [engine.submit(job(seeds=(i,), loras=loras)) for i, loras in enumerate(sets)]
            results = [h.future.result(60) for h in handles]
            batches = [r.images for r in reports[before:]]
            if len({loras for loras in sets}) == 1:
                assert batches == [2] and [r.batch_images for r in results] == [2, 2]
            else:
                assert sorted(batches) == [1, 1, 1] and [r.batch_images for r in results] == [1, 1, 1]
    finally:
        engine.stop(10)


def test_a_fused_adapter_gives_the_adapters_image_and_is_always_on(tiny_klein, lora_files, lora_client):
    switched = image(lora_client, loras=[{"name": "style", "scale": 0.7}])
    fused_style = adapters_from_options([f"style={lora_files['style']}:0.7"], fuse="style")
    config = replace(model_config(tiny_klein), adapters=fused_style)
    engine = Engine(ModelPool([config]))
    engine.start()
    assert engine.wait_ready(60)
    try:
        ask = job(prompt=ASK["prompt"], seeds=(7,), steps=3)
        fused = pixels(engine.submit(ask).future.result(60).images[0])  # no loras asked: it is on anyway
        assert np.abs(fused - switched).max() <= 2
    finally:
        engine.stop(10)
    adapters = config.adapters
    assert select(adapters, [("style", None)]) == select(adapters, [("style", 0.7)]) == ()
    with pytest.raises(AdapterError, match=r"fused into the model at scale 0\.7"):
        select(adapters, [("style", 0.2)])


def test_an_adapter_that_does_not_fit_fails_the_load_with_a_reason(tiny_klein, tmp_path):
    wrong = tmp_path / "wrong.safetensors"  # to_q takes 32 features, not 999
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        wrong,
    )
    config = replace(model_config(tiny_klein), adapters=adapters_from_options([f"wrong={wrong}"]))
    engine = Engine(ModelPool([config]))
    engine.start()
    try:
        assert not engine.wait_ready(60)
        health = engine.health()
        assert health.state == "failed" and "LoRA 'wrong'" in health.load_error and "does not fit" in health.load_error
    finally:
        engine.stop(10)


# -- the option --------------------------------------------------------------------------------------------------
def test_lora_values_are_checked(tmp_path):
    file = tmp_path / "a.safetensors"
    file.write_bytes(b"")
    assert parse_adapter(f"a={file}").scale == 1.0
    assert parse_adapter(f"a={file}:0.75").scale == 0.75
    for bad, words in (
        (f"{file}", "NAME=PATH"),
        (f"a.b={file}", "name"),
        (f"a={tmp_path / 'missing.safetensors'}", "no file"),
        (f"a={file}:3", "between -2 and 2"),
    ):
        with pytest.raises(AdapterError, match=words):
            parse_adapter(bad)
    with pytest.raises(AdapterError, match="two LoRAs"):
        adapters_from_options([f"a={file}", f"a={file}"])
    with pytest.raises(AdapterError, match="names no --lora"):
        adapters_from_options([f"a={file}"], fuse="b")
    assert adapters_from_options([f"a={file}"], fuse="a").fused is not None
    assert not Adapters()


def test_a_missing_adapter_file_stops_the_server_at_start(tiny_klein, lora_files):
    choice = ModelChoice(sources=(str(tiny_klein),), lora=("x=/nowhere.safetensors",))
    with pytest.raises(ModelChoiceError, match=r"no file at /nowhere\.safetensors"):  # serve exits with 2
        resolve_models(choice)
    with pytest.raises(ModelChoiceError, match="--compile"):
        resolve_models(ModelChoice(sources=(str(tiny_klein),), lora=(f"x={lora_files['style']}",), compile=True))
    style = f"x={lora_files['style']}"
    for moved in ("transformer-resident", "block-streaming"):  # plans that move or stream the transformer
        with pytest.raises(ModelChoiceError, match=f"offload plan '{moved}'.*encoder-streamed"):
            resolve_models(ModelChoice(sources=(str(tiny_klein),), lora=(style,), offload=moved))


@pytest.mark.parametrize("offload", ["encoder-swapped", "encoder-streamed"])
def test_a_plan_that_keeps_the_transformer_in_place_takes_adapters(
    tiny_klein, lora_files, lora_client, tmp_path, offload
):
    """Adapters go into the transformer only: under the plans that move or stream only the text encoder a LoRA
    server makes the resident LoRA server's images (the encoder's streaming hooks re-applied by diffusers when the
    adapter loads)."""
    args = ["--model", str(tiny_klein), "--offload", offload, "--lora", f"style={lora_files['style']}"]
    with RunningServer(args, tmp_path) as running:
        assert f"offload plan: {offload} (forced" in running.log()
        planned = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        styled = image(planned, loras=[{"name": "style", "scale": 1.0}])
        base = image(planned)
    assert np.abs(styled - image(lora_client, loras=[{"name": "style", "scale": 1.0}])).max() <= 1
    assert np.abs(base - image(lora_client)).max() <= 1
    assert np.abs(styled - base).mean() > 5  # the adapter is on


def test_an_image_file_records_its_adapters_and_is_reproduced_with_them(lora_server, lora_client):
    from pipeline.file_metadata import read_metadata
    from server.reproduce_command import reproduction

    made = generate(lora_client, **{**ASK, "seed": 31}, loras=[{"name": "other", "scale": 0.7}])
    original = base64.b64decode(made.data[0].b64_json)
    record = read_metadata(original)
    assert record["loras"] == [{"name": "other", "scale": 0.7}]
    endpoint, fields = reproduction(record, [], None)
    again = httpx.post(
        f"{lora_server.base_url}/v1/images/{endpoint}", json={**fields, "response_format": "b64_json"}, timeout=120
    )
    assert again.status_code == 200, again.text
    assert base64.b64decode(again.json()["data"][0]["b64_json"]) == original
    plain = generate(lora_client, **{**ASK, "seed": 31})  # and the adapter did change it
    assert base64.b64decode(plain.data[0].b64_json) != original
