"""The full-size benchmark (`flux2-local bench --architecture`): real configs checked on the meta device, and the
whole bench run on the CPU with the scaled-down architectures. Timings on a shared CI machine prove nothing, so
only the shape of the results is checked: every figure present, positive, with its ratio."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.architectures import ARCHITECTURES, get_architecture, parameter_counts
from server.bench_speed import parse_speed_options

_GIB = 1024**3

# The released models' sizes (GPU.md: klein-4B transformer 3.876 B, Qwen3-4B 4.022 B, VAE 84 M; Qwen3-8B 8.19 B;
# FLUX.2 dev 32.2 B; Mistral-Small-3.1-24B 24.0 B).
_REAL_COUNTS = {
    "klein-4b": (3.876e9, 4.022e9),
    "klein-9b": (9.079e9, 8.191e9),
    "dev": (32.223e9, 24.011e9),
}


@pytest.mark.parametrize("name", sorted(_REAL_COUNTS))
def test_full_size_configs_have_the_real_parameter_counts(name):
    counts = parameter_counts(get_architecture(name))
    transformer, text_encoder = _REAL_COUNTS[name]
    assert counts["transformer"] == pytest.approx(transformer, rel=2e-4)
    assert counts["text_encoder"] == pytest.approx(text_encoder, rel=2e-4)
    assert counts["vae"] == pytest.approx(84.05e6, rel=1e-3)


@pytest.mark.parametrize("name", ["klein-4b", "klein-9b", "dev"])
def test_full_size_configs_keep_what_the_pipelines_rely_on(name):
    import inspect

    from diffusers import Flux2Transformer2DModel

    arch = get_architecture(name)
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(Flux2Transformer2DModel.__init__).parameters.items()
    }
    merged = {**defaults, **arch.transformer}
    assert merged["in_channels"] == 128 and merged["attention_head_dim"] == 128
    assert merged["joint_attention_dim"] == 3 * arch.encoder["hidden_size"]  # three stacked hidden states
    assert merged["attention_head_dim"] == sum(merged["axes_dims_rope"])
    layers_read = 30 if arch.family == "dev" else 27
    assert arch.encoder["num_hidden_layers"] >= layers_read
    assert merged["guidance_embeds"] == (arch.family == "dev")


def test_an_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="klein-4b"):
        get_architecture("klein-2b")


def test_dev_pipeline_fits_an_h200_not_an_h100():
    from server.bench_fullsize import fits_card

    def weights(name):
        return sum(parameter_counts(get_architecture(name)).values()) * 2  # bf16

    h200, h100 = 143_771 * 1024**2, 81_559 * 1024**2
    assert weights("dev") / 1e9 == pytest.approx(112.6, abs=0.5)
    assert fits_card(weights("dev"), h200)
    assert not fits_card(weights("dev"), h100)
    assert fits_card(weights("klein-9b"), h100)


# The figures timed on the plain pipeline alone (no served column).
DIRECT_ONLY = (
    "transformer_step",
    "vae_decode",
    "vae_encode",
    "vae_decode_channels_last",
    "vae_decode_cudnn_benchmark",
    "text_encode",
    "text_encode_read_depth",
    "text_encode_compiled",
)


def _expected_keys(arch):
    keys = [
        "one_image",
        "sequential_4",
        "concurrent_4",
        "n_4",
        "stream_2",
        "edit_1",
        "edit_4",
        "edit_10",
        "edit_1_after_image",
        "masked_edit",
        f"one_image_{2 * arch.size}",
        "pipeline_step",
        *DIRECT_ONLY,
        "edit_1_cached",
        "edit_4_cached",
        "edit_10_cached",
        "edit_4_repeated",
        "edit_10_repeated",
    ]
    if arch.family == "klein":
        keys.append(f"one_image_{arch.size // 2}")
    return keys


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CPU run of the whole bench through the command line, as the GPU run invokes it."""
    from typer.testing import CliRunner

    from server.cli import app

    folder = tmp_path_factory.mktemp("bench")
    docs = folder / "docs" / "PERFORMANCE.md"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--architecture",
            "tiny",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--json",
            str(folder / "bench.json"),
            "--update-docs",
            "--docs",
            str(docs),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"output": result.output, "json": json.loads((folder / "bench.json").read_text()), "docs": docs}


def _check_figures(results, expected_keys, no_direct=()):
    figures = {figure["key"]: figure for figure in results["figures"]}
    assert sorted(figures) == sorted(expected_keys)
    for key, figure in figures.items():
        assert "error" not in figure, figure
        assert figure["runs"] == 1
        if key in DIRECT_ONLY:
            assert figure["served_s"] is None and figure["direct_s"] > 0
            continue
        assert figure["served_s"] > 0 and figure["served_peak_gib"] > 0, key
        if key in no_direct:
            assert figure["direct_s"] is None and figure["ratio"] is None
        else:
            assert figure["direct_s"] > 0 and figure["direct_peak_gib"] > 0, key
            assert figure["ratio"] == pytest.approx(figure["served_s"] / figure["direct_s"])
    return figures


def test_tiny_bench_json_has_every_figure_with_positive_numbers_and_ratios(tiny_run):
    results = tiny_run["json"]
    assert results["complete"] and results["mode"] == "pipeline" and results["architecture"] == "tiny"
    no_direct = ("edit_4_repeated", "edit_10_repeated", "edit_1_after_image")
    _check_figures(results, _expected_keys(get_architecture("tiny")), no_direct=no_direct)
    assert results["build_s"] >= 0 and results["total_s"] > 0
    assert set(results["versions"]) >= {"torch", "diffusers", "transformers", "python"}
    assert results["device"].startswith("CPU")
    assert all(count > 0 for count in results["parameters"].values())
    import torch

    assert not torch.backends.cudnn.benchmark  # the autotuner figure's cleanup put the default back


def test_the_repeated_references_figure_measured_store_hits_and_the_cached_ones_computed(tiny_run):
    """Each figure records what its cached stages were (Server-Timing's descriptions): the repeated edit's references
    came from the store in every timed run, the first-time cached edits computed theirs, plain edits have none."""
    figures = {figure["key"]: figure for figure in tiny_run["json"]["figures"]}
    for count in (4, 10):
        assert figures[f"edit_{count}_repeated"]["served_marks"]["references"] == ["cache hit"]
    for count in (1, 4, 10):
        assert figures[f"edit_{count}_cached"]["served_marks"]["references"] == ["computed"]
    assert "references" not in figures["edit_4"]["served_marks"]
    assert figures["one_image"]["served_marks"]["text_encode"] == ["encoded"]  # a new prompt every run
    # Each served request's own stages, as its Server-Timing header gave them (one run per figure here).
    one = figures["one_image"]
    assert len(one["served_runs_stages_ms"]) == one["runs"] == 1
    assert one["served_runs_stages_ms"][0] == one["served_stages_ms"]
    assert one["served_runs_stages_ms"][0]["total"] > one["served_runs_stages_ms"][0]["denoise"] > 0
    # And what each run paid besides (collections, compiles; no CUDA graphs or allocator here, on the CPU).
    for side in ("served", "direct"):
        assert [set(counts) for counts in one[f"{side}_runs_counters"]] == [{"gc_full_collections", "compiled_graphs"}]


def test_the_edit_after_a_generation_times_only_the_edit(tiny_run):
    """`edit_1_after_image`: an unrecorded generation before each timed edit (a server's mixed load); only the edit's
    stages and counters are the figure's."""
    figure = {f["key"]: f for f in tiny_run["json"]["figures"]}["edit_1_after_image"]
    assert figure["runs"] == 1 and figure["served_s"] > 0 and figure["direct_s"] is None
    assert len(figure["served_runs_stages_ms"]) == 1 and figure["served_runs_stages_ms"][0]["inputs"] > 0
    assert len(figure["served_runs_counters"]) == 1


def test_the_edits_are_summed_up_as_multiples_of_one_image(tiny_run):
    from server.bench_report import edit_summary

    results = tiny_run["json"]
    served = {figure["key"]: figure["served_s"] for figure in results["figures"]}
    line = edit_summary(results)
    assert line in tiny_run["output"]
    assert f"4 refs {served['edit_4'] / served['one_image']:.2f}x" in line
    assert f"10 {served['edit_10_cached'] / served['one_image']:.2f}x" in line
    repeated = [f"{n} {served[f'edit_{n}_repeated'] / served['one_image']:.2f}x" for n in (4, 10)]
    assert f"(reference store): {', '.join(repeated)}" in line
    without = {**results, "figures": [f for f in results["figures"] if f["key"] != "one_image"]}
    assert edit_summary(without) == ""


def test_tiny_bench_table_prints_every_row(tiny_run):
    output = tiny_run["output"]
    for figure in tiny_run["json"]["figures"]:
        assert figure["label"] in output
    assert "served / plain" in output and "peak GiB" in output
    assert "one image 128x128" in output and "edit, 10 references 128x128" in output
    assert "[" in output and "s] built the pipeline in memory" in output  # progress lines with elapsed time
    assert "edit, 4 references, --reference-cache on" in output


def test_tiny_bench_checks_the_reference_cache(tiny_run):
    """Cache on and off timed by reference count; the cached image against the uncached one and against diffusers'
    KV pipeline (the same semantics: equal up to rounding)."""
    check = tiny_run["json"]["reference_cache"]
    assert set(check["edit_s"]) == {"0", "1", "1_cached", "4", "4_cached", "10", "10_cached"}
    assert all(seconds > 0 for seconds in [*check["edit_s"].values(), *check["per_step_s"].values()])
    assert check["cached_vs_kv_pipeline"]["max_abs_255"] <= 1
    assert check["cached_vs_uncached"]["psnr_db"] > 0
    assert "reference cache, 128x128" in tiny_run["output"]
    assert "reference cache, 128x128" in tiny_run["docs"].read_text()


def test_update_docs_writes_the_device_versions_and_the_table(tiny_run):
    import diffusers
    import torch
    import transformers

    text = tiny_run["docs"].read_text()
    assert text.startswith("# Performance")
    assert "## tiny on CPU" in text
    for version in (torch.__version__, diffusers.__version__, transformers.__version__):
        assert version in text
    for figure in tiny_run["json"]["figures"]:
        assert f"| {figure['label']} |" in text


def test_update_docs_replaces_only_its_own_architecture_section(tiny_run, tmp_path):
    from server.bench_report import update_performance_doc

    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text(tiny_run["docs"].read_text())
    other = {**tiny_run["json"], "architecture": "klein-4b", "device": "NVIDIA H200"}
    update_performance_doc(other, docs, "flux2-local bench --architecture klein-4b")
    update_performance_doc({**tiny_run["json"], "device": "CPU again"}, docs, "flux2-local bench --architecture tiny")
    text = docs.read_text()
    assert text.count("<!-- bench:tiny -->") == 1 and "## tiny on CPU again" in text
    assert "## klein-4b on NVIDIA H200" in text
    assert text.count("# Performance") == 1


def test_tiny_dev_bench_runs_the_dev_pipeline_path(tmp_path):
    from server.bench_fullsize import run_fullsize_bench

    lines = []
    results = run_fullsize_bench(get_architecture("tiny-dev"), "cpu", 1, 4, tmp_path / "dev.json", echo=lines.append)
    assert json.loads((tmp_path / "dev.json").read_text())["complete"]
    _check_figures(
        results,
        _expected_keys(get_architecture("tiny-dev")),
        no_direct=(
            "masked_edit",
            "edit_1_cached",
            "edit_4_cached",
            "edit_10_cached",
            "edit_4_repeated",
            "edit_10_repeated",
            "edit_1_after_image",
        ),
    )
    assert results["estimates"]["one_image_50_steps_s"] > 0
    assert any("default is 50" in note for note in results["notes"])


def test_transformer_only_mode_measures_the_transformer_and_lists_the_rest(tmp_path):
    from server.bench_fullsize import run_fullsize_bench
    from server.bench_report import table

    arch = get_architecture("tiny")
    results = run_fullsize_bench(arch, "cpu", 1, 4, None, transformer_only=True, echo=lambda line: None)
    assert results["mode"] == "transformer-only"
    assert [f["key"] for f in results["figures"]] == ["transformer_step_128", "transformer_step_256"]
    assert all(f["direct_s"] > 0 for f in results["figures"])
    assert "one image 128x128" in results["skipped"] and "masked edit" in results["skipped"]
    printed = table(results)
    assert "not measured" in printed and "transformer was built and measured" in printed


def test_a_failing_figure_is_reported_and_the_run_goes_on(tiny_run):
    from server.bench_fullsize import Figure, _Clock, _guarded, _measure
    from server.bench_report import table

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    lines = []
    figure = Figure("edit_10", "edit, 10 references", out_of_memory, lambda: None)
    result = _guarded(figure, lambda: _measure(figure, 1, "cpu", _Clock(lines.append)), _Clock(lines.append))
    assert result["error"] == "RuntimeError: CUDA out of memory" and result["served_s"] is None
    assert any("FAILED" in line for line in lines)
    printed = table({**tiny_run["json"], "figures": [result]})
    assert "edit, 10 references  failed" in printed and "CUDA out of memory" in printed


def test_dev_without_torchvision_gets_a_text_only_processor(monkeypatch):
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    import pipeline.tiny_weights as tiny_weights
    from pipeline.architectures import TextOnlyProcessor, dev_text_processor
    from pipeline.prompts import measure_prompt

    real = dev_text_processor()

    def no_torchvision():
        raise ImportError("PixtralProcessor requires the Torchvision library")

    monkeypatch.setattr(tiny_weights, "dev_processor", no_torchvision)
    fallback = dev_text_processor()
    assert isinstance(fallback, TextOnlyProcessor)
    messages = format_input(prompts=["a red kite", "a cat"], system_message=SYSTEM_MESSAGE)
    options = dict(
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    assert (
        fallback.apply_chat_template(messages, **options)["input_ids"].tolist()
        == real.apply_chat_template(messages, **options)["input_ids"].tolist()
    )

    class Pipe:
        tokenizer = fallback
        system_message = SYSTEM_MESSAGE

    assert measure_prompt(Pipe(), "dev", "a red kite").text_tokens > 0


def test_every_architecture_is_listed_in_the_command_help():
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for name in ("klein-4b", "klein-9b", "dev", "--json", "--update-docs", "--device"):
        assert name in result.output
    assert set(ARCHITECTURES) >= {"klein-4b", "klein-9b", "dev", "tiny"}


def test_architectures_import_without_the_http_stack():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('fastapi', 'starlette', 'uvicorn', 'server'): sys.modules[name] = None\n"
        "import pipeline.architectures\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_bench_reports_the_step_cache_speedup_and_psnr(tiny_run):
    cache = tiny_run["json"]["step_cache"]
    assert cache["cache"] == "taylorseer:5" and cache["steps"] >= 20
    assert cache["uncached_s"] > 0 and cache["cached_s"] > 0
    assert cache["speedup"] == cache["uncached_s"] / cache["cached_s"]
    assert cache["psnr_db"] > 0  # a number, and the images differ (an identical pair would be inf)
    assert "step cache taylorseer:5" in tiny_run["output"] and "PSNR" in tiny_run["output"]


def test_tiny_bench_profiles_the_stages_operator_by_operator(tiny_run):
    """On a CPU the profile lists operators (on CUDA, kernels): each stage's largest entries, in order, within its
    busy time, which is within its wall time, and a line per stage in the output."""
    profile = tiny_run["json"]["profile"]
    assert set(profile) == {"served_image", "text_encode", "transformer_step", "decode"}
    for stage, found in profile.items():
        for key in ("top", "host_top"):
            top = found[key]
            assert top, (stage, key)
            assert [entry["ms"] for entry in top] == sorted((entry["ms"] for entry in top), reverse=True)
            assert all(entry["calls"] >= 1 and entry["name"] for entry in top)
        assert found["measures"] == "CPU operators", stage
        assert 0 < sum(entry["ms"] for entry in found["top"]) <= found["busy_ms"] * 1.0001
        assert found["busy_ms"] <= found["wall_ms"] * 1.05, stage  # the profiler's own time aside
        assert 0 < sum(entry["ms"] for entry in found["host_top"]) <= found["host_ms"] * 1.0001
        assert f"profile {stage}: " in tiny_run["output"]
    # The served image, profiled through HTTP: the server's threads ran the model, so its operators are recorded
    # (the decode's convolutions, the transformer's matmuls), not only the client's.
    served = {entry["name"] for entry in profile["served_image"]["top"]}
    assert any("conv" in name for name in served) and any("mm" in name or "linear" in name for name in served)
    assert any("conv" in entry["name"] for entry in profile["decode"]["top"])
    assert any("linear" in entry["name"] or "mm" in entry["name"] for entry in profile["transformer_step"]["top"])


def test_compile_and_only_measure_the_eager_baseline_first_and_get_their_own_docs_section(tmp_path, tiny_run):
    """`--compile --only ...`: plain diffusers timed on the eager pipeline, then the pipeline compiled (as serve
    --compile) and only the named figures measured; the docs gain a separate section, the plain one stays."""
    from typer.testing import CliRunner

    from server.cli import app

    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text(tiny_run["docs"].read_text())
    result = CliRunner().invoke(
        app,
        [
            "bench", "--architecture", "tiny", "--device", "cpu", "--repeats", "1", "--compile",
            "--only", "one_image,pipeline_step,vae_encode,vae_encode_eager_norms", "--json",
            str(tmp_path / "bench.json"), "--update-docs",
            "--docs", str(docs),
        ],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"] and results["variant"] == "--compile"
    keys = [f["key"] for f in results["figures"]]
    assert keys == ["one_image", "pipeline_step", "vae_encode", "vae_encode_eager_norms"]
    assert all(f["served_s"] > 0 for f in results["figures"][:2])
    assert all(f["direct_s"] > 0 for f in results["figures"])
    assert "step_cache" not in results and "reference_cache" not in results
    assert results["eager_baseline"]["key"] == "one_image" and results["eager_baseline"]["direct_s"] > 0
    assert results["speed_setup_s"] > 0
    # The warm-up compiled everything the timed runs needed: none of them compiled a graph.
    one = results["figures"][0]
    assert [counts["compiled_graphs"] for counts in one["served_runs_counters"] + one["direct_runs_counters"]] == [0, 0]
    assert "eager baseline (plain diffusers, float32, before --compile): one_image" in result.output
    text = docs.read_text()
    assert "<!-- bench:tiny --compile -->" in text and "<!-- /bench:tiny --compile -->" in text
    assert text.count("<!-- bench:tiny -->") == 1  # the plain run's section is kept
    command = "--compile --only one_image,pipeline_step,vae_encode,vae_encode_eager_norms`"
    assert f"`flux2-local bench --architecture tiny --repeats 1 {command}" in text


def test_the_eager_norms_figure_takes_the_encoders_compiled_norms_off_and_puts_them_back():
    import torch

    from pipeline.compilation import compile_vae_norms
    from pipeline.tiny_weights import build_tiny_pipeline
    from server.bench_figures import _eager_encoder_norms

    pipe = build_tiny_pipeline("klein")
    compile_vae_norms(pipe)
    encoder = [m for m in pipe.vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    decoder = [m for m in pipe.vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    compiled = [vars(norm)["forward"] for norm in encoder]
    _eager_encoder_norms(pipe, True)
    assert not any("forward" in vars(norm) for norm in encoder)
    assert all("forward" in vars(norm) for norm in decoder)  # the decode keeps its own
    _eager_encoder_norms(pipe, False)
    assert [vars(norm)["forward"] for norm in encoder] == compiled


def test_quantized_transformer_alone_is_measured_against_its_eager_baseline():
    from pipeline.quantization import parse_quantization
    from server.bench_fullsize import run_fullsize_bench
    from server.bench_speed import SpeedOptions

    speed = SpeedOptions(quantization=parse_quantization("transformer=int8"))
    results = run_fullsize_bench(
        get_architecture("tiny"), "cpu", 1, 4, None, transformer_only=True, echo=lambda line: None, speed=speed
    )
    assert results["variant"] == "--quantize transformer=int8"
    assert results["eager_baseline"]["key"] == "transformer_step_128" and results["eager_baseline"]["direct_s"] > 0
    assert all(f["direct_s"] > 0 for f in results["figures"])


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--quantize", "transformer=fp3"], "quantize scheme must be one of"),
        (["--only", " , "], "--only"),
        (["--attention", "fa3"], "--attention: one of sdpa, cudnn"),
        (["--attention", "cudnn"], "attention cudnn is a CUDA kernel"),
    ],
)
def test_bad_speed_options_are_refused_by_name(arguments, message):
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(
        app, ["bench", "--architecture", "tiny", "--device", "cpu", *arguments], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2 and message in result.output


def test_the_text_encoder_compiled_layer_by_layer_encodes_the_same_and_goes_back_to_eager():
    """The `text_encode_compiled` figure's switch: every decoder layer compiled in place (the encoder's, not dev's
    vision tower's), the same embeddings as eager, and eager again after the figure."""
    import torch

    from pipeline.tiny_weights import build_tiny_pipeline
    from server.bench_harness import compile_text_encoder_layers, text_encoder_layers

    dev = build_tiny_pipeline("dev")
    assert text_encoder_layers(dev) is dev.text_encoder.model.language_model.layers
    pipe = build_tiny_pipeline("klein")
    layers = text_encoder_layers(pipe)
    assert layers is pipe.text_encoder.model.layers

    def embeds():
        with torch.inference_mode():
            return pipe.encode_prompt(prompt=["a kite over the sea"], device="cpu", num_images_per_prompt=1)[0]

    eager = embeds()
    compile_text_encoder_layers(pipe, True)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    compiled = embeds()
    compile_text_encoder_layers(pipe, False)
    assert all(layer._compiled_call_impl is None for layer in layers)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeds(), eager, atol=0, rtol=0)


def test_a_stopped_full_size_bench_prints_where_each_thread_was():
    """`.ci/gpu-checks` stops a stage that runs out of time with SIGTERM: the bench dumps every thread's stack on
    the way out (and still dies of the signal), so a stage cut short says where it was."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "FLUX2_BENCH_STACKS_EVERY": "0"}
    command = [sys.executable, "-m", "server.cli", "bench", "--architecture", "tiny", "--device", "cpu"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as bench:
        assert bench.stdout is not None
        for line in bench.stdout:  # stopped while it measures
            if "built the pipeline in memory" in line:
                break
        bench.send_signal(signal.SIGTERM)
        _, stderr = bench.communicate(timeout=60)
    assert bench.returncode == -signal.SIGTERM
    assert "most recent call first" in stderr and 'File "' in stderr, stderr[-3000:]
    assert "server/bench_fullsize.py" in stderr  # the main thread was in the bench


def test_run_counters_count_collections_compiles_and_graph_replays():
    """`served_runs_counters`: what changed over a served run (a slow first run after a warm-up is told apart by
    them: a full collection, a recompile, steps that did not replay their CUDA graphs)."""
    import gc
    from types import SimpleNamespace

    import torch

    from pipeline.transformer_graphs import install, installed, uninstall
    from server.bench_fullsize import run_counters

    pipe = SimpleNamespace(transformer=torch.nn.Linear(4, 4), text_encoder=torch.nn.Linear(4, 4))
    counters = run_counters(pipe, "cpu")
    before = counters()
    assert set(before) == {"gc_full_collections", "compiled_graphs"}
    gc.collect()
    torch.compile(lambda x: x * 3 + 1, backend="eager")(torch.ones(3))
    after = counters()
    assert after["gc_full_collections"] >= before["gc_full_collections"] + 1  # and any the compile set off
    assert after["compiled_graphs"] == before["compiled_graphs"] + 1
    install(pipe.transformer)
    try:
        graphs = installed(pipe.transformer)
        assert counters()["step_graph_replays"] == 0
        graphs.replays += 4  # as four replayed steps count themselves
        assert counters()["step_graph_replays"] == 4
    finally:
        uninstall(pipe.transformer)


def test_a_figures_before_runs_untimed_before_each_served_run_outside_its_counters():
    from server.bench_figures import Figure
    from server.bench_fullsize import _Clock, _runs

    events: list[str] = []
    count = [0]

    def step(name, by):
        def act():
            events.append(name)
            count[0] += by

        return act

    figure = Figure("k", "label", step("served", 1), step("direct", 2), before=step("before", 5))
    lines: list[str] = []
    counts: dict = {}
    served, direct, _, _ = _runs(figure, 2, "cpu", _Clock(lines.append), lambda: {"n": count[0]}, counts)
    assert events == ["before", "served", "direct"] * 2
    assert counts == {"served": [{"n": 1}] * 2, "direct": [{"n": 2}] * 2}
    assert len(served) == len(direct) == 2
    assert "served" in lines[0] and "(n 1)" in lines[0] and "(n 2)" in lines[0]


def test_loras_load_random_adapters_and_time_a_switched_image_that_compiles_nothing(tmp_path):
    """`--compile --loras 2`: two random adapters loaded into the served model before the compile (as serve --lora
    --compile), and `one_image_lora` times an image with one of them right after one with none: every timed run
    switches, and none of them compiles a graph (the adapters switch by scale, pipeline/adapters.py)."""
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(
        app,
        [
            "bench", "--architecture", "tiny", "--device", "cpu", "--repeats", "2", "--compile", "--loras", "2",
            "--only", "one_image,one_image_lora", "--json", str(tmp_path / "bench.json"),
        ],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"] and results["variant"] == "--compile --loras 2" and results["loras_load_s"] > 0
    plain, lora = results["figures"]
    assert (plain["key"], lora["key"]) == ("one_image", "one_image_lora")
    assert lora["served_s"] > 0 and lora["direct_s"] is None and "1 of 2 LoRAs at 0.8" in lora["label"]
    assert [counts["compiled_graphs"] for counts in lora["served_runs_counters"]] == [0, 0]
    assert "2 random LoRA adapters (rank 32) loaded" in result.output
    with pytest.raises(ValueError, match="--loras: from 0 to 8"):
        parse_speed_options(False, "none", None, 9)


def test_an_attention_kernel_is_pinned_after_the_eager_baseline(tmp_path):
    """`--attention math`: plain diffusers first with torch's pick (the eager baseline), then the served and direct
    columns with the kernel pinned on every attention layer."""
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(
        app,
        [
            "bench", "--architecture", "tiny", "--device", "cpu", "--repeats", "1", "--attention", "math",
            "--only", "one_image", "--json", str(tmp_path / "bench.json"),
        ],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"] and results["variant"] == "--attention math"
    assert results["eager_baseline"]["direct_s"] > 0 and results["figures"][0]["served_s"] > 0
    assert "--attention math applied" in result.output


def test_a_pipeline_too_big_for_the_card_in_bf16_is_built_quantized_when_that_fits():
    """dev on an 80 GB H100: ~105 GiB in bf16 does not fit, with `transformer=fp8,text_encoder=fp8` (~52.5 GiB) it
    does, so the bench builds it quantized (no bf16 eager baseline) instead of measuring the transformer alone."""
    from pipeline.quantization import parse_quantization
    from server.bench_fullsize import pipeline_mode, quantized_bytes

    gib = 1 << 30
    counts = parameter_counts(get_architecture("dev"))
    bf16 = sum(counts.values()) * 2
    both = quantized_bytes(counts, parse_quantization("transformer=fp8,text_encoder=fp8"), 2)
    assert both == counts["transformer"] + counts["text_encoder"] + 2 * counts["vae"]
    transformer = quantized_bytes(counts, parse_quantization("transformer=fp8"), 2)
    h100, h200 = 79.2 * gib, 139.8 * gib
    assert pipeline_mode("cuda", bf16, both, h200, quantizing=True) == "pipeline"
    assert pipeline_mode("cuda", bf16, both, h100, quantizing=True) == "quantized at build"
    assert pipeline_mode("cuda", bf16, transformer, h100, quantizing=True) == "transformer-only"  # 75 GiB: no room
    assert pipeline_mode("cuda", bf16, bf16, h100, quantizing=False) == "transformer-only"
    assert pipeline_mode("cpu", bf16, both, 0.0, quantizing=True) == "pipeline"


def test_a_pipeline_built_quantized_takes_its_eager_baseline_on_the_quantized_weights(monkeypatch):
    from pipeline.quantization import parse_quantization
    from server import bench_fullsize
    from server.bench_report import baseline_summary
    from server.bench_speed import SpeedOptions

    seen = []
    real = bench_fullsize._eager_baseline

    def baseline(direct, *args, **kwargs):
        seen.append(type(direct.pipe.transformer.transformer_blocks[0].ff.linear_in.weight).__name__)
        return real(direct, *args, **kwargs)

    monkeypatch.setattr(bench_fullsize, "_eager_baseline", baseline)
    speed = SpeedOptions(quantization=parse_quantization("transformer=int8"), only=frozenset({"one_image"}))
    results = bench_fullsize.run_fullsize_bench(
        get_architecture("tiny"), "cpu", 1, 2, None, None, echo=lambda line: None, speed=speed, build_quantized=True
    )
    assert seen == ["Int8Tensor"]
    assert results["complete"] and results["quantized_at_build"] == "transformer=int8"
    assert results["figures"][0]["served_s"] > 0 and results["baseline_before"] == ""
    summary = baseline_summary(results)
    assert "quantized at build: transformer=int8, before nothing else" in summary, summary
    assert any("Built with --quantize transformer=int8" in note for note in results["notes"])


@pytest.mark.parametrize("quantized", [True, False])
def test_a_quantized_build_keeps_what_it_built_first_on_the_host_while_the_text_encoder_is_built(
    monkeypatch, quantized
):
    """dev in fp8 on an 80 GB H100: its fp8 transformer (~30 GiB) stayed on the card while the text encoder was
    built in bf16 (~44.7 GiB), a ~75 GiB peak of the card's 79. A quantized build now parks what it built first
    (quantized) on the host while the text encoder is built, and brings it back after. Shown on the full-size
    build path with a scaled-down klein config, on the CPU, by the order of the components' moves; the pipeline
    brought back still holds its int8 weights and makes an image."""
    pytest.importorskip("torchao")
    from pipeline import architectures
    from pipeline.architectures import Architecture, build_pipeline
    from pipeline.quantization import Quantization, parse_quantization
    from pipeline.tiny_weights import TINY_TRANSFORMER, klein_tokenizer, tiny_klein_encoder

    arch = Architecture(
        "scaled-down-klein",
        "klein",
        {**TINY_TRANSFORMER, "guidance_embeds": False},
        tiny_klein_encoder(len(klein_tokenizer())),
    )
    assert not arch.tiny  # the full-size path
    events: list[str] = []
    real_to, real_qwen3 = torch.nn.Module.to, architectures._qwen3

    def to(module, *args, **kwargs):
        if type(module).__name__ in ("Flux2Transformer2DModel", "AutoencoderKLFlux2"):
            events.append(f"{type(module).__name__} to {args[0] if args else kwargs}")
        return real_to(module, *args, **kwargs)

    def qwen3(*args):
        events.append("text encoder built")
        return real_qwen3(*args)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(architectures, "_qwen3", qwen3)
    quantization = parse_quantization("transformer=int8") if quantized else Quantization()
    pipe = build_pipeline(arch, "cpu", torch.float32, quantization=quantization)
    if quantized:
        parked = ["Flux2Transformer2DModel to cpu", "AutoencoderKLFlux2 to cpu"]
        assert events == [*parked, "text encoder built", *parked]
        assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    else:
        assert events == ["text encoder built"]  # nothing to make room for: nothing moves
    image = pipe(prompt="a red cube", height=64, width=64, num_inference_steps=1, output_type="pil").images[0]
    assert image.size == (64, 64)
