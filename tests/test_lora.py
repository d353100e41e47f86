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
        ([{"name": "style", "scale": 2.5}], "loras[0].scale"),
        ([{"name": "style"}, {"name": "style"}], "loras"),
        ("not json", "loras"),
        ([{"name": "style", "weight": 1}], "loras[0].weight"),
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


def _load_error(folder, lora_option: str) -> str:
    """The load error of a model started with one `--lora` option that must fail its load."""
    config = replace(model_config(folder), adapters=adapters_from_options([lora_option]))
    engine = Engine(ModelPool([config]))
    engine.start()
    try:
        assert not engine.wait_ready(60)
        health = engine.health()
        assert health.state == "failed" and health.load_error
        return health.load_error
    finally:
        engine.stop(10)


def test_an_adapter_that_does_not_fit_fails_the_load_with_a_reason(tiny_klein, tmp_path):
    wrong = tmp_path / "wrong.safetensors"  # to_q takes 32 features, not 999
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        wrong,
    )
    error = _load_error(tiny_klein, f"wrong={wrong}")
    assert "LoRA 'wrong'" in error and "does not fit" in error


def test_an_unreadable_adapter_file_fails_the_load_naming_the_adapter(tiny_klein, lora_files, tmp_path):
    """A truncated LoRA file failed the model with diffusers' raw error, naming no adapter."""
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora_files["style"].read_bytes()[:64])
    assert f"LoRA 'cut' ({cut}) cannot be read" in _load_error(tiny_klein, f"cut={cut}")


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


def test_switchable_adapters_reach_the_placement_and_a_fused_one_does_not(tiny_klein, lora_files, monkeypatch):
    """Adapters a request switches hold the compile back under auto and keep the steps' CUDA graphs off
    (pipeline/placement.py); a fused one is plain weights by the compile. `--compile` with `--lora` is taken."""
    import pipeline.model_choice as model_choice

    seen = []
    real = model_choice.decide_placement
    monkeypatch.setattr(
        model_choice, "decide_placement", lambda *a, **kw: seen.append(kw["switchable_adapters"]) or real(*a, **kw)
    )
    style, other = f"style={lora_files['style']}", f"other={lora_files['other']}"
    served = resolve_models(ModelChoice(sources=(str(tiny_klein),), lora=(style, other), compile=True))
    assert served.configs[0].placement.compile and len(served.configs[0].adapters.switchable) == 2
    resolve_models(ModelChoice(sources=(str(tiny_klein),), lora=(style,), fuse_lora="style"))
    resolve_models(ModelChoice(sources=(str(tiny_klein),), lora=(style, other), fuse_lora="style"))
    assert seen == [True, False, True]


def test_a_missing_adapter_file_stops_the_server_at_start(tiny_klein, lora_files):
    choice = ModelChoice(sources=(str(tiny_klein),), lora=("x=/nowhere.safetensors",))
    with pytest.raises(ModelChoiceError, match=r"no file at /nowhere\.safetensors"):  # serve exits with 2
        resolve_models(choice)


@pytest.mark.parametrize("offload", ["encoder-swapped", "encoder-streamed", "transformer-resident", "block-streaming"])
def test_every_offload_plan_takes_adapters(tiny_klein, lora_files, lora_client, tmp_path, offload):
    """Adapters load before the model is placed: under every offload plan, those that move or stream the text
    encoder and those that move or stream the transformer (its adapters' layers with it), a LoRA server makes the
    resident LoRA server's images (on the CPU the plans' moves are simulated: host copies and empty placeholders)."""
    args = ["--model", str(tiny_klein), "--offload", offload, "--lora", f"style={lora_files['style']}"]
    with RunningServer(args, tmp_path) as running:
        assert f"offload plan: {offload} (forced" in running.log()
        planned = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        styled = image(planned, loras=[{"name": "style", "scale": 1.0}])
        base = image(planned)
    assert np.abs(styled - image(lora_client, loras=[{"name": "style", "scale": 1.0}])).max() <= 1
    assert np.abs(base - image(lora_client)).max() <= 1
    assert np.abs(styled - base).mean() > 5  # the adapter is on


def test_a_plan_that_swaps_the_transformer_swaps_its_adapters_layers_too(tiny_klein, lora_files):
    """`transformer-resident` moves the transformer out for the text encode and back for the denoise: the adapters,
    loaded before the plan is carried out, are among the weights it moves (loaded after, their layers stayed on the
    device whatever the stage, outside the plan's sums)."""
    from pipeline.loader import load_model

    choice = ModelChoice(
        sources=(str(tiny_klein),), lora=(f"style={lora_files['style']}",), offload="transformer-resident"
    )
    config = resolve_models(choice).configs[0]
    model = load_model(config.spec, config.placement, config.adapters)
    lora = [p for name, p in model.pipe.transformer.named_parameters() if ".lora_" in name]
    base = [p for name, p in model.pipe.transformer.named_parameters() if ".lora_" not in name]
    assert lora and base
    swapped = model.swapper.weights["transformer"]
    assert {id(p) for p in swapped.params} == {id(p) for p in lora + base}
    swapped.evict()  # what entering the text encode does to the transformer, the adapters' layers included
    assert all(p.numel() == 0 for p in lora + base)
    model.enter("denoise")
    assert all(p.numel() > 0 for p in lora + base)


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


def test_a_history_entry_re_run_from_its_parameters_makes_the_same_images_with_its_adapters(lora_server, lora_client):
    """The history's normalized parameters hold the adapters: sent back as they are, the same images (they were
    left out: the re-run made the base model's image)."""
    made = httpx.post(
        f"{lora_server.base_url}/v1/images/generations",
        json={**ASK, "seed": 33, "loras": [{"name": "style", "scale": 0.6}]},
        timeout=120,
    )
    entry = httpx.get(f"{lora_server.base_url}/v1/images/history/{made.headers['x-flux2-history-id']}").json()
    parameters = entry["parameters"]
    assert parameters["loras"] == [{"name": "style", "scale": 0.6}]
    again = httpx.post(
        f"{lora_server.base_url}/v1/images/generations",
        json={**parameters, "prompt": entry["prompt"], "response_format": "b64_json"},
        timeout=120,
    )
    assert again.status_code == 200, again.text
    original = base64.b64decode(made.json()["data"][0]["b64_json"])
    assert base64.b64decode(again.json()["data"][0]["b64_json"]) == original
    plain = generate(lora_client, **{**ASK, "seed": 33})  # and the adapter did change it
    assert base64.b64decode(plain.data[0].b64_json) != original


# -- under --compile -------------------------------------------------------------------------------------------------
def test_a_compiled_server_serves_every_adapter_choice_as_the_eager_one_does(
    tiny_klein, lora_files, lora_server, tmp_path
):
    """`--compile --lora`: the adapters are loaded before the warm-up compile, each choice of adapters and scales
    gives the eager server's image (compiled float math may move a pixel by 1-2/255), and no choice makes the
    blocks compile again (Dynamo's recompile log names no LoRA guard)."""
    args = ["--model", str(tiny_klein), "--compile", "--output-dir", str(tmp_path / "out")]
    args += ["--lora", f"style={lora_files['style']}", "--lora", f"other={lora_files['other']}:0.5"]
    with RunningServer(args, tmp_path, env={"TORCH_LOGS": "recompiles"}) as compiled:
        assert "compiled and warmed up at 1024x1024" in compiled.log()
        client = openai.OpenAI(base_url=f"{compiled.base_url}/v1", api_key="x", max_retries=0, timeout=600)
        eager_client = openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        choices = [[], [{"name": "style"}], [{"name": "other"}], [{"name": "style", "scale": -0.8}, {"name": "other"}]]
        seen = []
        for loras in choices + choices[:2]:
            ours, theirs = image(client, loras=loras), image(eager_client, loras=loras)
            assert np.abs(ours - theirs).max() <= 2, loras
            seen.append(ours)
        assert all(np.abs(seen[0] - other).max() > 20 for other in seen[1:4])  # each choice changed the image
        assert np.array_equal(seen[0], seen[4]) and np.array_equal(seen[1], seen[5])  # and switching back restores
        recompiles = [line for line in compiled.log().splitlines() if "__recompiles" in line]
        assert not [line for line in recompiles if any(w in line for w in ("lora_", "scaling", "disable_adapters"))]


def test_under_compile_switching_adapters_compiles_nothing(tiny_klein, lora_files, tmp_path):
    """Under `--compile` the adapters switch by scale (pipeline/adapters.py): every choice runs the graphs the
    first compiled and gives the eager switch's image, also for an adapter whose alpha is not its rank (its layers
    scale by alpha / rank); peft's own switch (the control) compiles again for a new set of adapters or a new
    scale."""
    from torch._dynamo.utils import counters

    from pipeline.adapters import LoadedAdapters
    from pipeline.compilation import compile_transformer
    from pipeline.tiny_weights import build_tiny_pipeline

    doubled = make_lora(tiny_klein, tmp_path / "doubled.safetensors", seed=2, strength=0.6, alpha=8.0)  # rank 4
    adapters = adapters_from_options(
        [f"style={lora_files['style']}", f"other={lora_files['other']}", f"doubled={doubled}"]
    )
    choices = [(), (("style", 1.0),), (("other", 1.0),), (("other", 0.3), ("style", 0.7)), (("style", -1.3),)]
    choices += [(("doubled", 0.5),), (("doubled", 0.5), ("style", 1.0))]

    def run(pipe, loaded, selection):
        loaded.activate(selection)
        compiled = counters["stats"]["unique_graphs"]
        out = pipe(
            prompt="a lighthouse",
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]
        return out, counters["stats"]["unique_graphs"] - compiled

    eager_pipe = build_tiny_pipeline()
    eager = LoadedAdapters(eager_pipe, "tiny", adapters)
    with torch.inference_mode():
        expected = [run(eager_pipe, eager, selection)[0] for selection in choices]
    for by_scale in (True, False):
        pipe = build_tiny_pipeline()
        loaded = LoadedAdapters(pipe, "tiny", adapters)
        if by_scale:
            loaded.switch_by_scale("cpu")
        compile_transformer(pipe)
        with torch.inference_mode():
            run(pipe, loaded, ())  # the first call compiles
            results = [run(pipe, loaded, selection) for selection in choices]
        compiles = [new for _, new in results]
        if by_scale:
            assert compiles == [0] * len(choices)
            for (out, _), want in zip(results, expected, strict=True):
                assert np.abs(out - want).max() < 1e-4
            assert np.abs(results[5][0] - results[2][0]).max() < 1e-4  # "doubled" at 0.5 is "other" at 1
            assert {unit for tensors in loaded.scales.values() for unit in tensors} == {1.0, 2.0}
        else:  # the control: peft's switch recompiles
            assert sum(compiles) > 0


def test_under_compile_adapters_on_int8_weights_switch_without_compiling(tiny_klein, lora_files):
    """`--quantize transformer=int8 --compile --lora`: peft's layers around torchao's quantized ones compile once,
    and every choice after gives the eager quantized model's image."""
    from torch._dynamo.utils import counters

    from pipeline.adapters import LoadedAdapters
    from pipeline.compilation import compile_transformer
    from pipeline.quantization import parse_quantization, quantize_modules
    from pipeline.tiny_weights import build_tiny_pipeline

    adapters = adapters_from_options([f"style={lora_files['style']}", f"other={lora_files['other']}"])
    choices = [(), (("style", 1.0),), (("other", 0.4), ("style", 1.0)), (("other", -0.7),), ()]

    def images(by_scale: bool) -> tuple[list[np.ndarray], list[int]]:
        pipe = build_tiny_pipeline()
        quantize_modules(pipe, parse_quantization("transformer=int8"))
        loaded = LoadedAdapters(pipe, "tiny", adapters)
        if by_scale:
            loaded.switch_by_scale("cpu")
            compile_transformer(pipe)
        out, compiles = [], []
        with torch.inference_mode():
            for selection in choices:
                loaded.activate(selection)
                before = counters["stats"]["unique_graphs"]
                ask = {"prompt": "a lighthouse", "height": 64, "width": 64, "num_inference_steps": 2}
                out.append(pipe(**ask, generator=torch.Generator().manual_seed(3), output_type="np").images[0])
                compiles.append(counters["stats"]["unique_graphs"] - before)
        return out, compiles

    expected, _ = images(by_scale=False)
    compiled, compiles = images(by_scale=True)
    assert compiles[0] > 0 and compiles[1:] == [0] * (len(choices) - 1)  # the first call compiles, no switch does
    for ours, want in zip(compiled, expected, strict=True):
        assert np.abs(ours - want).max() < 1e-3
    assert np.abs(compiled[1] - compiled[0]).mean() > 0.02 and np.array_equal(compiled[0], compiled[4])


# -- on quantized weights (--quantize) ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "fp8-weight"])
def test_adapters_on_quantized_weights_switch_and_fuse(tiny_klein, lora_files, lora_client, tmp_path, scheme):
    """`--quantize transformer=SCHEME --lora`: peft wraps torchao's quantized layers; the adapter moves the quantized
    model's image as it moves the unquantized one's (its image is near the unquantized server's adapter image, far
    from the quantized base), and `--fuse-lora` merges it into the quantized weights with the switched image's
    result (requantized: a few levels apart)."""

    def mean_gap(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean())

    args = ["--model", str(tiny_klein), "--quantize", f"transformer={scheme}", "--output-dir", str(tmp_path / "out")]
    with RunningServer([*args, "--lora", f"style={lora_files['style']}"], tmp_path) as quantized:
        client = openai.OpenAI(base_url=f"{quantized.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        base, styled = image(client), image(client, loras=[{"name": "style", "scale": 0.8}])
    unquantized = image(lora_client, loras=[{"name": "style", "scale": 0.8}])
    assert mean_gap(styled, base) > 10  # the adapter does change the quantized model's image
    assert mean_gap(styled, unquantized) < mean_gap(styled, base) / 4
    fused_style = adapters_from_options([f"style={lora_files['style']}:0.8"], fuse="style")
    served = resolve_models(ModelChoice(sources=(str(tiny_klein),), quantize=f"transformer={scheme}"))
    config = replace(served.configs[0], adapters=fused_style)
    engine = Engine(ModelPool([config]))
    engine.start()
    assert engine.wait_ready(60)
    try:
        ask = job(prompt=ASK["prompt"], seeds=(7,), steps=3)
        fused = pixels(engine.submit(ask).future.result(60).images[0])
    finally:
        engine.stop(10)
    assert mean_gap(fused, styled) < 3
